"""The Transfusion setting's corpus: captioned images as continuous VAE latents beside the token stream, its builder
and its loader (docs/transfusion.md).

Documents (kinds ``image_caption`` / ``caption_image`` of `mom.data.kinds`)::

    <s> <image> IMG x n </image> caption </s>        or        <s> caption <image> IMG x n </image> </s>

``IMG`` is the one id of the ``image`` modality (the corpus's vocabulary is ``[text, image]`` with ``vocab_sizes
[V_text, 1]``); each of the ``n = (h'/p)^2`` image positions is one ``p x p`` patch of the image's latent. A shard has
the columns of `mom.data.loader.SHARD_SCHEMA` plus ``latents`` (list<float16>: the document's patches, ``n * c * p *
p`` numbers per image, images in order). The manifest (format ``mom-corpus`` 1, readable by `read_manifest`) has a
``latent`` entry (channels, patch size, latent size, image size). The builder is `mom.data.captioned`'s, shared with
the discrete setting's corpus of VQ codes.

The loader (`TransfusionLoader`, chosen by `mom.data.corpus.build_loader` for such a corpus) uses the sampler of
`mom.data.sampler` for the document order and packs rows of ``seq_len`` tokens like `mom.data.packing`, except that a
row is never cut inside an image span (``<image> .. </image>`` stays whole; the rest of a row that cannot hold the
next piece is padding). A batch adds to the usual keys ``latents`` (b, l, c * p * p) float32 (zero off images) and
``image_mask`` (b, l) bool.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mom.data.captioned import Encoded, build_captioned_corpus
from mom.data.loader import (
    BUILD_HINT,
    SHARD_SCHEMA,
    DataConfig,
    Manifest,
    PackedLoader,
    read_row_group,
)
from mom.data.packing import IGNORE_INDEX, PAD_MODALITY, Document
from mom.data.sampler import RowGroup
from mom.tokenization.special import BOI_ID, PAD_ID
from mom.utils.errors import BadInputError
from mom.utils.patches import patchify

LATENT_SCHEMA = SHARD_SCHEMA.append(pa.field("latents", pa.list_(pa.float16())))


@dataclass(frozen=True)
class LatentSpec:
    """The ``latent`` entry of the manifest: how image positions hold latent patches."""

    channels: int
    patch_size: int
    latent_size: int
    image_size: int

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch_size**2

    @property
    def patches_per_image(self) -> int:
        return (self.latent_size // self.patch_size) ** 2


def latent_spec(root: str | Path) -> LatentSpec | None:
    """The corpus's `LatentSpec`, or None for a corpus of discrete tokens."""
    raw = json.loads((Path(root) / "manifest.json").read_text())
    entry = raw.get("latent")
    if entry is None:
        return None
    try:
        return LatentSpec(**{k: int(entry[k]) for k in ("channels", "patch_size", "latent_size", "image_size")})
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{root}/manifest.json: bad 'latent' entry {entry!r} ({e}); {BUILD_HINT}") from e


def check_latent_model(config: Any, root: str | Path) -> None:
    """A Transfusion model config (`mom.model.transfusion.MoMTransfusionConfig`) must take the corpus's latents: the
    same channels, latent size and patch size (``ValueError`` naming the fields otherwise)."""
    spec = latent_spec(root)
    if spec is None:
        raise ValueError(f"model.setting is transfusion but {root} holds discrete tokens, not image latents: build a "
                         "latent corpus (mom-data latents) or train another setting")
    model = (config.latent_channels, config.latent_size, config.patch_size)
    corpus = (spec.channels, spec.latent_size, spec.patch_size)
    if model != corpus:
        raise ValueError(f"model.latent_channels / latent_size / patch_size {list(model)} do not match the corpus "
                         f"{root} ({list(corpus)}, its manifest's 'latent' entry)")


# ---- documents -------------------------------------------------------------------------------------------------------
@dataclass
class LatentDocument(Document):
    """A `Document` with the latent patches of its image positions: ``latents`` (n_image_positions, patch_dim)."""

    latents: np.ndarray = None  # type: ignore[assignment]
    image_id: int = -1

    def cut(self, k: int) -> tuple[LatentDocument, LatentDocument]:
        """(first ``k`` tokens, the rest), the latents split with them."""
        n = int((self.input_ids[:k] == self.image_id).sum())
        head = LatentDocument(self.input_ids[:k], self.modality[:k], self.doc_id, self.latents[:n], self.image_id)
        tail = LatentDocument(self.input_ids[k:], self.modality[k:], self.doc_id, self.latents[n:], self.image_id)
        return head, tail

    def last_cut(self, limit: int) -> int:
        """The largest ``k <= limit`` such that cutting before token ``k`` leaves every image span whole (0: none)."""
        ids = self.input_ids
        for k in range(min(limit, len(ids) - 1), 0, -1):
            if ids[k - 1] != BOI_ID and ids[k - 1] != self.image_id:
                return k
        return 0


