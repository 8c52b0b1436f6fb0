"""Packing documents into fixed-length rows: the ``(b, l)`` training batch.

Documents are concatenated end to end and cut into rows of exactly ``seq_len`` tokens; a document that does not
fit in a row continues at the start of the next one. No padding is ever inserted between documents: the only
padding is the tail of the very last batch of an epoch (``Packer.pop_padded_batch``).

The batch is the shared contract between loader, model and trainer (all tensors ``(b, l)``):

- ``input_ids`` int64: unified token ids.
- ``labels`` int64: ``input_ids`` with ``-100`` at padding (the model shifts internally, Hugging Face convention).
- ``modality_ids`` int64: modality index of each token.
- ``seq_idx`` int32: index of the document within its row, starting at 0 and non-decreasing (mamba-ssm's
  convention, lets the model reset its state between documents). A document continuing from the previous row
  gets 0 in the new row.
- ``doc_ids`` int64 (only with ``return_doc_ids=True``): the ``doc_id`` of each token, ``-1`` at padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mom.tokenization.special import PAD_ID

IGNORE_INDEX = -100  # label ignored by torch.nn.functional.cross_entropy (its default ignore_index)
PAD_MODALITY = 0  # padding is a text token: text is modality 0


@dataclass
class Document:
    """One tokenized document (or the not-yet-packed remainder of one)."""

    input_ids: np.ndarray  # (n,) unified token ids
    modality: np.ndarray  # (n,) modality index of each token
    doc_id: int

    def __len__(self) -> int:
        return len(self.input_ids)


class Packer:
    """Buffers documents and cuts them into batches of ``batch_size`` rows of ``seq_len`` tokens.

    Usage: ``add`` documents until ``has_batch()``, then ``pop_batch()``; at the end of an epoch either
    ``pop_padded_batch()`` (keep the tail, padded) or ``clear()`` (drop it).
    """

    def __init__(self, seq_len: int, batch_size: int, return_doc_ids: bool = False) -> None:
        if seq_len <= 0 or batch_size <= 0:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.return_doc_ids = return_doc_ids
        self._docs: list[Document] = []  # buffered documents in order; the first may be a remainder
        self._num_tokens = 0

    @property
    def num_tokens(self) -> int:
        """Tokens buffered and not yet emitted."""
        return self._num_tokens

    @property
    def batch_tokens(self) -> int:
        return self.batch_size * self.seq_len

    def add(self, doc: Document) -> None:
        if len(doc.input_ids) != len(doc.modality):
            raise ValueError(f"doc_id {doc.doc_id}: {len(doc.input_ids)} input_ids but {len(doc.modality)} modalities")
        if len(doc) > 0:
            self._docs.append(doc)
            self._num_tokens += len(doc)

    def has_batch(self) -> bool:
        return self._num_tokens >= self.batch_tokens

    def pop_batch(self) -> dict[str, torch.Tensor]:
        """Emit one full batch; the rest of a document cut at the batch end stays buffered."""
        if not self.has_batch():
            raise RuntimeError(f"only {self._num_tokens} tokens buffered, a batch needs {self.batch_tokens}")
        return self._emit(self.batch_tokens)

    def pop_padded_batch(self) -> dict[str, torch.Tensor] | None:
        """Emit everything buffered as one batch padded to full shape, or ``None`` if nothing is buffered.

        Rows that would hold only padding are kept (all ``labels == -100``) so that every batch has the same
        ``(b, l)`` shape.
        """
        if self._num_tokens == 0:
            return None
        if self._num_tokens > self.batch_tokens:
            raise RuntimeError("more than one batch buffered: call pop_batch() first")
        return self._emit(self._num_tokens)

    def clear(self) -> None:
        self._docs, self._num_tokens = [], 0

    def _emit(self, n: int) -> dict[str, torch.Tensor]:
        """Take the first ``n`` buffered tokens and build a padded ``(b, l)`` batch from them."""
        taken: list[Document] = []
        remaining = n
        while remaining > 0:
            doc = self._docs[0]
            if len(doc) <= remaining:
                taken.append(self._docs.pop(0))
                remaining -= len(doc)
            else:  # cut the document: its head goes into this batch, its tail stays buffered
                taken.append(Document(doc.input_ids[:remaining], doc.modality[:remaining], doc.doc_id))
                self._docs[0] = Document(doc.input_ids[remaining:], doc.modality[remaining:], doc.doc_id)
                remaining = 0
        self._num_tokens -= n

        b, l, pad = self.batch_size, self.seq_len, self.batch_tokens - n
        ids = np.concatenate([d.input_ids for d in taken] + [np.full(pad, PAD_ID)]).astype(np.int64)  # (b*l,)
        modality = np.concatenate([d.modality for d in taken] + [np.full(pad, PAD_MODALITY)]).astype(np.int64)
        lengths = [len(d) for d in taken] + [pad]
        # Running document number of each token (padding counts as one more "document"), then per row
        # subtract the number of the row's first token: a document continuing from the previous row gets 0.
        doc_number = np.repeat(np.arange(len(lengths)), lengths).reshape(b, l)  # (b, l)
        seq_idx = doc_number - doc_number[:, :1]
        labels = ids.copy()
        labels[n:] = IGNORE_INDEX
        if pad:  # rows made only of padding
            seq_idx[n // l + (n % l > 0) :] = 0
        batch = {
            "input_ids": torch.from_numpy(ids.reshape(b, l)),
            "labels": torch.from_numpy(labels.reshape(b, l)),
            "modality_ids": torch.from_numpy(modality.reshape(b, l)),
            "seq_idx": torch.from_numpy(seq_idx.astype(np.int32)),
        }
        if self.return_doc_ids:
            doc_ids = np.repeat(np.array([d.doc_id for d in taken] + [-1], dtype=np.int64), lengths)
            batch["doc_ids"] = torch.from_numpy(doc_ids.reshape(b, l))
        return batch

    def state_dict(self) -> dict:
        """The buffered tokens, as tensors (safe for ``torch.load(weights_only=True)``)."""
        return {
            "docs": [
                {
                    "input_ids": torch.from_numpy(np.array(d.input_ids, dtype=np.int64)),
                    "modality": torch.from_numpy(np.array(d.modality, dtype=np.int64)),
                    "doc_id": int(d.doc_id),
                }
                for d in self._docs
            ]
        }

    def load_state_dict(self, state: dict) -> None:
        self.clear()
        for d in state["docs"]:
            self.add(Document(d["input_ids"].numpy(), d["modality"].numpy(), int(d["doc_id"])))
