"""Utilities below every other layer: atomic writes, typed config I/O, error types, audio I/O and signal processing.

Imports nothing else of ``mom``.
"""
