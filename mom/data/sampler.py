"""Deterministic, resumable document order over the row groups of a corpus split.

The unit of reading is a Parquet row group (shards larger than memory are fine: at most ``open_row_groups`` row
groups are held at once). One epoch, with ``rng = default_rng([seed, epoch])``:

1. Mixture: a kind of weight ``w`` is read ``ceil(w)`` times per epoch ("copies"); in copy ``c`` a document is
   kept if ``c < floor(w)``, or if ``c == floor(w)`` and a seeded uniform draw is ``< w - floor(w)``. So each
   document of that kind appears ``w`` times per epoch in expectation (exactly ``w`` times for whole numbers);
   weight 0 drops the kind. Reading units are ``(row group, copy)`` pairs.
2. The units are permuted by ``rng``; the documents of each unit are permuted by their own generator
   ``default_rng([seed, epoch, shard, row_group, copy])``, so a unit's order never depends on reading history.
3. ``open_row_groups`` units are open at a time; each next document is taken from one of them chosen by
   ``rng``; an exhausted unit is replaced by the next one in the permutation.
4. Data-parallel sharding: the ``i``-th document of this global order (counting from 0 each epoch) belongs to
   rank ``i % world_size``. Every rank runs the same global order and keeps its own documents, so ranks are
   disjoint and together cover the epoch.

The state (epoch, position in the unit permutation, per open unit the number of documents taken, the generator
state, the document counter) is a few integers; restoring it re-reads only the open row groups.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mom.data.packing import Document


@dataclass
class RowGroup:
    """The documents of one row group, as flat arrays (the layout of a Parquet list column)."""

    input_ids: np.ndarray  # (t,) token ids of all documents, concatenated
    modality: np.ndarray  # (t,) modality index of each token
    offsets: np.ndarray  # (n + 1,) document i is [offsets[i], offsets[i + 1])
    doc_ids: np.ndarray  # (n,) int64
    kinds: list[str]  # (n,)

    def __len__(self) -> int:
        return len(self.doc_ids)

    def document(self, i: int) -> Document:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return Document(self.input_ids[start:end], self.modality[start:end], int(self.doc_ids[i]))


# (shard index, row group index) -> the row group's documents
ReadRowGroup = Callable[[int, int], RowGroup]


class _OpenUnit:
    """A row-group copy being read: its documents in epoch order and how many were taken."""

    def __init__(self, position: int, rows: RowGroup, order: np.ndarray, taken: int = 0) -> None:
        self.position = position  # index in the epoch's unit permutation
        self.rows = rows
        self.order = order  # (k,) row indices kept by the mixture, in reading order
        self.taken = taken


class DocumentSampler:
    """Yields this rank's documents in the seeded global order; ``None`` marks the end of each epoch.

    Args:
        row_groups: ``(shard index, row group index)`` of every row group of the split, in corpus order.
        read: reads one row group.
        seed: base seed; the epoch number is folded in.
        weights: mixture weight per document kind; kinds not listed get 1.0.
        shuffle: permute units and documents (``False``: corpus order, one unit open at a time).
        open_row_groups: number of units interleaved at once (the shuffle buffer, in row groups).
        rank, world_size: data-parallel position.
    """

    def __init__(
        self,
        row_groups: Sequence[tuple[int, int]],
        read: ReadRowGroup,
        seed: int = 0,
        weights: Mapping[str, float] | None = None,
        shuffle: bool = True,
        open_row_groups: int = 4,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if open_row_groups < 1:
            raise ValueError(f"open_row_groups: must be >= 1, got {open_row_groups}")
        self.row_groups = list(row_groups)
        self.read = read
        self.seed = seed
        self.weights = dict(weights or {})
        self.copies = max([1] + [math.ceil(w) for w in self.weights.values()])
        self.shuffle = shuffle
        self.open_row_groups = open_row_groups if shuffle else 1
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._start_epoch()

    # ---- epoch structure -----------------------------------------------------------------------
    def _start_epoch(self) -> None:
        self._rng = np.random.default_rng([self.seed, self.epoch])
        n_units = len(self.row_groups) * self.copies
        self._units = self._rng.permutation(n_units) if self.shuffle else np.arange(n_units)
        self._next_unit = 0  # position in self._units of the next unit to open
        self._open: list[_OpenUnit] = []
        self._index = 0  # documents of the global order drawn this epoch (all ranks)

    def _unit(self, position: int) -> tuple[int, int, int]:
        """(shard, row group, copy) of the unit at ``position`` of this epoch's permutation."""
        unit = int(self._units[position])
        copy, rg = divmod(unit, len(self.row_groups))
        return (*self.row_groups[rg], copy)

    def _open_unit(self, position: int, taken: int = 0) -> _OpenUnit:
        shard, row_group, copy = self._unit(position)
        rows = self.read(shard, row_group)
        rng = np.random.default_rng([self.seed, self.epoch, shard, row_group, copy])
        order = rng.permutation(len(rows)) if self.shuffle else np.arange(len(rows))
        draw = rng.random(len(rows))  # (n,) for fractional weights
        weight = np.array([self.weights.get(k, 1.0) for k in rows.kinds], dtype=np.float64)  # (n,)
        whole = np.floor(weight)
        keep = (copy < whole) | ((copy == whole) & (draw < weight - whole))
        return _OpenUnit(position, rows, order[keep[order]], taken)

    def _fill(self) -> None:
        """Open units until ``open_row_groups`` non-exhausted ones are open or the permutation is used up."""
        while len(self._open) < self.open_row_groups and self._next_unit < len(self._units):
            unit = self._open_unit(self._next_unit)
            self._next_unit += 1
            if len(unit.order) > 0:
                self._open.append(unit)

    # ---- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> DocumentSampler:
        return self

    def __next__(self) -> Document | None:
        """The next document of this rank, or ``None`` at the end of an epoch (the next call starts a new one)."""
        while True:
            self._fill()
            if not self._open:
                if self._index == 0:
                    raise ValueError(
                        "no documents to sample: the split is empty or the mixture gives weight 0 to every kind in it"
                    )
                self.epoch += 1
                self._start_epoch()
                return None
            j = int(self._rng.integers(len(self._open))) if len(self._open) > 1 else 0
            unit = self._open[j]
            row = int(unit.order[unit.taken])
            unit.taken += 1
            if unit.taken == len(unit.order):
                self._open.pop(j)
            index, self._index = self._index, self._index + 1
            if index % self.world_size == self.rank:
                return unit.rows.document(row)

    # ---- resume --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Exact position, as plain Python values."""
        return {
            "epoch": self.epoch,
            "next_unit": self._next_unit,
            "open": [[u.position, u.taken] for u in self._open],
            "index": self._index,
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self._start_epoch()  # rebuilds this epoch's unit permutation
        self._next_unit = int(state["next_unit"])
        self._index = int(state["index"])
        self._open = []
        for position, taken in state["open"]:
            unit = self._open_unit(int(position), int(taken))
            if not 0 <= unit.taken < len(unit.order):
                raise ValueError(f"sampler state does not match the corpus: open unit {position} at {taken}")
            self._open.append(unit)
        self._rng.bit_generator.state = state["rng"]