@dataclass
class LatentRowGroup(RowGroup):
    """A row group with each document's latents (``latents[i]``: (n_i, patch_dim) float16)."""

    latents: list[np.ndarray] = None  # type: ignore[assignment]
    image_id: int = -1

    def document(self, i: int) -> LatentDocument:
        doc = super().document(i)
        return LatentDocument(doc.input_ids, doc.modality, doc.doc_id, self.latents[i], self.image_id)


def read_latent_row_group(path: str | Path, index: int, manifest: Manifest, spec: LatentSpec) -> LatentRowGroup:
    """One row group of a latent shard; each document's image positions must match its latents."""
    rows = read_row_group(path, index, manifest)
    with pq.ParquetFile(path) as f:
        if "latents" not in f.schema_arrow.names:
            raise ValueError(f"{path}: missing column 'latents' (not a Transfusion corpus shard); {BUILD_HINT}")
        column = f.read_row_group(index, columns=["latents"]).column("latents").combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False)
    image_id = manifest.vocab_offsets[manifest.modalities.index("image")]
    latents = []
    for i in range(len(rows)):
        flat = values[offsets[i] : offsets[i + 1]]
        n = int((rows.input_ids[rows.offsets[i] : rows.offsets[i + 1]] == image_id).sum())
        if flat.size != n * spec.patch_dim:
            raise BadInputError(str(path), f"doc_id {int(rows.doc_ids[i])}: {n} image positions need "
                                f"{n * spec.patch_dim} latent numbers ({spec.patch_dim} each), the shard has "
                                f"{flat.size}: image span length and latents mismatch")
        latents.append(flat.reshape(n, spec.patch_dim))
    return LatentRowGroup(rows.input_ids, rows.modality, rows.offsets, rows.doc_ids, rows.kinds, latents, image_id)


# ---- packing ---------------------------------------------------------------------------------------------------------
class LatentPacker:
    """Cuts documents into rows of ``seq_len`` tokens, never inside an image span, and emits ``(b, l)`` batches."""

    def __init__(self, seq_len: int, batch_size: int, patch_dim: int, return_doc_ids: bool = False) -> None:
        self.seq_len, self.batch_size, self.patch_dim = seq_len, batch_size, patch_dim
        self.return_doc_ids = return_doc_ids
        self.rows: list[list[LatentDocument]] = []  # full (closed) rows
        self.current: list[LatentDocument] = []  # the row being filled
        self.fill = 0

    def add(self, doc: LatentDocument) -> None:
        while len(doc):
            space = self.seq_len - self.fill
            if len(doc) <= space:
                self.current.append(doc)
                self.fill += len(doc)
                if self.fill == self.seq_len:
                    self._close_row()
                return
            k = doc.last_cut(space)
            if k == 0:
                if self.fill == 0:
                    raise ValueError(f"doc_id {doc.doc_id}: an image span of {len(doc)} or more tokens does not fit "
                                     f"in a row of data.seq_len={self.seq_len}; raise seq_len")
                self._close_row()
                continue
            head, doc = doc.cut(k)
            self.current.append(head)
            self._close_row()

    def _close_row(self) -> None:
        self.rows.append(self.current)
        self.current, self.fill = [], 0

    def has_batch(self) -> bool:
        return len(self.rows) >= self.batch_size

    def pop_batch(self) -> dict[str, torch.Tensor]:
        rows, self.rows = self.rows[: self.batch_size], self.rows[self.batch_size :]
        return self._emit(rows)

    def pop_padded_batch(self) -> dict[str, torch.Tensor] | None:
        """Everything buffered as one batch, padded (rows of padding added); None if nothing is buffered."""
        if self.current:
            self._close_row()
        if not self.rows:
            return None
        rows, self.rows = self.rows + [[]] * (self.batch_size - len(self.rows)), []
        return self._emit(rows)

    def clear(self) -> None:
        self.rows, self.current, self.fill = [], [], 0

    def _emit(self, rows: list[list[LatentDocument]]) -> dict[str, torch.Tensor]:
        b, l, D = self.batch_size, self.seq_len, self.patch_dim
        ids = np.full((b, l), PAD_ID, dtype=np.int64)
        modality = np.full((b, l), PAD_MODALITY, dtype=np.int64)
        labels = np.full((b, l), IGNORE_INDEX, dtype=np.int64)
        seq_idx = np.zeros((b, l), dtype=np.int32)
        doc_ids = np.full((b, l), -1, dtype=np.int64)
        latents = np.zeros((b, l, D), dtype=np.float32)
        mask = np.zeros((b, l), dtype=bool)
        for r, row in enumerate(rows):
            start = 0
            for j, doc in enumerate(row):
                end = start + len(doc)
                ids[r, start:end] = doc.input_ids
                labels[r, start:end] = doc.input_ids
                modality[r, start:end] = doc.modality
                seq_idx[r, start:end] = j
                doc_ids[r, start:end] = doc.doc_id
                image = doc.input_ids == doc.image_id
                mask[r, start:end] = image
                latents[r, start:end][image] = doc.latents
                start = end
            seq_idx[r, start:] = len(row)  # the padding counts as one more document, as in mom.data.packing
        batch = {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "modality_ids": torch.from_numpy(modality),
            "seq_idx": torch.from_numpy(seq_idx),
            "latents": torch.from_numpy(latents),
            "image_mask": torch.from_numpy(mask),
        }
        if self.return_doc_ids:
            batch["doc_ids"] = torch.from_numpy(doc_ids)
        return batch

    def state_dict(self) -> dict:
        def pack(doc: LatentDocument) -> dict:
            return {"input_ids": torch.from_numpy(np.array(doc.input_ids, dtype=np.int64)),
                    "modality": torch.from_numpy(np.array(doc.modality, dtype=np.int64)),
                    "latents": torch.from_numpy(np.array(doc.latents, dtype=np.float16)),
                    "doc_id": int(doc.doc_id), "image_id": int(doc.image_id)}

        return {"rows": [[pack(d) for d in row] for row in self.rows], "current": [pack(d) for d in self.current]}

    def load_state_dict(self, state: dict) -> None:
        def unpack(d: dict) -> LatentDocument:
            return LatentDocument(d["input_ids"].numpy(), d["modality"].numpy(), int(d["doc_id"]),
                                  d["latents"].numpy(), int(d["image_id"]))

        self.rows = [[unpack(d) for d in row] for row in state["rows"]]
        self.current = [unpack(d) for d in state["current"]]
        self.fill = sum(len(d) for d in self.current)


