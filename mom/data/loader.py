"""Training data loader: tokenized Parquet corpus -> packed ``(b, l)`` batches, deterministic and resumable.

    loader = PackedLoader(DataConfig(path="data/small", seq_len=1024, batch_size=8), rank, world_size)
    batch = next(loader)          # dict of (b, l) tensors, see mom.data.packing
    state = loader.state_dict()   # save with the checkpoint; load_state_dict() resumes exactly here

Document order (epochs, shuffling, mixture weights, data-parallel ranks) is defined in ``mom.data.sampler``;
packing into rows in ``mom.data.packing``; reading ahead in a background thread in ``mom.data.prefetch``. See
docs/loading.md.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mom.data.kinds import KINDS
from mom.data.packing import Packer
from mom.data.sampler import DocumentSampler, RowGroup
from mom.utils.configio import from_dict, read_mapping
from mom.utils.errors import BadInputError

SHARD_SCHEMA = pa.schema(  # the columns of a corpus shard, as `mom-data build` writes them
    [
        ("input_ids", pa.list_(pa.int32())),
        ("modality_ids", pa.list_(pa.int8())),  # per token, as the model's ``modality_ids`` argument
        ("doc_id", pa.int64()),
        ("kind", pa.string()),
        ("source", pa.string()),
        ("meta", pa.string()),
    ]
)

SPLITS = ("train", "validation")
COLUMNS = ("input_ids", "doc_id", "kind")  # the columns the loader reads
BUILD_HINT = "corpus incomplete or not built: run `mom-data build ...` to (re)build it"
STATE_FORMAT = 1  # version of PackedLoader.state_dict()
MANIFEST_FORMAT, MANIFEST_VERSION = "mom-corpus", 1  # written by mom.data.build


# ---- config ------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """The ``data:`` section of a training recipe.

    Args:
        path: corpus directory (holds ``manifest.json``).
        split: ``"train"`` or ``"validation"``.
        seq_len: tokens per row.
        batch_size: rows per batch, per data-parallel rank (the micro-batch).
        seed: base seed of the document order; the epoch number is folded in.
        mixture: sampling weight per document kind: a kind of weight ``w`` appears ``w`` times per epoch in
            expectation (2.0 doubles it, 0.5 keeps half, 0 excludes it); kinds not listed get 1.0.
        shuffle: shuffle row groups and documents (``False``: corpus order, e.g. for evaluation).
        open_row_groups: row groups read and interleaved at once (the shuffle buffer; memory is this many
            row groups).
        drop_last: at the end of an epoch drop the tokens that do not fill a whole batch; ``False`` emits them
            as one last batch padded to full shape (``labels == -100`` at padding).
        num_epochs: stop after this many epochs (``None``: repeat forever, each epoch in a new order).
        return_doc_ids: add a ``doc_ids`` (b, l) int64 tensor to each batch (-1 at padding).
        prefetch: batches the trainer prepares ahead in a background thread (``mom.data.prefetch``; 0: read in
            the training loop's thread). Changes neither the batches nor the resume state.
    """

    path: str
    split: str = "train"
    seq_len: int = 2048
    batch_size: int = 8
    seed: int = 0
    mixture: dict[str, float] | None = None
    shuffle: bool = True
    open_row_groups: int = 4
    drop_last: bool = True
    num_epochs: int | None = None
    return_doc_ids: bool = False
    prefetch: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.path, os.PathLike):
            self.path = os.fspath(self.path)
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"path: must be a non-empty string, got {self.path!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split: must be one of {list(SPLITS)}, got {self.split!r}")
        for name in ("seq_len", "batch_size", "open_row_groups"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("seed", self.seed, minimum=0)
        _check_int("prefetch", self.prefetch, minimum=0)
        if self.num_epochs is not None:
            _check_int("num_epochs", self.num_epochs, minimum=1)
        for name in ("shuffle", "drop_last", "return_doc_ids"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be true or false, got {getattr(self, name)!r}")
        if self.mixture is not None:
            if not isinstance(self.mixture, dict):
                raise ValueError(f"mixture: must be a mapping of document kind to weight, got {self.mixture!r}")
            for kind, weight in self.mixture.items():
                if kind not in KINDS:
                    raise ValueError(f"mixture.{kind}: unknown document kind; valid kinds are {list(KINDS)}")
                if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                    raise ValueError(f"mixture.{kind}: weight must be a number, got {weight!r}")
                if weight < 0:
                    raise ValueError(f"mixture.{kind}: weight must be >= 0, got {weight}")
            self.mixture = {k: float(w) for k, w in self.mixture.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        """Build from a recipe's ``data:`` mapping; bad keys or types raise ``ValueError`` naming the key."""
        return from_dict(cls, d, "data")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")


# ---- corpus ------------------------------------------------------------------------------------
@dataclass
class Manifest:
    """The parts of ``<corpus>/manifest.json`` the loader needs."""

    root: Path
    modalities: tuple[str, ...]
    vocab_sizes: tuple[int, ...]
    shards: dict[str, list[str]]  # split -> shard paths relative to root

    @property
    def vocab_size(self) -> int:
        return sum(self.vocab_sizes)

    @property
    def vocab_offsets(self) -> tuple[int, ...]:
        return tuple(int(x) for x in np.cumsum((0,) + self.vocab_sizes[:-1]))


def read_manifest(root: str | os.PathLike) -> Manifest:
    """Read and check ``<root>/manifest.json`` (its presence marks a complete corpus)."""
    root = Path(root)
    path = root / "manifest.json"
    if not root.is_dir():
        raise FileNotFoundError(f"corpus directory {root} does not exist ({BUILD_HINT})")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {BUILD_HINT}")
    try:
        raw = read_mapping(path, "manifest")
    except (OSError, ValueError) as e:
        raise ValueError(f"{e}; {BUILD_HINT}") from e

    def get(key: str) -> Any:
        if key not in raw:
            raise ValueError(f"{path}: missing key {key!r}; {BUILD_HINT}")
        return raw[key]

    if get("format") != MANIFEST_FORMAT or get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"{path}: format {raw['format']!r} version {raw['version']!r}, this loader reads "
            f"{MANIFEST_FORMAT!r} version {MANIFEST_VERSION}"
        )
    modalities = get("modalities")
    if not isinstance(modalities, list) or not modalities or not all(isinstance(m, str) for m in modalities):
        raise ValueError(f"{path}: 'modalities' must be a non-empty list of names, got {modalities!r}")
    sizes = get("vocab_sizes")
    if (
        not isinstance(sizes, list)
        or len(sizes) != len(modalities)
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes)
    ):
        raise ValueError(f"{path}: 'vocab_sizes' must give a positive size per modality, got {sizes!r}")
    splits = get("splits")
    if not isinstance(splits, dict):
        raise ValueError(f"{path}: 'splits' must map split names to their shards")
    shards = {}
    for split, entry in splits.items():
        files = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise ValueError(f"{path}: 'splits.{split}.shards' must be a list of shard files")
        shards[split] = files
    return Manifest(root, tuple(modalities), tuple(sizes), shards)


