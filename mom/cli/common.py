"""The conventions every ``mom-*`` command shares: ``--debug``, one-line errors and their exit codes."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from mom.utils.errors import BadInputError, MissingDependencyError

USAGE_ERROR = 2  # bad input (arguments, recipe, files): argparse's own code for a usage error
FAILED = 1  # the work itself failed after starting (e.g. training diverged); what was written is intact
INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT

# What a user's input can raise: reported in one line. Anything else is a bug and keeps its traceback.
INPUT_ERRORS = (ValueError, OSError, BadInputError, MissingDependencyError)


class CommandFailed(RuntimeError):
    """The command started its work and could not finish it (exit `FAILED`); the message says what is intact."""


def add_debug_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def run(prog: str, body: Callable[[], int | None], debug: bool = False) -> int:
    """Run a command's body; turn an input error into one line on stderr and an exit code."""
    try:
        return body() or 0
    except BrokenPipeError:  # the reader of our output went away (`mom-flops ... | head`): nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit flush does not fail again
        return 0
    except CommandFailed as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return FAILED
    except INPUT_ERRORS as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
