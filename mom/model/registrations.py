"""A process-wide token that changes whenever a module or parameter is assigned to any module.

Caches keyed on a model's structure (a mixer's gathered fast-path weights, the decode graphs) stay valid while the
token is the same object: peft wrapping an expert, ``merge_and_unload``, ``load_state_dict(assign=True)`` or a plain
assignment each make a new one (torch's global registration hooks). A token is an object, not a count, so that a
copied or unpickled model's cached token never matches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Generic, TypeVar

import torch
import torch.nn as nn

_token = object()
T = TypeVar("T")


def _renew(module: nn.Module, name: str, value) -> None:
    global _token
    _token = object()


@functools.cache
def _watch() -> None:
    torch.nn.modules.module.register_module_module_registration_hook(_renew)
    torch.nn.modules.module.register_module_parameter_registration_hook(_renew)


def current() -> object:
    """The token now (the hooks are installed on first use)."""
    _watch()
    return _token


class Cached(Generic[T]):
    """A value built on first use and rebuilt after any module or parameter has been assigned anywhere (`current`
    changed): a mixer's gathered fast-path weights."""

    def __init__(self) -> None:
        self._token: object | None = None
        self._value: T | None = None

    def get(self, build: Callable[[], T]) -> T:
        if self._token is not current():
            self._value, self._token = build(), current()
        return self._value