def read_row_group(path: str | os.PathLike, index: int, manifest: Manifest) -> RowGroup:
    """Read one row group of a shard; token ids must lie in the manifest's unified vocabulary.

    Modality ids are derived from the vocabulary layout (the contract makes the ``modality_ids`` column equal to
    it), so that column is not read (nor is its name checked: corpora built before the column was renamed from
    ``modality`` load unchanged).
    """
    with pq.ParquetFile(path) as f:
        missing = [c for c in COLUMNS if c not in f.schema_arrow.names]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}")
        table = f.read_row_group(index, columns=list(COLUMNS))
    doc_ids = table.column("doc_id").to_numpy().astype(np.int64)  # (n,)
    ids, offsets = _flat_list(table.column("input_ids"), path, "input_ids")  # (t,), (n + 1,)
    bad = (ids < 0) | (ids >= manifest.vocab_size)
    if bad.any():
        pos = int(np.argmax(bad))
        doc = int(doc_ids[np.searchsorted(offsets, pos, side="right") - 1])
        raise BadInputError(
            str(path), f"doc_id {doc}: token id {int(ids[pos])} out of range [0, {manifest.vocab_size})"
        )
    modality = np.zeros(len(ids), dtype=np.int8)  # (t,) number of modality offsets each id is past
    for start in manifest.vocab_offsets[1:]:
        modality += ids >= start
    return RowGroup(ids, modality, offsets, doc_ids, table.column("kind").to_pylist())


