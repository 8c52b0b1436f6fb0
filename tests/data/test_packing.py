"""Packing documents into (b, l) rows: every token exactly once, seq_idx / modality_ids / labels correct."""

import numpy as np
import pytest
import torch

from mom.data.packing import IGNORE_INDEX, PAD_ID, Document, Packer


def make_docs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    docs = []
    for i, n in enumerate(lengths):
        ids = rng.integers(1, 100, n).astype(np.int32)
        docs.append(Document(ids, (ids % 3).astype(np.int8), doc_id=1000 + i))
    return docs


def pack_all(docs, seq_len, batch_size, pad_tail=True):
    packer = Packer(seq_len, batch_size, return_doc_ids=True)
    batches = []
    for doc in docs:
        packer.add(doc)
        while packer.has_batch():
            batches.append(packer.pop_batch())
    if pad_tail:
        tail = packer.pop_padded_batch()
        if tail is not None:
            batches.append(tail)
    return batches


def reference_seq_idx(doc_ids_row):
    """Per token: number of document changes since the start of the row (padding, -1, is a document too)."""
    out, current = [], 0
    for j, d in enumerate(doc_ids_row):
        if j > 0 and d != doc_ids_row[j - 1]:
            current += 1
        out.append(current)
    return out


@pytest.mark.parametrize("seq_len", [1, 5, 16, 64])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_every_token_exactly_once_in_order(seq_len, batch_size):
    docs = make_docs([7, 1, 30, 130, 2, 16, 45])  # includes documents longer than seq_len
    batches = pack_all(docs, seq_len, batch_size)
    for b in batches:
        assert b["input_ids"].shape == (batch_size, seq_len)
        assert {k: v.dtype for k, v in b.items()} == {
            "input_ids": torch.int64,
            "labels": torch.int64,
            "modality_ids": torch.int64,
            "seq_idx": torch.int32,
            "doc_ids": torch.int64,
        }
    ids = torch.cat([b["input_ids"].flatten() for b in batches])
    labels = torch.cat([b["labels"].flatten() for b in batches])
    real = labels != IGNORE_INDEX
    expected = np.concatenate([d.input_ids for d in docs])
    assert np.array_equal(ids[real].numpy(), expected)
    # padding only at the very end, and it is the pad token
    n = len(expected)
    assert real[:n].all() and not real[n:].any()
    assert (ids[n:] == PAD_ID).all()
    assert len(ids) - n < seq_len * batch_size  # less than one batch of padding


@pytest.mark.parametrize("seq_len", [4, 9, 32])
def test_seq_idx_modality_and_doc_ids(seq_len):
    docs = make_docs([3, 12, 1, 40, 5, 8], seed=1)
    batches = pack_all(docs, seq_len, batch_size=2)
    modality = np.concatenate([d.modality for d in docs])
    doc_ids = np.concatenate([np.full(len(d), d.doc_id) for d in docs])
    n = len(modality)
    got_mod = torch.cat([b["modality_ids"].flatten() for b in batches]).numpy()
    got_doc = torch.cat([b["doc_ids"].flatten() for b in batches]).numpy()
    assert np.array_equal(got_mod[:n], modality) and (got_mod[n:] == 0).all()
    assert np.array_equal(got_doc[:n], doc_ids) and (got_doc[n:] == -1).all()
    for b in batches:
        for row_doc, row_seq, row_lab in zip(b["doc_ids"].tolist(), b["seq_idx"].tolist(), b["labels"].tolist()):
            if all(x == IGNORE_INDEX for x in row_lab):
                assert row_seq == [0] * seq_len  # a row of padding only
            else:
                assert row_seq == reference_seq_idx(row_doc)  # starts at 0, +1 at each new document


def test_continuing_document_restarts_at_zero():
    packer = Packer(seq_len=4, batch_size=2)
    for doc in make_docs([3, 5]):
        packer.add(doc)
    batch = packer.pop_batch()  # exactly 8 tokens
    assert batch["seq_idx"].tolist() == [[0, 0, 0, 1], [0, 0, 0, 0]]
    assert packer.num_tokens == 0


def test_padded_tail_seq_idx_and_labels():
    packer = Packer(seq_len=4, batch_size=3)
    for doc in make_docs([2, 3]):
        packer.add(doc)
    batch = packer.pop_padded_batch()
    assert batch["seq_idx"].tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]]  # b continues, then padding
    assert (batch["labels"][1, 1:] == IGNORE_INDEX).all() and (batch["labels"][2] == IGNORE_INDEX).all()
    assert (batch["labels"][0] != IGNORE_INDEX).all() and batch["labels"][1, 0] != IGNORE_INDEX
    assert packer.pop_padded_batch() is None


def test_state_dict_round_trip_continues_identically():
    docs = make_docs([10, 23, 4, 17, 31, 9])
    a = Packer(seq_len=6, batch_size=2)
    for doc in docs[:3]:
        a.add(doc)
    a.pop_batch()  # leaves part of a document buffered
    b = Packer(seq_len=6, batch_size=2)
    b.load_state_dict(a.state_dict())
    for doc in docs[3:]:
        a.add(doc)
        b.add(doc)
    while a.has_batch():
        x, y = a.pop_batch(), b.pop_batch()
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not b.has_batch()


def test_rejects_inconsistent_document():
    with pytest.raises(ValueError, match="doc_id 7"):
        Packer(4, 1).add(Document(np.zeros(3, np.int32), np.zeros(2, np.int8), doc_id=7))
    with pytest.raises(RuntimeError, match="tokens buffered"):
        Packer(4, 1).pop_batch()
