"""`mom-generate`: sample an interleaved document from a trained MoM and write it as text, PNG and WAV files, or a
grid of sampled images (one row per prompt, one column per seed) as one PNG.

    mom-generate --model runs/tiny_mom/hf --prompt "a handwritten digit seven" --then image --out samples/
    mom-generate --model runs/tiny_mom --prompt "a seven" --prompt "a smiling face" --then image --num-samples 8 \
        --grid grid.png

`mom.generation.document` samples (constrained to well-formed documents) and writes; docs/generation.md. A
Transfusion model (`mom.model.transfusion`) continues the prompt with an image denoised by DDIM over its latent
patches and decoded by ``--vae`` (`mom.generation.image_diffusion`), then text; docs/transfusion.md. Grids:
`mom.generation.grid`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import mom  # noqa: F401  (registers MoM with the Auto classes)
from mom.cli.common import add_debug_flag, run
from mom.generation.document import (
    QUIET_DBFS,
    THEN,
    SpanConstraint,
    close_open_span,
    generate_document,
    level_dbfs,
    sample_token_image,
    write_document,
)
from mom.generation.grid import check_grid_path, sample_rows, save_grid
from mom.generation.image_diffusion import DEFAULT_STEPS, generate_transfusion, load_vae, sample_transfusion_image
from mom.model.transfusion import MoMTransfusionConfig
from mom.tokenization.multimodal import MultimodalTokenizer
from mom.utils.devices import pick_device

EXPORT_SUBDIR = "hf"  # where mom-train exports the model inside its out_dir (train.export_hf)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mom-generate",
        description="Sample one interleaved document from a trained MoM and decode it to text.txt, image_*.png "
        "and speech_*.wav; or, with --grid, draw --num-samples images for each --prompt into one PNG.",
        epilog='example: mom-generate --model runs/tiny_mom --prompt "a handwritten digit seven" --then image '
        '(docs/generation.md); a grid: ... --prompt "a seven" --prompt "a face" --then image --num-samples 8 '
        "--grid grid.png",
    )
    parser.add_argument("--model", required=True,
                        help="a Hugging Face MoM directory, or a mom-train run directory holding one in hf/")
    parser.add_argument("--tokenizer", help="multimodal tokenizer directory (default: MODEL/tokenizer)")
    parser.add_argument("--prompt", action="append",
                        help="text the document starts with (default: none); with --grid, repeat it for one row of "
                        "samples per prompt")
    parser.add_argument("--then", default="text", choices=THEN, help="what follows the prompt")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--max-speech-units", type=int, default=500, help="longest speech span (50 units = 1 s)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 for greedy decoding")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed; with --num-samples N, the grid's columns use seeds SEED .. SEED+N-1")
    parser.add_argument("--num-samples", type=int, default=1, metavar="N",
                        help="with --grid: images drawn per prompt, one column each (default 1)")
    parser.add_argument("--grid", metavar="FILE.png",
                        help="--then image: write only the sampled images, as one PNG grid (rows: prompts, columns: "
                        "seeds; each row's prompt under it, or in FILE.captions.txt if the default font cannot "
                        "draw it); --out is not written")
    parser.add_argument("--vae", help="Transfusion models: the image VAE directory (default: MODEL/vae)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"Transfusion models: DDIM denoising steps of the image (default {DEFAULT_STEPS})")
    parser.add_argument("--guidance", type=float, default=1.0,
                        help="Transfusion models: classifier-free guidance scale (1: none)")
    parser.add_argument("--device", default="auto",
                        help="where the model runs: auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--out", default="samples",
                        help="directory for text.txt, image_*.png, speech_*.wav (those of an earlier run are removed)")
    add_debug_flag(parser)
    return parser


def model_dir(path: str | Path) -> Path:
    """The Hugging Face directory ``path`` names: itself, or the ``hf/`` export of a mom-train run directory."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / EXPORT_SUBDIR / "config.json").is_file():
        return path / EXPORT_SUBDIR
    hint = "; the run has no hf/ export yet (train.export_hf writes it at the end)" if path.is_dir() else ""
    raise FileNotFoundError(f"--model {path}: no config.json there or in {path / EXPORT_SUBDIR}: pass a Hugging Face "
                            f"model directory such as runs/tiny_mom/hf{hint}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run("mom-generate", lambda: _main(args), args.debug)


def check_args(args: argparse.Namespace) -> list[str]:
    """Validate the options (one-line errors, before any model is loaded) -> the prompts."""
    for name in ("max_new_tokens", "max_speech_units", "steps", "num_samples"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.temperature < 0 or args.top_k < 0:
        raise ValueError(f"--temperature and --top-k: must be >= 0, got {args.temperature} and {args.top_k}")
    prompts = args.prompt or [""]
    if args.grid is None:
        if args.num_samples > 1 or len(prompts) > 1:
            what = f"--num-samples {args.num_samples}" if args.num_samples > 1 else f"{len(prompts)} --prompt options"
            raise ValueError(f"{what}: several samples make a grid: pass --grid FILE.png (with --then image)")
        return prompts
    if args.then != "image":
        raise ValueError(f"--grid: draws images; pass --then image (got --then {args.then})")
    check_grid_path(args.grid)
    return prompts


def _main(args: argparse.Namespace) -> int:
    prompts = check_args(args)
    device = pick_device(args.device)
    directory = model_dir(args.model)
    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else directory / "tokenizer"
    if not (tokenizer_dir / "config.json").is_file():
        raise FileNotFoundError(f"no multimodal tokenizer at {tokenizer_dir}: pass --tokenizer DIR")
    tokenizer = MultimodalTokenizer.load(tokenizer_dir)
    config = AutoConfig.from_pretrained(directory)
    if isinstance(config, MoMTransfusionConfig):
        return _transfusion(args, prompts, directory, tokenizer, tokenizer_dir, device)
    try:  # a text + image model may come with a text + image + speech tokenizer: its leading part is the model's
        tokenizer = tokenizer.for_model(config.modalities, config.vocab_sizes)
    except ValueError as e:
        raise ValueError(f"{e}, at {tokenizer_dir}: pass the model's --tokenizer") from e
    if args.then != "text" and args.then not in tokenizer.modalities:
        raise ValueError(f"--then {args.then}: the model has no {args.then} (its modalities: "
                         f"{list(tokenizer.modalities)})")
    model = AutoModelForCausalLM.from_pretrained(directory).to(device).eval()
    if args.grid is not None:
        return _grid(args, prompts, lambda prompt, seed: sample_token_image(model, tokenizer, prompt,
                                                                            args.temperature, args.top_k, seed))
    ids = generate_document(model, tokenizer, prompts[0], args.then, args.max_new_tokens, args.temperature,
                            args.top_k, args.max_speech_units, args.seed)
    ids = close_open_span(ids, SpanConstraint(tokenizer, args.max_speech_units))
    parts = tokenizer.decode_document(ids)
    for path in write_document(parts, Path(args.out), tokenizer.speech_sample_rate):
        print(f"wrote {path}")
    print(f"{len(ids)} tokens: " + ", ".join(f"{k}" for k, _ in parts))
    clips = [samples for kind, samples in parts if kind == "speech"]
    for i, samples in enumerate(clips):
        level = level_dbfs(samples)
        if level < QUIET_DBFS:
            seconds = len(samples) / tokenizer.speech_sample_rate
            print(f"mom-generate: warning: speech_{i}.wav is near-silent ({level:.0f} dBFS RMS, {seconds:.2f} s; "
                  f"audible speech is above {QUIET_DBFS:.0f} dBFS): the model produced few or silent units; try "
                  "another --seed, a --temperature below 1 or a longer-trained model", file=sys.stderr)
    return 0


def _grid(args: argparse.Namespace, prompts: list[str], sample: Callable[[str, int], np.ndarray]) -> int:
    """Draw ``sample(prompt, seed)`` for each prompt (rows) and seed ``--seed`` .. ``--seed + N - 1`` (columns) and
    write them as the ``--grid`` PNG (`mom.generation.grid`)."""
    seeds = range(args.seed, args.seed + args.num_samples)
    rows = sample_rows(sample, prompts, seeds, progress=True)
    captions = prompts if any(prompts) else None
    for path in save_grid(args.grid, rows, captions):
        print(f"wrote {path}")
    height, width = rows[0][0].shape[:2]
    print(f"grid of {len(prompts)} prompt(s) x {args.num_samples} sample(s) (seeds {seeds.start}..{seeds.stop - 1}) "
          f"of {width}x{height} images")
    return 0


def _transfusion(args: argparse.Namespace, prompts: list[str], directory: Path, tokenizer: MultimodalTokenizer,
                 tokenizer_dir: Path, device: torch.device) -> int:
    """A Transfusion model: the prompt, an image denoised with ``--steps`` DDIM steps, then up to ``--max-new-tokens``
    text tokens (`mom.generation.image_diffusion`); with ``--grid``, the images alone."""
    if args.then != "image":
        raise ValueError(f"--then {args.then}: a Transfusion model continues the prompt with an image: use --then "
                         "image")
    model = AutoModelForCausalLM.from_pretrained(directory).to(device).eval()
    if tokenizer.vocab_sizes[0] != model.config.vocab_sizes[0]:
        raise ValueError(f"the model's text vocabulary ({model.config.vocab_sizes[0]}) does not match the tokenizer's "
                         f"({tokenizer.vocab_sizes[0]}) at {tokenizer_dir}: pass the model's --tokenizer")
    vae = load_vae(Path(args.vae) if args.vae else directory / "vae")
    if args.grid is not None:
        return _grid(args, prompts, lambda prompt, seed: sample_transfusion_image(model, vae, tokenizer, prompt,
                                                                                  args.steps, args.guidance, seed))
    parts = generate_transfusion(model, vae, tokenizer, prompts[0], args.steps, args.guidance, args.max_new_tokens,
                                 args.temperature, args.seed, progress=True)
    for path in write_document(parts, Path(args.out), None):
        print(f"wrote {path}")
    height, width = parts[1][1].shape[:2]
    print(f"image {width}x{height} from {args.steps} DDIM steps; text after it: {parts[2][1]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
