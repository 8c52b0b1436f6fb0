import subprocess
import sys
import textwrap

import torch
from helpers import interleaved_ids, tiny_config
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import mom


def test_auto_classes_are_registered():
    cfg = tiny_config()
    assert isinstance(AutoConfig.for_model("mom", d_model=8), mom.MoMConfig)
    assert isinstance(AutoModelForCausalLM.from_config(cfg), mom.MoMForCausalLM)
    assert isinstance(AutoModel.from_config(cfg), mom.MoMModel)


def test_save_pretrained_loads_identically_in_a_fresh_process(tmp_path):
    model = mom.MoMForCausalLM(tiny_config(decouple=("in_proj", "out_proj"))).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    ids = interleaved_ids(model.config, 2, [(0, 5), (1, 6), (2, 4)])
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        torch.save(model(ids).logits, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch, mom
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}).eval()
        assert type(model).__name__ == "MoMForCausalLM", type(model)
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        with torch.no_grad():
            logits = model(ids).logits
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        assert torch.equal(logits, expected), (logits - expected).abs().max()
        sd = model.state_dict()
        print("OK", len(sd))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("OK")


def test_round_trip_keeps_every_tensor(tmp_path):
    model = mom.MoMForCausalLM(tiny_config(tie_word_embeddings=False))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert loaded.config.decouple == model.config.decouple and loaded.config.modalities == model.config.modalities
