"""Loader: streaming Parquet reading, deterministic order, rank sharding, mixture weights, exact resume, errors."""

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mom.data import loader as loader_module
from mom.data.corpus import build_loader
from mom.data.kinds import KINDS
from mom.data.loader import SHARD_SCHEMA, DataConfig
from mom.data.packing import IGNORE_INDEX

MODALITIES = ["text", "image", "speech"]
VOCAB_SIZES = [40, 16, 8]  # unified ids: text [0, 40), image [40, 56), speech [56, 64)
OFFSETS = [0, 40, 56]
SMALL_CORPUS = Path(__file__).resolve().parents[2] / "data" / "small"


def make_docs(n, seed=0, max_len=30, first_id=0):
    """``n`` synthetic documents (BOS ... EOS), kinds cycling through the contract's kinds."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        mods = rng.integers(0, 3, int(rng.integers(1, max_len)))
        body = [OFFSETS[m] + int(rng.integers(8 if m == 0 else 0, VOCAB_SIZES[m])) for m in mods]
        ids = [2] + body + [3]
        docs.append(
            {
                "input_ids": ids,
                "modality_ids": [0] + mods.tolist() + [0],
                "doc_id": first_id + i,
                "kind": KINDS[i % len(KINDS)],
                "source": "synthetic",
                "meta": "{}",
            }
        )
    return docs


def write_corpus(root, train_docs, val_docs=(), shards=2, row_group_size=8):
    """A corpus in the contracted layout: <root>/<split>/shard-XXXXX.parquet, manifest.json written last."""
    root = Path(root)
    manifest = {
        "format": "mom-corpus",
        "version": 1,
        "modalities": MODALITIES,
        "vocab_sizes": VOCAB_SIZES,
        "splits": {},
    }
    for split, docs in (("train", train_docs), ("validation", val_docs)):
        (root / split).mkdir(parents=True, exist_ok=True)
        names = []
        for s, part in enumerate(np.array_split(np.arange(len(docs)), shards)):
            name = f"{split}/shard-{s:05d}.parquet"
            table = pa.Table.from_pylist([docs[i] for i in part], schema=SHARD_SCHEMA)
            pq.write_table(table, root / name, row_group_size=row_group_size)
            names.append(name)
        manifest["splits"][split] = {"shards": names, "documents": len(docs)}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = make_docs(60)
    return write_corpus(tmp_path_factory.mktemp("corpus"), docs, make_docs(6, seed=1, first_id=1000)), docs


def cfg(root, **kw):
    return DataConfig(path=str(root), **{"seq_len": 16, "batch_size": 2, "open_row_groups": 3, **kw})


def epoch_docs(loader):
    """The documents of this rank's first epoch, in order, from a fresh copy of its sampler."""
    fresh = build_loader(loader.cfg, loader.rank, loader.world_size).sampler
    return list(iter(lambda: next(fresh), None))


def batches(loader, n):
    return [next(loader) for _ in range(n)]


def same(xs, ys):
    return len(xs) == len(ys) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(xs, ys)
    )


# ---- config ------------------------------------------------------------------------------------
def test_config_validation(tmp_path):
    c = DataConfig.from_dict({"path": "x", "seq_len": 8, "mixture": {"text": 1, "image_caption": 2.5}})
    assert c.seq_len == 8 and c.mixture == {"text": 1.0, "image_caption": 2.5}
    with pytest.raises(ValueError, match="data.batchsize"):
        DataConfig.from_dict({"path": "x", "batchsize": 4})
    with pytest.raises(ValueError, match="data.path"):
        DataConfig.from_dict({"seq_len": 4})
    with pytest.raises(ValueError, match="seq_len"):
        DataConfig(path="x", seq_len="128")
    with pytest.raises(ValueError, match="shuffle"):
        DataConfig(path="x", shuffle="yes")
    with pytest.raises(ValueError, match="split"):
        DataConfig(path="x", split="test")
    with pytest.raises(ValueError, match="mixture.images"):
        DataConfig(path="x", mixture={"images": 1.0})
    with pytest.raises(ValueError, match="mixture.text"):
        DataConfig(path="x", mixture={"text": -1.0})


# ---- reading and packing -----------------------------------------------------------------------
def test_epoch_covers_every_document_once_and_packs_exactly(corpus):
    root, docs = corpus
    loader = build_loader(cfg(root, drop_last=False, num_epochs=1, return_doc_ids=True))
    assert loader.modalities == tuple(MODALITIES) and loader.vocab_sizes == tuple(VOCAB_SIZES)
    order = epoch_docs(loader)
    assert sorted(d.doc_id for d in order) == [d["doc_id"] for d in docs]  # each document exactly once
    by_id = {d["doc_id"]: d for d in docs}
    for d in order:  # contents are the corpus's
        assert d.input_ids.tolist() == by_id[d.doc_id]["input_ids"]
        assert d.modality.tolist() == by_id[d.doc_id]["modality_ids"]
    out = list(loader)  # stops after one epoch
    labels = torch.cat([b["labels"].flatten() for b in out])
    real = labels != IGNORE_INDEX
    ids = torch.cat([b["input_ids"].flatten() for b in out])[real]
    assert ids.tolist() == np.concatenate([d.input_ids for d in order]).tolist()
    modality = torch.cat([b["modality_ids"].flatten() for b in out])[real]
    assert modality.tolist() == np.concatenate([d.modality for d in order]).tolist()
    assert not real[: int(real.sum())].logical_not().any()  # padding only at the very end


