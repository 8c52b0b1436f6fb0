"""Training loop on CPU (one process): exact resume, crash mid-save, NaN skipping, metrics, export, optimizer groups."""

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import mom
from mom.cli.train import main
from mom.model import flops
from mom.train import checkpoint as ckpt_module
from mom.train.loop import train
from mom.train.metrics import read_jsonl
from mom.train.optim import lr_at, param_groups
from mom.train.recipe import OptimConfig, load_recipe
from mom.train.resolve import resolve_model_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny_mom.yaml"
SMALL_CORPUS = ROOT / "data" / "small"
# A model small enough for fast CPU steps; the corpus is the bundled one when it is built (else a synthetic one).
FAST = ["model.d_model=32", "model.n_layer=1", "model.d_state=8", "data.seq_len=64", "data.batch_size=2",
        "train.progress=false", "train.tensorboard=false", "train.eval_batches=2", "train.eval_every=0",
        "optim.lr=2e-2", "optim.warmup_steps=2"]  # a high learning rate: the loss visibly drops within a few steps


def synthetic_corpus(root: Path, n_train: int = 300, n_val: int = 30) -> Path:
    """A corpus in the contracted layout whose documents count upwards inside each modality span (learnable)."""
    modalities, vocab, offsets = ["text", "image", "speech"], [48, 32, 16], [0, 48, 80]
    kinds = ["text", "image_caption", "speech_transcript", "mixed"]
    rng = np.random.default_rng(0)

    def document(i):
        ids, mods = [2], [0]  # BOS
        for _ in range(int(rng.integers(1, 4))):
            m, start, n = int(rng.integers(0, 3)), int(rng.integers(0, 8)), int(rng.integers(8, 40))
            low = 8 if m == 0 else 0  # text ids 0..7 are special tokens
            ids += [offsets[m] + low + (start + k) % (vocab[m] - low) for k in range(n)]
            mods += [m] * n
        return {"input_ids": ids + [3], "modality_ids": mods + [0], "doc_id": i, "kind": kinds[i % 4],
                "source": "synthetic", "meta": "{}"}

    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("modality_ids", pa.list_(pa.int8())),
                        ("doc_id", pa.int64()), ("kind", pa.string()), ("source", pa.string()), ("meta", pa.string())])
    manifest = {"format": "mom-corpus", "version": 1, "modalities": modalities, "vocab_sizes": vocab, "splits": {}}
    first = 0
    for split, n in (("train", n_train), ("validation", n_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist([document(first + i) for i in range(n)], schema=schema)
        pq.write_table(table, root / split / "shard-00000.parquet", row_group_size=64)
        manifest["splits"][split] = {"shards": [f"{split}/shard-00000.parquet"], "documents": n}
        first += n
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def corpus_for_tests(tmp_path_factory) -> Path:
    if (SMALL_CORPUS / "manifest.json").is_file():
        return SMALL_CORPUS
    return synthetic_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return corpus_for_tests(tmp_path_factory)


def recipe(corpus, out_dir, *overrides):
    return load_recipe(TINY, [f"data.path={corpus}", f"train.out_dir={out_dir}", *FAST, *overrides])


def train_losses(out_dir):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_jsonl(Path(out_dir) / "metrics.jsonl")
            if r["split"] == "train"]


# ---- one uninterrupted reference run, shared ---------------------------------------------------------------------
RUN = ["train.max_steps=6", "train.grad_accum=2", "train.log_every=1", "train.save_every=2", "train.keep_last=2"]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    result = train(recipe(corpus, out, *RUN))
    return out, result


def test_reference_run_logs_metrics_checkpoints_and_exports(reference, corpus):
    out, result = reference
    records = read_jsonl(out / "metrics.jsonl")
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    config = resolve_model_config(recipe(corpus, out))
    tokens_per_step = 1 * 2 * 2 * 64  # world * batch * grad_accum * seq_len
    last = train_records[-1]
    assert last["tokens"] == 6 * tokens_per_step
    assert last["flops"] == pytest.approx(6 * tokens_per_step * flops.training_flops_per_token(config))
    assert last["mfu"] is None and last["peak_gib"] is None and last["tokens_per_s"] > 0 and last["grad_norm"] > 0
    for m in config.modalities:
        assert f"loss/{m}" in last
    assert train_records[-1]["loss"] < train_records[0]["loss"] - 0.1
    assert [r["step"] for r in records if r["split"] == "validation"] == [6]
    assert result["validation"]["loss"] == pytest.approx(records[-1]["loss"])
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000004", "step-00000006"]
    # the HF export reproduces the trained engine's logits
    assert result["hf_export"] == str(out / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    engine = result["engine"]
    engine.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, engine(input_ids=ids).logits, rtol=0, atol=1e-6)


@pytest.mark.slow  # three more runs (about 20 s on 2 busy cores)
def test_auto_zero_stage_on_one_process_is_stage_0_without_a_gradient_all_reduce(reference, corpus, tmp_path):
    out = tmp_path / "auto"
    result = train(recipe(corpus, out, *RUN, "train.max_steps=2", "train.export_hf=false", "deepspeed.zero_stage=auto"))
    engine = result["engine"]
    assert engine.zero_optimization_stage() == 0 and not engine.enable_backward_allreduce  # alone: nothing to reduce
    assert yaml.safe_load((out / "recipe.yaml").read_text())["deepspeed"]["zero_stage"] == "auto"  # as given
    assert train_losses(out) == train_losses(reference[0])[:2]  # the same steps as the stated stage 0


def test_resume_matches_uninterrupted_including_after_a_crash_mid_save(reference, corpus, tmp_path, monkeypatch):
    """6 steps in one go == 3 steps, stop, resume, killed while saving step 6, resume again; step for step."""
    out = tmp_path / "run"
    first = train(recipe(corpus, out, *RUN, "train.stop_after=3", "train.export_hf=false"))
    assert first["step"] == 3 and first["checkpoint"].endswith("step-00000003")

    real_save = ckpt_module.atomic_torch_save

    def killed_at_step_6(obj, path):
        if ".tmp-step-00000006" in str(path):
            raise KeyboardInterrupt("simulated kill during the save of step 6")
        real_save(obj, path)

    monkeypatch.setattr(ckpt_module, "atomic_torch_save", killed_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(recipe(corpus, out, *RUN, "train.export_hf=false"))
    monkeypatch.undo()
    assert (out / "checkpoints" / "latest").read_text() == "step-00000004"  # the previous save survives

    final = train(recipe(corpus, out, *RUN, "train.export_hf=false"))  # resumes from step 4
    assert final["step"] == 6 and not list((out / "checkpoints").glob(".tmp-*"))
    # Same data order, RNG, optimizer state and schedule: identical losses and gradient norms (exact on CPU).
    assert train_losses(out) == train_losses(reference[0])


def test_non_finite_steps_are_skipped_then_training_stops(corpus, tmp_path, capsys):
    out = tmp_path / "nan"
    args = ["--config", str(TINY), f"data.path={corpus}", f"train.out_dir={out}", *FAST, "train.max_steps=4",
            "train.save_every=1", "train.keep_last=5", "train.max_bad_steps=1", "train.log_every=1",
            "train.inject_nan_steps=[2, 3]"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "step 2: non-finite loss or gradient, update skipped (1 of train.max_bad_steps=1)" in err
    assert "too many bad steps" in err and "step-00000002" in err
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-00000002" and not (ckpts / "step-00000003").exists()
    w1 = torch.load(ckpts / "step-00000001" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    w2 = torch.load(ckpts / "step-00000002" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # the skipped step changed nothing
    assert all(torch.isfinite(v).all() for v in w2.values())
    # the intact checkpoint resumes; without the fault the run completes
    main(args[:-1] + ["train.inject_nan_steps=[]"])
    records = [r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and math.isfinite(records[-1]["loss"])
    assert records[-1]["skipped_steps"] == 1


def test_resuming_into_another_architecture_is_refused(reference, corpus, capsys):
    out, _ = reference
    args = ["--config", str(TINY), f"data.path={corpus}", f"train.out_dir={out}", *FAST, *RUN, "model.d_model=48"]
    assert main(args) == 2
    assert "model differs (d_model: 32 in the checkpoint, 48 now, dt_rank: 2 in the checkpoint, 3 now)" in (
        capsys.readouterr().err
    )


def test_text_image_model_on_a_three_modality_corpus_needs_speech_kinds_excluded(corpus, tmp_path):
    base = ["model.modalities=[text, image]"]
    with pytest.raises(ValueError, match="data.mixture must give weight 0"):
        resolve_model_config(recipe(corpus, tmp_path, *base))
    no_speech = "data.mixture={speech_transcript: 0, transcript_speech: 0, mixed: 0}"
    config = resolve_model_config(recipe(corpus, tmp_path, *base, no_speech))
    full = resolve_model_config(recipe(corpus, tmp_path))
    assert config.modalities == ("text", "image") and config.vocab_sizes == full.vocab_sizes[:2]


def test_param_groups_exclude_norms_biases_ssm_params_and_embeddings():
    config = mom.MoMConfig(vocab_sizes=(40, 24, 16), d_model=16, n_layer=2, d_state=4, dt_rank=2)
    model = mom.MoMForCausalLM(config)
    groups = {g["name"]: g for g in param_groups(model, OptimConfig(weight_decay=0.1))}
    decay, no_decay = set(groups["decay"]["names"]), set(groups["no_decay"]["names"])
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert "backbone.layers.0.mixer.A_log" in no_decay and "backbone.layers.0.mixer.D" in no_decay
    assert "backbone.layers.0.mixer.dt_proj.image.bias" in no_decay and "backbone.norm_f.weight" in no_decay
    assert "backbone.embeddings.weight" in no_decay  # tied with lm_head: listed once
    assert "backbone.layers.1.mixer.in_proj.speech.weight" in decay
    assert "backbone.layers.1.mixer.conv1d.weight" in decay
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    with_emb = param_groups(model, OptimConfig(decay_embeddings=True))
    assert "backbone.embeddings.weight" in with_emb[0]["names"]
    only_ssm = param_groups(model, OptimConfig(), trainable=lambda name, p: name.endswith("A_log"))
    assert [g["name"] for g in only_ssm] == ["no_decay"] and len(only_ssm[0]["params"]) == 2


def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1) and lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)  # half way through the cosine: (1 + 0.1) / 2
    assert lr_at(110, cfg, 110) == pytest.approx(0.1) and lr_at(500, cfg, 110) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_evaluation_draws_the_same_random_numbers_each_time_and_leaves_trainings():
    """A model whose loss is random (as a diffusion loss samples timesteps and noise) evaluates to the same losses at
    every evaluation, and the training stream of random numbers continues as if no evaluation had run."""
    from types import SimpleNamespace

    from mom.train.distributed import Context
    from mom.train.loop import evaluate

    class Noisy(torch.nn.Module):
        def forward(self, **batch):
            sums = torch.rand(2, dtype=torch.float64) + batch["input_ids"].sum() * 0
            return SimpleNamespace(modality_loss_sums=sums, modality_target_counts=torch.ones(2, dtype=torch.float64))

    ctx = Context(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    batches = [{"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.zeros(1, 4, dtype=torch.long),
                "modality_ids": torch.zeros(1, 4, dtype=torch.long)}] * 3
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = evaluate(Noisy(), batches, ctx, ("text", "image"))
    assert torch.equal(torch.rand(1), expected_next)  # the training stream is where it was
    assert evaluate(Noisy(), batches, ctx, ("text", "image")) == first