# ---- loader ----------------------------------------------------------------------------------------------------------
class TransfusionLoader(PackedLoader):
    """`mom.data.loader.PackedLoader` over a latent corpus: its rows carry each image position's latent patch, and its
    batches add ``latents`` (b, l, patch_dim) and ``image_mask`` (b, l) (`LatentPacker`)."""

    STATE_KIND = "latent"

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1) -> None:
        self.spec = latent_spec(cfg.path)
        if self.spec is None:
            raise ValueError(f"{cfg.path} is not a Transfusion (latent) corpus: its manifest has no 'latent' entry")
        super().__init__(cfg, rank, world_size)
        if "image" not in self.manifest.modalities:
            raise ValueError(f"{cfg.path}/manifest.json: a latent corpus needs an 'image' modality")

    def read(self, shard: int, row_group: int) -> RowGroup:
        return read_latent_row_group(self.shard_paths[shard], row_group, self.manifest, self.spec)

    def new_packer(self) -> LatentPacker:
        return LatentPacker(self.cfg.seq_len, self.cfg.batch_size, self.spec.patch_dim, self.cfg.return_doc_ids)


# ---- building --------------------------------------------------------------------------------------------------------
def build_latent_corpus(records: Iterable[Any], vae: Any, tokenizer: Any, out: str | Path, *, patch_size: int,
                        **options: Any) -> dict:
    """The Transfusion setting's corpus (`mom.data.captioned.build_captioned_corpus`): each image as the ``p x p``
    patches of its latent from ``vae`` (`mom.tokenization.vae.ImageVAE`'s interface), one ``IMG`` position (the
    image modality's one id, after the text vocabulary) per patch, the patches in the ``latents`` column.
    ``options``: `build_captioned_corpus`'s keywords (``text_from``, ``caption_first``, ``validation_fraction``,
    ``seed``, ``batch_size``, ``row_group_size``, ``name``)."""
    size = int(vae.config.image_size)
    spec = LatentSpec(int(vae.config.latent_channels), int(patch_size), int(vae.latent_size), size)
    if spec.latent_size % spec.patch_size:
        raise ValueError(f"patch_size {patch_size} does not divide the VAE's latent size {spec.latent_size}")
    text_vocab = int(tokenizer.vocab_sizes[0])
    span = np.full(spec.patches_per_image, text_vocab, dtype=np.int64)  # IMG x n

    def encode(images: np.ndarray) -> list[Encoded]:
        patches = patchify(vae.encode(images).float().cpu(), spec.patch_size).numpy().astype(np.float16)  # (n, L, D)
        return [(span, {"latents": latent.reshape(-1)}) for latent in patches]

    fields = {"vocab_sizes": [text_vocab, 1],
              "columns": "input_ids list<int32>, modality_ids list<int8>, doc_id int64, kind, source, meta (JSON) "
                         "strings, latents list<float16> (each image position's latent patch, in order)",
              "latent": asdict(spec) | {"patch_dim": spec.patch_dim, "patches_per_image": spec.patches_per_image}}
    return build_captioned_corpus(records, encode, tokenizer, out, image_size=size, manifest_fields=fields,
                                  schema=LATENT_SCHEMA, text_extra={"latents": np.zeros(0, dtype=np.float16)},
                                  **{"name": "latent", **options})