def test_drop_last_drops_only_the_tail(corpus):
    root, docs = corpus
    loader = build_loader(cfg(root, num_epochs=1))
    n_tokens = sum(len(d["input_ids"]) for d in docs)
    out = list(loader)
    assert all((b["labels"] != IGNORE_INDEX).all() for b in out)
    assert len(out) == n_tokens // (16 * 2)


def test_streams_row_groups_without_reading_whole_shards(tmp_path, monkeypatch):
    docs = make_docs(80, seed=3)
    root = write_corpus(tmp_path, docs, shards=1, row_group_size=5)  # one shard of 16 row groups
    assert pq.read_metadata(root / "train" / "shard-00000.parquet").num_row_groups == 16

    def forbidden(*args, **kwargs):
        raise AssertionError("the loader must not read whole tables")

    monkeypatch.setattr(pq, "read_table", forbidden)
    monkeypatch.setattr(pq.ParquetFile, "read", forbidden)
    reads = []
    real_read = loader_module.read_row_group
    monkeypatch.setattr(loader_module, "read_row_group", lambda path, i, m: reads.append(i) or real_read(path, i, m))
    loader = build_loader(cfg(root, open_row_groups=2, num_epochs=1, drop_last=False))
    for _ in loader:
        assert len(loader.sampler._open) <= 2  # at most two row groups held at any time
    assert sorted(reads) == list(range(16))  # each row group read once, one at a time


# ---- order -------------------------------------------------------------------------------------
def test_seeded_order(corpus):
    root, _ = corpus
    ids = lambda **kw: [d.doc_id for d in epoch_docs(build_loader(cfg(root, **kw)))]  # noqa: E731
    assert ids(seed=1) == ids(seed=1)
    assert ids(seed=1) != ids(seed=2)
    assert ids(shuffle=False) == list(range(60))
    sampler = build_loader(cfg(root, seed=1)).sampler
    first = [d.doc_id for d in iter(lambda: next(sampler), None)]
    second = [d.doc_id for d in iter(lambda: next(sampler), None)]
    assert sorted(first) == sorted(second) and first != second  # each epoch a new permutation


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_rank_shards_disjoint_and_covering(corpus, world_size):
    root, docs = corpus
    shards = [[d.doc_id for d in epoch_docs(build_loader(cfg(root), r, world_size))] for r in range(world_size)]
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) and sorted(flat) == [d["doc_id"] for d in docs]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced in documents
    with pytest.raises(ValueError, match="rank"):
        build_loader(cfg(root), world_size, world_size)


def test_mixture_weights_set_kind_frequencies(tmp_path):
    docs = make_docs(600, seed=4, max_len=4)  # 100 documents of each kind
    root = write_corpus(tmp_path, docs, shards=3, row_group_size=50)
    weights = {"text": 2.0, "image_caption": 0.5, "caption_image": 0.0, "mixed": 1.5}
    sampler = build_loader(cfg(root, mixture=weights)).sampler
    counts = Counter()
    kind = {d["doc_id"]: d["kind"] for d in docs}
    for _ in range(4):  # four epochs
        counts.update(kind[d.doc_id] for d in iter(lambda: next(sampler), None))
    assert counts["text"] == 4 * 200  # whole weights are exact
    assert counts["caption_image"] == 0
    assert counts["speech_transcript"] == counts["transcript_speech"] == 4 * 100  # unlisted kinds weigh 1.0
    assert abs(counts["image_caption"] - 4 * 50) < 4 * 50 * 0.2  # fractional weights in expectation
    assert abs(counts["mixed"] - 4 * 150) < 4 * 150 * 0.1


def test_mixture_excluding_everything_is_an_error(corpus):
    root, _ = corpus
    with pytest.raises(ValueError, match="no documents"):
        next(build_loader(cfg(root, mixture={k: 0.0 for k in KINDS})))


