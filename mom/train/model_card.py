"""The model card (``README.md``) of a Hugging Face export: configuration, training data, results, how to load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mom.model.config import MoMConfig
from mom.tokenization.special import SPECIAL_TOKENS
from mom.train.recipe import Recipe

CARD_FILE = "README.md"
RECIPE_FILE = "recipe.yaml"  # the training recipe, written beside the card
CONFIG_KEYS = ("mixer", "d_model", "n_layer", "d_state", "d_conv", "expand", "dt_rank", "decouple",
               "tie_word_embeddings")
# shown when not at their defaults (a plain Mamba-1 MoM keeps its short table)
OPTIONAL_KEYS = {"attention_layers": (), "channel_mixer": None, "layer_averaging": False}


def model_card(config: MoMConfig, recipe: Recipe | None = None, results: dict[str, Any] | None = None,
               with_tokenizer: bool = True) -> str:
    """Markdown of the card; sections without information (no recipe, no results) say so."""
    name = Path(recipe.train.out_dir).name if recipe is not None else "MoM"
    kind = "Mixture-of-Mamba" if config.decouple else "dense Mamba"
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [mom, mamba, mixture-of-mamba, multimodal]",
        "---",
        "",
        f"# {name}",
        "",
        f"A {kind} language model over interleaved {', '.join(config.modalities)} tokens, trained with `mom` "
        "(Mixture-of-Mamba, arXiv 2501.16295): the token-wise projections "
        f"({', '.join(config.decouple) or 'none'}) have one expert per modality; the convolution, A, D and the "
        "selective scan are shared.",
        "",
        "## Configuration",
        "",
        "| key | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in _vocabulary(config).items()),
        *(f"| {k} | {_plain(getattr(config, k))} |" for k in CONFIG_KEYS),
        *(f"| {k} | {_plain(getattr(config, k))} |" for k, default in OPTIONAL_KEYS.items()
          if getattr(config, k, default) not in (default, [], ())),
        "",
        "Special tokens (ids 0-7 of the vocabulary): "
        + ", ".join(f"`{t.piece}` {t.id}" for t in SPECIAL_TOKENS) + ". Generation stops at `</s>`.",
        "",
        "## Training data",
        "",
        *_training_data(recipe),
        "",
        "## Training",
        "",
        *_training(recipe, results),
        "",
        "## How to load",
        "",
        *_how_to_load(with_tokenizer),
    ]
    return "\n".join(lines) + "\n"


def _vocabulary(config: MoMConfig) -> dict[str, str]:
    ranges = [f"{m} {o}-{o + v - 1}" for m, o, v in zip(config.modalities, config.vocab_offsets, config.vocab_sizes)]
    return {"modalities": ", ".join(config.modalities), "vocabulary": f"{config.vocab_size} ids: {'; '.join(ranges)}"}


def _training_data(recipe: Recipe | None) -> list[str]:
    if recipe is None:
        return ["Not recorded with this export."]
    path = Path(recipe.data.path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return [f"Corpus `{path}` (its manifest was not found at export time)."]
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    lines = [f"Corpus `{manifest.get('name', path.name)}` (`{path}`), built by `mom.data.build`:", ""]
    for split, entry in manifest.get("splits", {}).items():
        kinds = ", ".join(f"{k} {n}" for k, n in entry.get("documents_per_kind", {}).items())
        per_modality = ", ".join(f"{m} {n:,}" for m, n in entry.get("tokens_per_modality", {}).items())
        lines.append(f"- {split}: {entry.get('documents', '?'):,} documents ({kinds}); "
                     f"{entry.get('tokens', 0):,} tokens ({per_modality})")
    sources = [f"{m}: {s.get('source')}" + (f" {s['options']}" if s.get("options") else "")
               for m in ("text", "image", "speech") for s in manifest.get("recipe", {}).get(m, []) or []]
    if sources:
        lines += ["", "Sources: " + "; ".join(sources) + "."]
    if recipe.data.mixture:
        lines += ["", f"Mixture weights of the document kinds: {recipe.data.mixture}."]
    return lines


def _training(recipe: Recipe | None, results: dict[str, Any] | None) -> list[str]:
    lines = []
    if recipe is not None:
        d, o, t = recipe.data, recipe.optim, recipe.train
        lines.append(f"- {t.max_steps} steps of {d.batch_size} x {d.seq_len} tokens x {t.grad_accum} accumulation "
                     f"per data-parallel rank; AdamW lr {o.lr}, warmup {o.warmup_steps}, weight decay "
                     f"{o.weight_decay}; seed {t.seed}. The whole recipe: `{RECIPE_FILE}` in this directory.")
    if results:
        if results.get("tokens"):
            lines.append(f"- Tokens seen: {results['tokens']:,} (step {results.get('step')}).")
        validation = results.get("validation") or {}
        if validation:
            lines.append("- Validation loss: " + ", ".join(f"{k} {v:.3f}" for k, v in validation.items()
                                                         if isinstance(v, (int, float))) + ".")
    return lines or ["Not recorded with this export."]


def _how_to_load(with_tokenizer: bool) -> list[str]:
    lines = [
        "Needs the `mom` package (`pip install -e .` in a checkout of the `mom` repository). `import mom` registers "
        "the architecture with `transformers`; without it, `AutoModelForCausalLM` fails with \"... does not "
        "recognize this architecture\".",
        "",
        "```python",
        "import mom  # registers MoMConfig / MoMForCausalLM / MoMProcessor with the Auto classes",
        "from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
    ]
    if with_tokenizer:
        lines += [
            'tokenizer = AutoTokenizer.from_pretrained("PATH")  # text only; loads without `import mom` too',
            'processor = AutoProcessor.from_pretrained("PATH")  # text + images + audio -> one id sequence',
            'ids = tokenizer("The cat", return_tensors="pt").input_ids  # starts with <s>',
            "out = model.generate(ids, max_new_tokens=20, do_sample=True)",
            "print(tokenizer.decode(out[0], skip_special_tokens=True))",
            "```",
            "",
            "Interleaved documents with images and speech: `mom-generate --model PATH --prompt \"...\" --then image "
            "--out samples/` (`tokenizer/` holds the image and speech tokenizers). See `docs/huggingface.md` of "
            "the repository for pipelines, Trainer, peft and datasets.",
        ]
    else:
        lines += ["```", "", "This export has no tokenizer (the run had no `train.tokenizer_dir`)."]
    return lines


def _plain(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
