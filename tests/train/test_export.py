"""The Hugging Face export: everything transformers needs (model, tokenizer, processor, special ids, generation
config, model card), written atomically, refused whole when the tokenizer does not fit the model."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer, LogitsProcessor

import mom
from mom.tokenization.multimodal import MultimodalTokenizer
from mom.tokenization.processor import MoMProcessor
from mom.tokenization.text import TextTokenizer
from mom.train.distributed import Context
from mom.train.export import export_hf
from mom.train.recipe import load_recipe
from mom.utils.errors import BadInputError

ROOT = Path(__file__).parents[2]
SMALL = ROOT / "tokenizers" / "small"
CTX = Context(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), precision="fp32")
RESULTS = {"step": 600, "tokens": 614_400, "validation": {"loss": 4.819, "loss_text": 4.887}}


class StubEngine:
    def __init__(self, module):
        self.module = module

    def zero_optimization_stage(self):
        return 0


def tiny_model(modalities=("text", "image", "speech"), vocab_sizes=(2048, 512, 256)):
    config = mom.MoMConfig(modalities=modalities, vocab_sizes=vocab_sizes, d_model=16, n_layer=1, d_state=4,
                           dt_rank=2)
    return mom.MoMForCausalLM(config).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_model()
    recipe = load_recipe(ROOT / "recipes" / "tiny_mom.yaml", [f"data.path={ROOT / 'data' / 'small'}"])
    out = export_hf(StubEngine(model), tmp_path_factory.mktemp("run") / "hf", SMALL, CTX, recipe, RESULTS)
    return model, out, recipe


def test_files_and_special_ids(exported):
    _, out, _ = exported
    names = {p.name for p in out.iterdir()}
    assert names == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "processor_config.json", "tokenizer", "README.md", "recipe.yaml"}
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    for saved in (config, generation):
        assert (saved["bos_token_id"], saved["eos_token_id"], saved["pad_token_id"]) == (2, 3, 0)
    assert (out / "tokenizer" / "config.json").read_text() == (SMALL / "config.json").read_text()
    assert not [p for p in out.parent.iterdir() if p.name != "hf"]  # no temporary directory left


def test_model_tokenizer_and_processor_load_with_auto_classes(exported):
    model, out, _ = exported
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)  # BLAS: ~1e-8
    assert (loaded.config.bos_token_id, loaded.config.eos_token_id, loaded.config.pad_token_id) == (2, 3, 0)
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "Beautiful is better than ugly.\n  Explicit\tis better."
    assert tokenizer(text)["input_ids"] == [2] + TextTokenizer.load(SMALL / "text").encode(text)
    processor = AutoProcessor.from_pretrained(out)
    assert isinstance(processor, MoMProcessor) and processor.modalities == ("text", "image", "speech")
    assert processor(text=text)["input_ids"] == tokenizer(text)["input_ids"]


class EosAfter(LogitsProcessor):
    """Forces </s> as the ``n``-th new token (the model is random: nothing else would end it)."""

    def __init__(self, prompt_len, n):
        self.at = prompt_len + n - 1

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.at:
            scores = torch.full_like(scores, float("-inf"))
            scores[:, 3] = 0.0
        return scores


def test_generate_stops_at_eos_from_the_generation_config(exported):
    _, out, _ = exported
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = AutoTokenizer.from_pretrained(out)("a", return_tensors="pt")["input_ids"]
    force = [EosAfter(prompt.shape[1], 3)]
    generated = model.generate(prompt, max_new_tokens=10, do_sample=False, logits_processor=force)
    assert generated.shape[1] == prompt.shape[1] + 3 and generated[0, -1].item() == 3  # no eos_token_id passed


def test_model_card(exported):
    model, out, recipe = exported
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    for expected in ("| d_model | 16 |", "| decouple | in_proj, x_proj, dt_proj, out_proj |",
                     "text 0-2047; image 2048-2559; speech 2560-2815", "Corpus `small`", "train: 3,050 documents",
                     "Tokens seen: 614,400", "loss 4.819", "import mom", "does not recognize this architecture",
                     "AutoTokenizer.from_pretrained", "mom-generate --model PATH"):
        assert expected in card, expected
    assert yaml.safe_load((out / "recipe.yaml").read_text()) == recipe.to_dict()


def test_bad_tokenizer_keeps_the_previous_export(exported, tmp_path):
    model, first, _ = exported
    out = tmp_path / "hf"
    export_hf(StubEngine(model), out, SMALL, CTX)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "config.json").write_text('{"kind": "multimodal"}')
    with pytest.raises(BadInputError, match="fake: not a multimodal tokenizer directory"):
        export_hf(StubEngine(model), out, fake, CTX)
    with pytest.raises(BadInputError, match=r"do not start with the model's \['text', 'image', 'speech'\] / \[40"):
        export_hf(StubEngine(tiny_model(vocab_sizes=(40, 24, 16))), out, SMALL, CTX)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake", "hf"]


def test_leading_modalities_and_no_tokenizer(tmp_path):
    text_image = tiny_model(("text", "image"), (2048, 512))
    out = export_hf(StubEngine(text_image), tmp_path / "ti", SMALL, CTX)
    processor = AutoProcessor.from_pretrained(out)
    assert processor.modalities == ("text", "image")
    with pytest.raises(ValueError, match="no speech modality"):
        processor(text="<speech>", audio=[torch.zeros(800).numpy()], sampling_rate=16000)
    # the exported multimodal tokenizer is the model's part of SMALL, self-contained (no path back to SMALL)
    saved = json.loads((out / "tokenizer" / "config.json").read_text())
    assert saved["modalities"] == ["text", "image"] and saved["tokenizers"] == {"text": "text", "image": "image"}
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == ["config.json", "image", "text"]
    media = MultimodalTokenizer.load(out / "tokenizer")
    assert media.vocab_sizes == (2048, 512)
    assert media.encode_text("a cat") == MultimodalTokenizer.load(SMALL).encode_text("a cat")
    bare = export_hf(StubEngine(text_image), tmp_path / "bare", None, CTX)
    assert not (bare / "tokenizer.json").exists() and not (bare / "tokenizer").exists()
    assert json.loads((bare / "config.json").read_text())["eos_token_id"] == 3
    card = (bare / "README.md").read_text()
    assert "This export has no tokenizer" in card and "Not recorded with this export." in card


def test_tokenizer_loads_without_importing_mom(exported):
    _, out, _ = exported
    code = (
        "import sys; from transformers import AutoTokenizer\n"
        f"t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "assert 'mom' not in sys.modules, 'mom was imported'\n"
        "print(t.eos_token_id, t('a cat')['input_ids'])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"3 {[2] + TextTokenizer.load(SMALL / 'text').encode('a cat')}"


def test_the_snippets_of_docs_huggingface_md_run(tmp_path, monkeypatch):
    """Every ```python block of docs/huggingface.md, in order, in one namespace, against a tiny export placed where
    the quick start puts its own (runs/tiny_mom/hf), with data/ of the repository beside it."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "huggingface.md").read_text(), re.S)
    assert len(blocks) >= 10
    export_hf(StubEngine(tiny_model()), tmp_path / "runs" / "tiny_mom" / "hf", SMALL, CTX)
    (tmp_path / "data").symlink_to(ROOT / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/huggingface.md python block {i}", "exec"), namespace)
    assert sorted(p.suffix for p in (tmp_path / "samples" / "hf").iterdir()) == [".png"]
    assert os.path.isdir(tmp_path / "runs" / "hf_trainer")
