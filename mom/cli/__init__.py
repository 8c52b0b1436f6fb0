"""Command lines, the top layer: argument parsing, progress and printing around the libraries below.

Every command follows `mom.cli.common`: a bad input is one line ``<prog>: error: <problem and fix>`` on stderr and exit
code 2 (a traceback only with ``--debug``). Nothing in ``mom`` imports ``mom.cli``.
"""
