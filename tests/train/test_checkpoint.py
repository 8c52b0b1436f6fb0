"""Checkpointer: atomic saves (a crash mid-save keeps the previous one loadable), rotation, resolving, verification
and fallback past damaged checkpoints, setting aside later ones, RNG; export."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import mom
from mom.train import checkpoint as ckpt_module
from mom.train.checkpoint import LATEST, META, Checkpointer, CheckpointError, rng_state, set_rng_state, verify
from mom.train.distributed import Context
from mom.train.export import export_hf

CTX = Context(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), precision="fp32")


class FakeEngine:
    """Stands in for a DeepSpeed engine: one tensor of "weights", saved and loaded per tag directory."""

    def __init__(self, value=0.0):
        self.weights = torch.tensor([value])

    def save_checkpoint(self, root, tag, save_latest=True):
        path = Path(root) / tag
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.weights, path / "weights.pt")

    def load_checkpoint(self, root, tag, **kwargs):
        self.weights = torch.load(Path(root) / tag / "weights.pt")
        return str(Path(root) / tag), {}


class FakeLoader:
    def __init__(self, position=0):
        self.position = position

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def save(ckpt, step, value):
    return ckpt.save(FakeEngine(value), FakeLoader(step * 10), {"step": step, "tokens": step * 100, "flops": 1.5})


def test_save_load_roundtrip_and_rotation(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints", keep_last=2, ctx=CTX)
    assert ckpt.latest() is None and ckpt.resolve("auto") is None
    for step in (1, 2, 3):
        path = save(ckpt, step, float(step))
    assert path.name == "step-00000003"
    assert sorted(p.name for p in ckpt.complete()) == ["step-00000002", "step-00000003"]  # keep_last=2
    assert (ckpt.root / LATEST).read_text() == "step-00000003"
    engine, loader = FakeEngine(), FakeLoader()
    meta = ckpt.load(engine, loader, ckpt.resolve("auto"))
    assert (meta["step"], meta["tokens"], meta["world_size"]) == (3, 300, 1)
    assert engine.weights.item() == 3.0 and loader.position == 30
    assert ckpt.resolve("none") is None
    assert ckpt.resolve(str(ckpt.root)) == path  # a checkpoint root: its latest
    assert ckpt.resolve(str(ckpt.root / "step-00000002")).name == "step-00000002"  # one checkpoint
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.resolve(str(tmp_path / "nowhere"))


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path / "checkpoints", keep_last=1, ctx=CTX)
    save(ckpt, 1, 1.0)

    def killed(obj, path):  # the process dies after DeepSpeed wrote its files, before ours
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(ckpt_module, "atomic_torch_save", killed)
    with pytest.raises(KeyboardInterrupt):
        save(ckpt, 2, 2.0)
    monkeypatch.undo()
    assert (ckpt.root / ".tmp-step-00000002" / "weights.pt").exists()  # the torn save is there...
    assert ckpt.latest().name == "step-00000001"  # ...but never chosen, and keep_last did not rotate step 1 out
    engine = FakeEngine()
    assert ckpt.load(engine, FakeLoader(), ckpt.latest())["step"] == 1 and engine.weights.item() == 1.0
    save(ckpt, 3, 3.0)  # the next save clears the torn one
    assert not list(ckpt.root.glob(".tmp-*")) and [p.name for p in ckpt.complete()] == ["step-00000003"]


def test_latest_pointer_missing_or_stale_falls_back_to_highest_complete(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=3, ctx=CTX)
    save(ckpt, 4, 4.0)
    save(ckpt, 7, 7.0)
    (tmp_path / LATEST).write_text("step-00000099")  # names nothing complete
    assert ckpt.latest().name == "step-00000007"
    (tmp_path / LATEST).unlink()
    (tmp_path / "step-00000009").mkdir()  # no meta.json: incomplete
    assert ckpt.latest().name == "step-00000007"


def test_resume_with_another_world_size_is_refused(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=1, ctx=CTX)
    path = save(ckpt, 1, 1.0)
    meta = json.loads((path / META).read_text())
    (path / META).write_text(json.dumps({**meta, "world_size": 4}))
    with pytest.raises(ValueError, match="4 data-parallel ranks"):
        ckpt.load(FakeEngine(), FakeLoader(), path)


def test_meta_records_every_file_size(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=1, ctx=CTX)
    path = save(ckpt, 1, 1.0)
    files = json.loads((path / META).read_text())["files"]
    assert files == {"rank-00000.pt": (path / "rank-00000.pt").stat().st_size,
                     "weights.pt": (path / "weights.pt").stat().st_size}
    assert verify(path) is None


@pytest.mark.parametrize("damage", ["truncated weights", "torn meta.json", "missing rank file"])
def test_auto_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path, capsys, damage):
    ckpt = Checkpointer(tmp_path / "checkpoints", keep_last=3, ctx=CTX)
    for step in (2, 4):
        newest = save(ckpt, step, float(step))
    if damage == "truncated weights":
        data = (newest / "weights.pt").read_bytes()
        (newest / "weights.pt").write_bytes(data[: len(data) // 2])
        named = f"{newest / 'weights.pt'} has {len(data) // 2:,} bytes, {len(data):,} were written"
    elif damage == "torn meta.json":
        text = (newest / META).read_text()
        (newest / META).write_text(text[: len(text) // 2])
        named = f"{newest / META} is unreadable (JSONDecodeError"
    else:
        (newest / "rank-00000.pt").unlink()
        named = f"{newest / 'rank-00000.pt'} is missing"
    assert ckpt.resolve("auto").name == "step-00000002"
    err = capsys.readouterr().err
    assert f"WARNING: checkpoint {newest} is damaged ({named}" in err and "set aside as step-00000004.rejected" in err
    assert not newest.exists() and (newest.parent / "step-00000004.rejected").is_dir()  # kept for inspection
    engine, loader = FakeEngine(), FakeLoader()
    assert ckpt.load(engine, loader, ckpt.resolve("auto"))["step"] == 2 and engine.weights.item() == 2.0
    save(ckpt, 3, 3.0)  # the resumed run's next save is the newest: rotation and latest agree
    assert ckpt.latest().name == "step-00000003"
    assert sorted(p.name for p in ckpt.complete()) == ["step-00000002", "step-00000003"]


def test_no_intact_checkpoint_fails_naming_each_damage(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=2, ctx=CTX)
    for step in (1, 2):
        path = save(ckpt, step, float(step))
        (path / "weights.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* verifies: step-00000002: .*weights.pt has 0 bytes.*"
                       r"; step-00000001: .*weights.pt has 0 bytes"):
        ckpt.resolve("auto")
    other = Checkpointer(tmp_path / "elsewhere", keep_last=2, ctx=CTX)
    path = save(other, 5, 5.0)
    (path / META).write_text("{")
    with pytest.raises(CheckpointError, match=r"checkpoint .*step-00000005 is damaged: .*meta.json is unreadable"):
        ckpt.resolve(str(path))  # an explicit checkpoint: no fallback


def test_a_damaged_checkpoint_of_another_directory_is_not_moved(tmp_path, capsys):
    source = Checkpointer(tmp_path / "source", keep_last=2, ctx=CTX)
    save(source, 1, 1.0)
    bad = save(source, 2, 2.0)
    (bad / "weights.pt").write_bytes(b"x")
    mine = Checkpointer(tmp_path / "mine", keep_last=2, ctx=CTX)
    assert mine.resolve(str(source.root)).name == "step-00000001"
    assert bad.is_dir() and "ignored" in capsys.readouterr().err


def test_set_aside_after_keeps_one_history(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=5, ctx=CTX)
    for step in (2, 4, 6):
        save(ckpt, step, float(step))
    moved = ckpt.set_aside_after(2)
    assert [p.name for p in moved] == ["step-00000004.superseded", "step-00000006.superseded"]
    assert [p.name for p in ckpt.complete()] == ["step-00000002"] and ckpt.latest().name == "step-00000002"
    save(ckpt, 3, 3.0)
    assert ckpt.latest().name == "step-00000003" and (tmp_path / "step-00000006.superseded" / META).is_file()


def test_rotation_never_removes_the_checkpoint_just_saved(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=1, ctx=CTX)
    save(ckpt, 9, 9.0)  # a later checkpoint put there by hand (a run would have set it aside)
    save(ckpt, 1, 1.0)
    save(ckpt, 2, 2.0)
    assert sorted(p.name for p in ckpt.complete()) == ["step-00000002", "step-00000009"]
    assert (tmp_path / LATEST).read_text() == "step-00000002"


def test_rng_state_roundtrip():
    state = rng_state(torch.device("cpu"))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    set_rng_state(state, torch.device("cpu"))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


class StubEngine:
    def __init__(self, module):
        self.module = module

    def zero_optimization_stage(self):
        return 0


def test_export_hf_loads_with_auto_class_and_copies_tokenizer(tmp_path):
    config = mom.MoMConfig(vocab_sizes=(2048, 512, 256), d_model=16, n_layer=1, d_state=4, dt_rank=2)
    model = mom.MoMForCausalLM(config).eval()
    tok = Path(__file__).parents[2] / "tokenizers" / "small"  # the export checks the tokenizer against the model
    out = tmp_path / "run" / "hf"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("from an older export")
    export_hf(StubEngine(model), out, tok, CTX)
    assert (out / "model.safetensors").is_file() and not (out / "stale.txt").exists()
    assert (out / "tokenizer" / "text" / "config.json").read_text() == (tok / "text" / "config.json").read_text()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)  # BLAS: ~1e-8
    assert not list(out.parent.glob(".tmp-*"))