def _flat_list(column: pa.ChunkedArray, path: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(values (t,), offsets (n + 1,) starting at 0) of a list column."""
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if array.null_count or array.values.null_count:
        raise BadInputError(str(path), f"column {name!r} has null entries")
    offsets = array.offsets.to_numpy().astype(np.int64)
    values = array.values.to_numpy()[offsets[0] : offsets[-1]]
    return values, offsets - offsets[0]


# ---- loader ------------------------------------------------------------------------------------
class PackedLoader:
    """Iterator of packed batches for one data-parallel rank; ``state_dict``/``load_state_dict`` resume exactly.

    Attributes:
        modalities, vocab_sizes: from the manifest, to check against the model config.
        sampler: the document order (``mom.data.sampler.DocumentSampler``).
        epoch: the epoch the next batch comes from (0-based).

    A corpus with other columns subclasses it (`mom.data.latent_corpus.TransfusionLoader`): it reads row groups
    (`read`) and packs documents (`new_packer`) its own way, and names its saved states (``STATE_KIND``).
    """

    STATE_KIND: str | None = None  # saved in state_dict (when set) and checked on load

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1) -> None:
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.manifest = read_manifest(cfg.path)
        self.modalities, self.vocab_sizes = self.manifest.modalities, self.manifest.vocab_sizes
        if cfg.split not in self.manifest.shards:
            raise ValueError(
                f"{cfg.path}/manifest.json lists no split {cfg.split!r}; it has {list(self.manifest.shards)}"
            )
        self.shard_paths = [self.manifest.root / s for s in self.manifest.shards[cfg.split]]
        row_groups = []
        for i, path in enumerate(self.shard_paths):
            if not path.is_file():
                raise FileNotFoundError(f"shard {path} listed in the manifest is missing ({BUILD_HINT})")
            try:
                n = pq.read_metadata(path).num_row_groups
            except (OSError, pa.ArrowException) as e:
                raise ValueError(f"shard {path} is not a readable Parquet file ({e}); {BUILD_HINT}") from e
            row_groups += [(i, j) for j in range(n)]
        self.sampler = DocumentSampler(
            row_groups,
            self.read,
            seed=cfg.seed,
            weights=cfg.mixture,
            shuffle=cfg.shuffle,
            open_row_groups=cfg.open_row_groups,
            rank=rank,
            world_size=world_size,
        )
        self.packer = self.new_packer()
        self._epoch_batches = 0  # batches emitted in the current epoch

    def read(self, shard: int, row_group: int) -> RowGroup:
        """Row group ``row_group`` of shard ``shard`` of this split, as documents."""
        return read_row_group(self.shard_paths[shard], row_group, self.manifest)

    def new_packer(self) -> Packer:
        """The packer of this loader's batches."""
        return Packer(self.cfg.seq_len, self.cfg.batch_size, self.cfg.return_doc_ids)

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        while not self.packer.has_batch():
            if self.cfg.num_epochs is not None and self.sampler.epoch >= self.cfg.num_epochs:
                raise StopIteration
            doc = next(self.sampler)
            if doc is not None:
                self.packer.add(doc)
                continue
            # end of an epoch: emit the padded tail, or drop it
            batch = None if self.cfg.drop_last else self.packer.pop_padded_batch()
            self.packer.clear()
            if batch is None and self._epoch_batches == 0:
                raise ValueError(
                    f"split {self.cfg.split!r} of {self.cfg.path} gives rank {self.rank} of {self.world_size} "
                    f"no batch of {self.cfg.batch_size}x{self.cfg.seq_len} tokens in an epoch; use a smaller "
                    "seq_len or batch_size, fewer ranks, drop_last: false, or more data"
                )
            self._epoch_batches = 0
            if batch is not None:
                return batch
        self._epoch_batches += 1
        return self.packer.pop_batch()

    # ---- resume --------------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        """What must match for a saved position to mean the same thing."""
        cfg = asdict(self.cfg)
        for key in ("path", "num_epochs", "return_doc_ids", "prefetch"):  # these may change between runs
            cfg.pop(key)
        shards = [str(s) for s in self.manifest.shards[self.cfg.split]]
        return {**cfg, "rank": self.rank, "world_size": self.world_size, "shards": shards}

    def state_dict(self) -> dict:
        """Exact position (plain Python values and tensors: safe for ``torch.load(weights_only=True)``)."""
        return {
            "format": STATE_FORMAT,
            **({"kind": self.STATE_KIND} if self.STATE_KIND else {}),
            "fingerprint": self._fingerprint(),
            "sampler": self.sampler.state_dict(),
            "packer": self.packer.state_dict(),
            "epoch_batches": self._epoch_batches,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()``; a state saved with a different data config raises ``ValueError``."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"loader state format {state.get('format')!r}, expected {STATE_FORMAT}")
        if state.get("kind") != self.STATE_KIND:
            raise ValueError(f"loader state of kind {state.get('kind')!r}, this loader's is {self.STATE_KIND!r} (saved "
                             "by another loader?)")
        saved, current = state["fingerprint"], self._fingerprint()
        for key in current:
            if saved.get(key) != current[key]:
                raise ValueError(
                    f"cannot resume the data loader: {key} was {saved.get(key)!r} when saved, now {current[key]!r}"
                )
        self.sampler.load_state_dict(state["sampler"])
        self.packer.load_state_dict(state["packer"])
        self._epoch_batches = int(state["epoch_batches"])
