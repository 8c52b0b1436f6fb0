"""Errors shared by the data pipeline, the tokenizers and the command lines (which report them in one line)."""

from __future__ import annotations


class MissingDependencyError(RuntimeError):
    """A package or program needed by a data source is not installed; the message says how to install it."""


class BadInputError(ValueError):
    """One input item (a file, a caption, a token id) is unusable.

    ``path`` names the offending file or item so that a skip summary or an error message can point at it.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
