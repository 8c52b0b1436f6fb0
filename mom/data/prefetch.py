"""Background prefetching of a resumable batch iterator: the next batches are read, packed and prepared (and pinned
in page-locked memory for an asynchronous copy to the GPU) in a worker thread while the caller trains on the
current one.

    batches = Prefetcher(build_loader(cfg), prepare=fn, depth=2, pin_memory=True, device=torch.device("cuda", 0))
    item = next(batches)          # fn(batch) of the next batch, its tensors pinned
    state = batches.state_dict()  # the position after the last batch returned: resumes exactly there

The worker runs ahead of the caller, so the wrapped loader's own position is up to ``depth + 1`` batches further;
each batch therefore travels with the loader's ``state_dict()`` taken right after it was read, and
``state_dict()`` returns the one of the last batch handed out (or the state at construction before any). Resuming a
`Prefetcher` (or the bare loader) from it gives exactly the batches that were not yet returned. An exception of the
loader (a bad corpus file, an epoch without a batch) is raised by ``next()`` in the caller's thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch


class ResumableIterator(Protocol):
    def __next__(self) -> Any: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class _End:
    """Put by the worker after the loader's StopIteration, or with the exception it raised."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class Prefetcher:
    """Iterator over ``prepare(batch)`` of ``loader``'s batches, ``depth`` of them prepared ahead in a thread.

    ``pin_memory``: tensors of the prepared item (top level of a dict) are copied into page-locked memory, so that
    ``tensor.to(device, non_blocking=True)`` neither waits for the device nor copies through a staging buffer;
    ``device``: the CUDA device whose context the worker uses for that. ``depth`` 0 reads in the caller's thread
    (no worker; same batches, same states).
    """

    def __init__(self, loader: ResumableIterator, prepare: Callable[[Any], Any] | None = None, depth: int = 2,
                 pin_memory: bool = False, device: torch.device | None = None) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"prefetch depth: must be an integer >= 0, got {depth!r}")
        self.loader = loader
        self.prepare = prepare if prepare is not None else (lambda batch: batch)
        self.depth, self.pin_memory, self.device = depth, pin_memory, device
        self._state = loader.state_dict()  # position after the last batch handed out
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._finished = False

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        if self.depth == 0:
            try:
                item = self._read()
            except StopIteration:
                self._finished = True
                raise
        else:
            if self._thread is None:
                self._start()
            item = self._queue.get()
            if isinstance(item, _End):
                self._finished = True
                self._thread.join()
                if item.error is not None:
                    raise item.error
                raise StopIteration
        prepared, self._state = item
        return prepared

    def state_dict(self) -> dict:
        """The position after the last batch returned by ``next()`` (the wrapped loader's state format)."""
        return self._state

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state`` (from ``state_dict()`` of this class or of the wrapped loader); batches prepared
        ahead are dropped."""
        self.close()
        self.loader.load_state_dict(state)
        self._state, self._finished = self.loader.state_dict(), False

    def close(self) -> None:
        """Stop the worker (it is restarted by the next ``next()``); also on leaving a ``with`` block."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a worker waiting for room in the queue
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
        self._thread, self._queue = None, None

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the daemon thread dies with it
            pass

    # ---- worker --------------------------------------------------------------------------------
    def _read(self) -> tuple[Any, dict]:
        """One prepared batch and the loader's position right after it (raises the loader's StopIteration)."""
        batch = next(self.loader)
        state = self.loader.state_dict()
        item = self.prepare(batch)
        if self.pin_memory:
            item = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in item.items()}
        return item, state

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._work, args=(self._queue, self._stop), name="mom-prefetch",
                                        daemon=True)
        self._thread.start()

    def _work(self, out: queue.Queue, stop: threading.Event) -> None:
        if self.pin_memory and self.device is not None and self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # pin through this rank's device context, not device 0's
        while not stop.is_set():
            try:
                item: Any = self._read()
            except StopIteration:
                item = _End()
            except BaseException as error:  # handed to the caller's thread
                item = _End(error)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _End):
                return