# ---- resume ------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["early", "before_epoch_end", "second_epoch"])
@pytest.mark.parametrize("drop_last", [True, False])
def test_resume_gives_the_same_continuation(corpus, where, drop_last):
    root, _ = corpus
    c = cfg(root, mixture={"text": 1.5}, drop_last=drop_last, return_doc_ids=True, seq_len=13)
    per_epoch = len(list(build_loader(DataConfig(**{**c.__dict__, "num_epochs": 1}), rank=1, world_size=2)))
    skip = {"early": 1, "before_epoch_end": per_epoch - 2, "second_epoch": per_epoch + 3}[where]
    reference = build_loader(c, rank=1, world_size=2)
    batches(reference, skip)
    buffer = io.BytesIO()
    torch.save(reference.state_dict(), buffer)
    buffer.seek(0)
    resumed = build_loader(c, rank=1, world_size=2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.epoch == (1 if where == "second_epoch" else 0)
    assert same(batches(reference, 6), batches(resumed, 6))
    assert reference.epoch == resumed.epoch == (0 if where == "early" else 1)


def test_resume_with_a_different_config_is_refused(corpus):
    root, _ = corpus
    state = build_loader(cfg(root, seed=1)).state_dict()
    with pytest.raises(ValueError, match="seed"):
        build_loader(cfg(root, seed=2)).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        build_loader(cfg(root, seed=1), 0, 2).load_state_dict(state)


# ---- errors ------------------------------------------------------------------------------------
def test_missing_or_corrupt_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_loader(cfg(tmp_path / "nope"))
    root = write_corpus(tmp_path / "c", make_docs(10))
    (root / "manifest.json").rename(root / "manifest.json.bak")
    with pytest.raises(FileNotFoundError, match="mom-data build"):
        build_loader(cfg(root))
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest"):
        build_loader(cfg(root))
    manifest = json.loads((root / "manifest.json.bak").read_text())
    for key, value, message in [
        ("version", 2, "version 2"),
        ("vocab_sizes", [40, 16], "vocab_sizes"),
        ("splits", {"train": {}}, "splits.train.shards"),
    ]:
        (root / "manifest.json").write_text(json.dumps({**manifest, key: value}))
        with pytest.raises(ValueError, match=message):
            build_loader(cfg(root))
    (root / "manifest.json").write_text(json.dumps({**manifest, "splits": {"train": manifest["splits"]["train"]}}))
    with pytest.raises(ValueError, match="no split 'validation'"):
        build_loader(cfg(root, split="validation"))
    del manifest["modalities"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="missing key 'modalities'"):
        build_loader(cfg(root))
    (root / "manifest.json.bak").rename(root / "manifest.json")
    (root / "train" / "shard-00001.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="shard-00001.parquet"):
        build_loader(cfg(root))
    (root / "train" / "shard-00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="shard-00001.parquet"):
        build_loader(cfg(root))


def test_bad_token_ids_name_the_document(tmp_path):
    docs = make_docs(10)
    docs[7]["input_ids"][2] = 64  # unified vocabulary is [0, 64)
    root = write_corpus(tmp_path / "a", docs, shards=1)
    with pytest.raises(ValueError, match=r"doc_id 7: token id 64 out of range"):
        list(build_loader(cfg(root, num_epochs=1)))
    docs = make_docs(10)
    docs[3]["input_ids"][1] = -5
    root = write_corpus(tmp_path / "b", docs, shards=1)
    with pytest.raises(ValueError, match=r"doc_id 3: token id -5 out of range"):
        list(build_loader(cfg(root, num_epochs=1)))


def test_too_little_data_for_a_batch(tmp_path):
    root = write_corpus(tmp_path, make_docs(2, max_len=3), shards=1)
    with pytest.raises(ValueError, match="no batch"):
        next(build_loader(cfg(root, seq_len=64)))


# ---- the bundled corpus ------------------------------------------------------------------------
@pytest.mark.skipif(not (SMALL_CORPUS / "manifest.json").is_file(), reason="data/small not built yet")
@pytest.mark.parametrize("split", ["train", "validation"])
def test_small_corpus(split):
    loader = build_loader(DataConfig(path=str(SMALL_CORPUS), split=split, seq_len=256, batch_size=2, drop_last=False))
    batch = next(loader)
    assert batch["input_ids"].shape == (2, 256)
    assert int(batch["input_ids"].max()) < sum(loader.vocab_sizes)


def test_corpus_with_the_old_modality_column_loads_the_same_batches(corpus, tmp_path):
    """Corpora built before the column was renamed to ``modality_ids`` are read unchanged (the column is unused)."""
    root, _ = corpus
    old = tmp_path / "old"
    for path in root.rglob("*.parquet"):
        names = ["modality" if c == "modality_ids" else c for c in SHARD_SCHEMA.names]
        table = pq.read_table(path).rename_columns(names)
        (old / path.parent.name).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, old / path.parent.name / path.name, row_group_size=8)
    (old / "manifest.json").write_text((root / "manifest.json").read_text())
    new_batches = list(build_loader(cfg(root, num_epochs=1)))
    old_batches = list(build_loader(cfg(old, num_epochs=1)))
    assert len(new_batches) == len(old_batches) > 0
    for a, b in zip(new_batches, old_batches):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
