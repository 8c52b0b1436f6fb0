"""`mom.data.latent_corpus`: building a latent corpus with a VAE, loading it (whole image spans, latents where the
image positions are, exact resume), and clear errors."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import TinyVAE, tiny_transfusion_config

from mom.data.corpus import build_loader
from mom.data.images import iter_image_records
from mom.data.latent_corpus import (
    LatentDocument,
    LatentPacker,
    TransfusionLoader,
    build_latent_corpus,
    check_latent_model,
)
from mom.data.loader import DataConfig, PackedLoader
from mom.tokenization.multimodal import MultimodalTokenizer
from mom.tokenization.special import BOI_ID, EOI_ID
from mom.utils.errors import BadInputError
from mom.utils.patches import patchify

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "data" / "small" / "raw" / "images"
TOKENIZERS = ROOT / "tokenizers" / "small"
IMG = 2048  # the image modality's one id: after tokenizers/small's 2048 text ids


def _raise(error):
    raise error


def records(limit=24):
    return list(iter_image_records("folder", path=str(IMAGES), size=16, limit=limit, on_error=_raise))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("latent") / "corpus"
    build_latent_corpus(records(), TinyVAE(16), MultimodalTokenizer.load(TOKENIZERS), out, patch_size=2,
                        validation_fraction=0.2, seed=0)
    return out


def test_manifest_and_documents(corpus):
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["modalities"] == ["text", "image"] and manifest["vocab_sizes"] == [2048, 1]
    assert manifest["latent"] == {"channels": 4, "patch_size": 2, "latent_size": 4, "image_size": 16,
                                  "patch_dim": 16, "patches_per_image": 4}
    table = pq.read_table(corpus / "train" / "shard-00000.parquet")
    row = table.slice(0, 1).to_pylist()[0]
    ids = np.asarray(row["input_ids"])
    start = int(np.flatnonzero(ids == BOI_ID)[0])
    assert ids[0] == 2 and ids[-1] == 3 and list(ids[start + 1 : start + 6]) == [IMG] * 4 + [EOI_ID]
    assert row["kind"] in ("image_caption", "caption_image") and len(row["latents"]) == 4 * 16


def test_loader_batches_hold_the_latents_of_whole_images(corpus):
    cfg = DataConfig(path=str(corpus), seq_len=32, batch_size=2, return_doc_ids=True)
    loader = build_loader(cfg)
    assert isinstance(loader, TransfusionLoader)
    table = pq.read_table(corpus / "train" / "shard-00000.parquet")
    latents_of = {d["doc_id"]: np.asarray(d["latents"], dtype=np.float32).reshape(-1, 16) for d in table.to_pylist()}
    for _ in range(4):
        batch = next(loader)
        assert batch["latents"].shape == (2, 32, 16) and batch["image_mask"].dtype == torch.bool
        assert torch.equal(batch["image_mask"], batch["input_ids"] == IMG)
        for r in range(2):
            ids, mask = batch["input_ids"][r], batch["image_mask"][r]
            for start in torch.nonzero(ids == BOI_ID).flatten().tolist():  # every image span is whole in its row
                assert ids[start + 1 : start + 5].tolist() == [IMG] * 4 and ids[start + 5] == EOI_ID
                doc = int(batch["doc_ids"][r, start])
                assert torch.equal(batch["latents"][r, start + 1 : start + 5], torch.from_numpy(latents_of[doc]))
            assert bool((batch["latents"][r][~mask] == 0).all())


def test_latents_are_the_vae_patches(corpus):
    vae, recs = TinyVAE(16), records()
    table = pq.read_table(corpus / "train" / "shard-00000.parquet").to_pylist()
    table += pq.read_table(corpus / "validation" / "shard-00000.parquet").to_pylist()
    by_id = {json.loads(d["meta"])["id"]: d for d in table}
    rec = recs[3]
    want = patchify(vae.encode(np.asarray(rec.image)[None]), 2)[0].half().float()
    got = torch.tensor(by_id[rec.meta["id"]]["latents"], dtype=torch.float32).view(4, 16)
    assert torch.equal(got, want)



def test_resume_gives_the_same_next_batch(corpus):
    cfg = DataConfig(path=str(corpus), seq_len=32, batch_size=2)
    loader = build_loader(cfg)
    for _ in range(3):
        next(loader)
    state = loader.state_dict()
    want = next(loader)
    again = build_loader(cfg)
    again.load_state_dict(state)
    got = next(again)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_discrete_corpus_keeps_its_loader():
    assert isinstance(build_loader(DataConfig(path=str(ROOT / "data" / "small"), seq_len=32, batch_size=2)),
                      PackedLoader)


def test_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match="latent_channels / latent_size / patch_size"):
        check_latent_model(tiny_transfusion_config(latent_size=8), corpus)
    check_latent_model(tiny_transfusion_config(), corpus)  # 4 channels, 4x4, 2x2 patches: matches
    with pytest.raises(ValueError, match="discrete tokens"):
        check_latent_model(tiny_transfusion_config(), ROOT / "data" / "small")
    packer = LatentPacker(seq_len=4, batch_size=1, patch_dim=16)
    ids = np.array([2, BOI_ID, IMG, IMG, IMG, IMG, EOI_ID, 3])
    with pytest.raises(ValueError, match="does not fit in a row of data.seq_len=4"):
        packer.add(LatentDocument(ids, (ids == IMG).astype(np.int64), 0, np.zeros((4, 16), np.float16), IMG))
    with pytest.raises(FileExistsError):
        build_latent_corpus([], TinyVAE(16), MultimodalTokenizer.load(TOKENIZERS), corpus, patch_size=2)
    # a shard whose latents do not cover its image positions
    bad = tmp_path / "bad"
    (bad / "train").mkdir(parents=True)
    (bad / "manifest.json").write_text((corpus / "manifest.json").read_text())
    table = pq.read_table(corpus / "train" / "shard-00000.parquet")
    rows = table.to_pylist()
    rows[0]["latents"] = rows[0]["latents"][:-16]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), bad / "train" / "shard-00000.parquet")
    with pytest.raises(BadInputError, match="image span length and latents mismatch"):
        next(build_loader(DataConfig(path=str(bad), seq_len=32, batch_size=1, shuffle=False)))
