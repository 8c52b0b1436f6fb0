"""Stopping a long loop cleanly on SIGINT / SIGTERM: the loop finishes its step, saves what it needs to continue, and
ends (`mom-train`'s checkpoints, the tokenizers' resume files)."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any


class StopSignals:
    """While active, SIGINT and SIGTERM ask the loop to stop after the current step (``requested()``; with several
    ranks at the next sync point, where the ranks agree); a second Ctrl-C abandons the step (KeyboardInterrupt). Only
    in the main thread (elsewhere signals cannot be caught)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool) -> None:
        self.announce = announce
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return  # e.g. the deepspeed launcher's SIGTERM after the terminal's SIGINT
        self.signum = signum
        if self.announce:
            name = signal.Signals(signum).name
            os.write(2, f"\n{name}: stopping after this step to save a checkpoint (Ctrl-C again abandons it)\n"
                     .encode())

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
