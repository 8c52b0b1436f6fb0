"""`mom-tokenizer`: train, inspect and evaluate the text, image and speech tokenizers.

    mom-tokenizer text train --recipe tokenizers/recipes/text_small.yaml --out tokenizers/small/text
    mom-tokenizer text encode --tokenizer tokenizers/small/text "Hello, world"
    mom-tokenizer image train --recipe tokenizers/recipes/image_small.yaml --out tokenizers/small/image
    mom-tokenizer image eval --tokenizer tokenizers/small/image --images data/small/raw/images --split validation
    mom-tokenizer speech train --recipe tokenizers/recipes/speech_small.yaml --out tokenizers/small/speech
    mom-tokenizer speech eval --tokenizer tokenizers/small/speech
    mom-tokenizer speech decode --tokenizer tokenizers/small/speech --audio in.wav --out out.wav
    mom-tokenizer vae train --recipe tokenizers/recipes/vae_small.yaml --out tokenizers/small/vae
    mom-tokenizer vae eval --vae tokenizers/small/vae --images data/small/raw/images --split validation
    mom-tokenizer vae encode --vae tokenizers/small/vae --out latents.npy a.png b.png
    mom-tokenizer vae decode --vae tokenizers/small/vae --latents latents.npy --out decoded/

See docs/data.md, docs/image.md, docs/speech.md and docs/transfusion.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from mom.cli.common import run
from mom.cli.data import command, source_options
from mom.data.tokenizer_training import ImageSourceSpec
from mom.utils.errors import BadInputError

if TYPE_CHECKING:
    from mom.tokenization.resume import TrainingStopped

SAMPLE_DOCUMENTS = 2000  # training documents on which `text train` reports characters per token


# ---- text --------------------------------------------------------------------------------------------------------
def _text_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mom.data.tokenizer_training import TextTokenizerRecipe, recipe_texts
    from mom.tokenization.text import TextTokenizer

    recipe = TextTokenizerRecipe.from_yaml(args.recipe)
    start = time.time()
    texts = list(tqdm(recipe_texts(recipe, args.on_error), desc="reading text", unit="doc"))
    if not texts:
        raise ValueError(f"{args.recipe}: the recipe's sources yielded no text")
    chars = sum(len(t) for t in texts)
    print(f"training {recipe.model_type} vocab {recipe.vocab_size} on {len(texts)} documents ({chars:,} chars) ...")
    tok = TextTokenizer.train(texts, recipe)
    tok.save(args.out)
    sample = texts[:SAMPLE_DOCUMENTS]
    n_tokens = sum(len(tok.encode(t)) for t in sample)
    n_chars = sum(len(t) for t in sample)
    print(f"saved {args.out} (vocab {tok.vocab_size}) in {time.time() - start:.1f} s; "
          f"{n_chars / max(n_tokens, 1):.2f} chars/token on {len(sample)} training documents")  # fmt: skip
    return 0


def _text_encode(args: argparse.Namespace) -> int:
    from mom.tokenization.text import TextTokenizer

    tok = TextTokenizer.load(args.tokenizer)
    print(" ".join(f"{tok.id_to_piece(i)}:{i}" for i in tok.encode(args.text)))
    return 0


# ---- image -------------------------------------------------------------------------------------------------------
def _save_reconstructions(path: str | Path, originals, reconstructions, columns: int = 16) -> None:
    """Save uint8 images ``(n, s, s, 3)``: originals (top) over reconstructions (bottom), ``columns`` per row pair
    (`mom.generation.grid.save_grid`)."""
    import numpy as np

    from mom.generation.grid import save_grid

    rows = []
    for start in range(0, len(originals), columns):
        rows += [list(np.asarray(images[start : start + columns])) for images in (originals, reconstructions)]
    save_grid(path, rows, columns=columns)


def _override_sources(sources: Sequence[ImageSourceSpec], opts: Sequence[str]) -> None:
    """Apply ``--opt SOURCE.KEY=VALUE`` overrides to a recipe's image sources, in place."""
    for name, options in source_options(opts).items():
        specs = [s for s in sources if s.source == name]
        if not specs:
            raise ValueError(f"--opt {name}.*: the recipe has no source {name!r}")
        for spec in specs:
            spec.options.update(options)


def _training_device(args: argparse.Namespace, recipe_value: str, field: str) -> str:
    """A training command's device: ``--device`` if given, else the recipe's ``field`` (`pick_device`: "auto" or a
    device this machine has; the error names the option or the recipe's field)."""
    from mom.utils.devices import pick_device

    if args.device:
        return str(pick_device(args.device))
    return str(pick_device(recipe_value, f"{args.recipe}: {field}"))


def _start_training(recipe_cls: Any, args: argparse.Namespace, need_held: bool) -> tuple[Any, Path, str, list, list]:
    """An image model's training command up to its data: the recipe (``--opt`` applied), the output directory (an
    existing one refused without ``--overwrite``), the device and the (training, held-out) images."""
    recipe = recipe_cls.from_yaml(args.recipe)
    _override_sources(recipe.sources, args.opt)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    device = _training_device(args, recipe.training.device, "training.device")
    train, held = recipe.load_images()
    if need_held and (not train or not held):
        raise ValueError(f"{args.recipe}: {len(train)} training and {len(held)} held-out images; need both")
    print(f"{len(train)} training images, {len(held)} held-out images", file=sys.stderr)
    return recipe, out, device, train, held


def _stopped(e: TrainingStopped) -> int:
    """Report a run that a signal stopped into its resume file; the shell's exit code for death by that signal."""
    print(f"stopped ({signal.Signals(e.signum).name}) at step {e.step} of {e.steps}: its state is in {e.path}; run "
          "the same command again to continue it", file=sys.stderr, flush=True)
    return 128 + e.signum  # 130 (SIGINT), 143 (SIGTERM), as mom-train


def _finish_training(args: argparse.Namespace, report_file: Path, device: str, report: Any, **extra: Any) -> int:
    """Write the training report beside the saved model (recipe, device, torch version, ``extra``, the report's
    fields) and print its summary."""
    import torch

    from mom.utils.atomic import atomic_write_text

    record = {"recipe": str(args.recipe), "device": str(device), "torch": torch.__version__, **extra,
              **dataclasses.asdict(report)}  # fmt: skip
    atomic_write_text(report_file, json.dumps(record, indent=2) + "\n")
    print(report.summary())
    print(f"saved to {report_file.parent}")
    return 0


def _image_train(args: argparse.Namespace) -> int:
    from mom.data.tokenizer_training import ImageTokenizerRecipe
    from mom.tokenization.image import REPORT_FILE, train_image_tokenizer
    from mom.tokenization.resume import TrainingStopped, resume_path

    recipe, out, device, train, held = _start_training(ImageTokenizerRecipe, args, need_held=False)
    t = recipe.training
    try:
        tokenizer, report = train_image_tokenizer(
            train, recipe.tokenizer, t.steps, t.batch_size, t.lr, t.seed, held or None,
            device=device, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, resume=resume_path(out),
        )  # fmt: skip
    except TrainingStopped as e:
        return _stopped(e)
    tokenizer.save(out)
    resume_path(out).unlink(missing_ok=True)
    return _finish_training(args, out / REPORT_FILE, device, report)


def _image_eval(args: argparse.Namespace) -> int:
    from mom.data.images import iter_image_records
    from mom.data.tokenizer_training import warn_skipped
    from mom.tokenization.image import evaluate_image_tokenizer, images_to_uint8, load_image_tokenizer
    from mom.utils.devices import pick_device

    tokenizer = load_image_tokenizer(args.tokenizer, pick_device(args.device))
    records = [
        r
        for r in iter_image_records("folder", on_error=warn_skipped, path=args.images, size=tokenizer.image_size)
        if args.split is None or r.meta.get("split") == args.split
    ]
    if not records:
        raise ValueError(f"{args.images}: no images" + (f" with split {args.split!r}" if args.split else ""))
    metrics = evaluate_image_tokenizer(tokenizer, [r.image for r in records])
    print(json.dumps(metrics, indent=2))
    if args.save_grid:
        pixels = images_to_uint8([r.image for r in records[: args.grid_images]], tokenizer.image_size)
        _save_reconstructions(args.save_grid, pixels, tokenizer.decode(tokenizer.encode(pixels)))
        print(f"wrote {args.save_grid} (originals above reconstructions)", file=sys.stderr)
    return 0


# ---- speech ------------------------------------------------------------------------------------------------------
def _report_skipped(skipped: list[BadInputError]) -> None:
    if skipped:
        print(f"skipped {len(skipped)} unusable clip(s), e.g.:", file=sys.stderr)
        for e in skipped[:5]:
            print(f"  {e}", file=sys.stderr)


def _speech_train(args: argparse.Namespace) -> int:
    from mom.data.tokenizer_training import SpeechTokenizerRecipe
    from mom.tokenization.speech import CONFIG_FILE, KIND, evaluate, train_speech_tokenizer

    recipe = SpeechTokenizerRecipe.from_yaml(args.recipe)
    out = Path(args.out)
    if (out / CONFIG_FILE).exists() and not args.overwrite:
        raise FileExistsError(f"{out} already holds a tokenizer; pass --overwrite to replace it")
    kc = dataclasses.replace(recipe.kmeans, device=_training_device(args, recipe.kmeans.device, "kmeans.device"))
    skipped: list[BadInputError] = []
    tokenizer, _ = train_speech_tokenizer(recipe.train_data.records(skipped.append), recipe.tokenizer, recipe.seed,
                                          kc)  # fmt: skip
    if recipe.eval_data is not None:
        report = evaluate(tokenizer, recipe.eval_data.records(skipped.append))
        tokenizer.info["eval_report"] = dataclasses.asdict(report)
        print(f"eval:  {report.summary()}")
    tokenizer.info["recipe"] = str(args.recipe)
    tokenizer.save(out)
    _report_skipped(skipped)
    print(f"saved {KIND} tokenizer ({tokenizer.vocab_size} units, {tokenizer.units_per_second:g} units/s) to {out}")
    return 0


def _speech_eval(args: argparse.Namespace) -> int:
    from mom.data.tokenizer_training import SpeechDataSpec
    from mom.tokenization.speech import SpeechTokenizer, evaluate

    tokenizer = SpeechTokenizer.load(args.tokenizer)
    skipped: list[BadInputError] = []
    data = SpeechDataSpec("folder", {"path": args.data, "split": None if args.split == "all" else args.split})
    report = evaluate(tokenizer, data.records(skipped.append))
    _report_skipped(skipped)
    if report.clips == 0:
        raise ValueError(f"no clips found in {args.data} (split {args.split!r})")
    print(f"eval: {report.summary()}")
    return 0


def _speech_decode(args: argparse.Namespace) -> int:
    from mom.tokenization.speech import SpeechTokenizer
    from mom.utils.audio import read_audio, write_audio

    tokenizer = SpeechTokenizer.load(args.tokenizer)
    waveform, sr = read_audio(args.audio)
    units = tokenizer.encode(waveform, sr)
    audio, out_sr = tokenizer.decode(units)
    write_audio(args.out, audio, out_sr)
    print(f"{args.audio}: {len(waveform) / sr:.2f} s -> {units.numel()} units "
          f"({units.numel() * sr / len(waveform):.1f} units/s, {int(units.unique().numel())} distinct) -> {args.out}")
    return 0


# ---- continuous image VAE ----------------------------------------------------------------------------------------
def _vae_train(args: argparse.Namespace) -> int:
    import torch

    from mom.data.tokenizer_training import VAERecipe
    from mom.tokenization.resume import TrainingStopped, resume_path
    from mom.tokenization.vae import REPORT_FILE, train_vae

    recipe, out, device, train, held = _start_training(VAERecipe, args, need_held=True)
    t = recipe.training
    try:
        vae, report = train_vae(
            train, recipe.vae, t.steps, t.batch_size, t.lr, t.seed, device, held_out=held,
            warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, recon_loss=t.recon_loss, resume=resume_path(out),
        )  # fmt: skip
    except TrainingStopped as e:
        return _stopped(e)
    vae.save_pretrained(out)
    resume_path(out).unlink(missing_ok=True)
    return _finish_training(args, out / REPORT_FILE, device, report, threads=torch.get_num_threads())


def _vae_eval(args: argparse.Namespace) -> int:
    import numpy as np

    from mom.data.images import iter_image_records
    from mom.data.tokenizer_training import warn_skipped
    from mom.tokenization.vae import ImageVAE, evaluate_vae
    from mom.utils.devices import pick_device

    vae = ImageVAE.from_pretrained(args.vae, pick_device(args.device))
    size = vae.config.image_size
    records = [
        r
        for r in iter_image_records("folder", on_error=warn_skipped, path=args.images, size=size)
        if args.split is None or r.meta.get("split") == args.split
    ]
    if not records:
        raise ValueError(f"{args.images}: no images" + (f" with split {args.split!r}" if args.split else ""))
    metrics = evaluate_vae(vae, [r.image for r in records])
    print(json.dumps(metrics, indent=2))
    if args.save_grid:
        c, shown = vae.config.channels, [r.image for r in records[: args.grid_images]]
        originals = np.stack([np.asarray(im.convert("L" if c == 1 else "RGB")).reshape(size, size, c) for im in shown])
        reconstructions = vae.decode(vae.encode(originals))
        _save_reconstructions(args.save_grid, originals, reconstructions)  # grey (.., 1) cells are drawn grey
        print(f"wrote {args.save_grid} (originals above reconstructions)", file=sys.stderr)
    return 0


def _read_image(path: str) -> Image.Image:
    from PIL import UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: no such image") from err
    except (UnidentifiedImageError, OSError) as err:
        raise BadInputError(path, f"not a readable image ({err})") from err


def _vae_encode(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from mom.tokenization.vae import ImageVAE
    from mom.utils.atomic import atomic_save
    from mom.utils.devices import pick_device

    vae = ImageVAE.from_pretrained(args.vae, pick_device(args.device))
    images = [_read_image(p) for p in args.images]
    s = vae.config.image_size
    resized = [p for p, im in zip(args.images, images) if im.size != (s, s)]
    if resized:
        print(f"{len(resized)} image(s) centre-cropped and resized to {s}x{s}, e.g. {resized[0]}", file=sys.stderr)
    generator = torch.Generator(vae.device).manual_seed(args.seed)
    latents = vae.encode(images, sample=args.sample, generator=generator).cpu().numpy()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, latents)

    atomic_save(args.out, write)
    print(f"{len(images)} image(s) -> latents {tuple(latents.shape)} float32 (mean {latents.mean():.3f}, std "
          f"{latents.std():.3f}) -> {args.out}")  # fmt: skip
    return 0


def _vae_decode(args: argparse.Namespace) -> int:
    import numpy as np

    from mom.tokenization.vae import ImageVAE
    from mom.utils.atomic import atomic_directory
    from mom.utils.devices import pick_device

    vae = ImageVAE.from_pretrained(args.vae, pick_device(args.device))
    try:
        latents = np.load(args.latents, allow_pickle=False)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{args.latents}: no such latents file") from err
    except (ValueError, OSError, EOFError) as err:
        raise BadInputError(args.latents, f"not a .npy array ({err})") from err
    if not isinstance(latents, np.ndarray):
        raise BadInputError(args.latents, "holds several arrays (.npz); expected one .npy array of latents")
    if latents.ndim == 3:  # one image's latents
        latents = latents[None]
    images = vae.decode(latents)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    with atomic_directory(out) as tmp:
        for i, pixels in enumerate(images):
            Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(tmp / f"{i:04d}.png")
    print(f"latents {tuple(latents.shape)} -> {len(images)} PNG(s) of {images.shape[1]}x{images.shape[2]} in {out}")
    return 0


# ---- command line ------------------------------------------------------------------------------------------------
def _image_model_train_args(p: argparse.ArgumentParser, example_recipe: str, out_help: str) -> None:
    """The arguments ``image train`` and ``vae train`` share."""
    p.add_argument("--recipe", required=True, help=f"YAML recipe, e.g. {example_recipe}")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--device", help="override training.device (auto, cpu, cuda, cuda:N)")
    p.add_argument("--opt", action="append", default=[], metavar="SOURCE.KEY=VALUE",
                   help="override a source option, e.g. openmoji.path=./package (VALUE is parsed as YAML)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _image_model_eval_args(p: argparse.ArgumentParser) -> None:
    """The arguments ``image eval`` and ``vae eval`` share after the model's directory."""
    p.add_argument("--images", required=True, help="image folder, e.g. data/small/raw/images")
    p.add_argument("--split", help="only records whose captions.jsonl split is this (e.g. validation)")
    p.add_argument("--device", default="cpu", help="device to run on: auto, cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--save-grid", metavar="PNG", help="also save originals over reconstructions to this PNG")
    p.add_argument("--grid-images", type=int, default=64, help="images in the --save-grid sheet (default 64)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mom-tokenizer",
        description="Train, inspect and evaluate the text, image and speech tokenizers and the image VAE. See "
        "docs/data.md, docs/image.md, docs/speech.md, docs/transfusion.md.",
    )
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="{text,image,speech,vae}")

    text = kinds.add_parser("text", help="SentencePiece text tokenizer whose ids 0..7 are the MoM special tokens")
    sub = text.add_subparsers(dest="command", required=True, metavar="{train,encode}")
    p = command(sub, _text_train, "train", help="train on the text sources of a recipe and save to --out",
                       description="Train a SentencePiece text tokenizer on the text sources of a recipe.")
    p.add_argument("--recipe", required=True, help="YAML recipe, e.g. tokenizers/recipes/text_small.yaml")
    p.add_argument("--out", required=True, help="output directory (config.json + text.model)")
    p.add_argument("--on-error", choices=("skip", "stop"), default="skip", help="unreadable input files")
    p = command(sub, _text_encode, "encode", help="print the pieces of a text (to inspect a trained tokenizer)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory")
    p.add_argument("text", help="text to encode")

    image = kinds.add_parser("image", help="VQ-VAE image tokenizer")
    sub = image.add_subparsers(dest="command", required=True, metavar="{train,eval}")
    p = command(sub, _image_train, "train", help="train a VQ image tokenizer from a YAML recipe",
                       description="Train a VQ-VAE image tokenizer from a recipe (sources, tokenizer, training); "
                       "prints held-out PSNR and codebook usage and saves config.json, model.safetensors and "
                       "training_report.json to --out. SIGINT / SIGTERM stop it after the current step into "
                       "OUT.resume.pt (exit 130 / 143); the same command continues it.")  # fmt: skip
    _image_model_train_args(p, "tokenizers/recipes/image_small.yaml", "output tokenizer directory")
    p = command(sub, _image_eval, "eval", help="reconstruction PSNR and codebook usage on a folder of images",
                       description="Encode and decode a folder of images (captions.jsonl or <name>.txt sidecars, "
                       "as read by the 'folder' image source) and print PSNR and codebook usage.")  # fmt: skip
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (vq-image or chameleon-vqvae)")
    _image_model_eval_args(p)

    speech = kinds.add_parser("speech", help="log-mel k-means speech tokenizer")
    sub = speech.add_subparsers(dest="command", required=True, metavar="{train,eval,decode}")
    p = command(sub, _speech_train, "train", help="train a tokenizer from a YAML recipe",
                       description="Fit per-mel normalisation and a k-means codebook on the recipe's train_data, "
                       "report units/s and codebook usage (also on eval_data), save to --out.")  # fmt: skip
    p.add_argument("--recipe", required=True, help="YAML recipe, e.g. tokenizers/recipes/speech_small.yaml")
    p.add_argument("--out", required=True, help="output tokenizer directory")
    p.add_argument("--device", default=None, help="override kmeans.device (auto, cpu, cuda, cuda:N)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer in --out")
    p = command(sub, _speech_eval, "eval", help="units per second and codebook usage on a folder of clips",
                       description="Encode the clips of a folder (as read by the speech 'folder' source) and print "
                       "units/s, codebook usage (used/total) and perplexity.")  # fmt: skip
    p.add_argument("--tokenizer", required=True, help="tokenizer directory")
    p.add_argument("--data", default="data/small/raw/speech/clips", help="folder of clips (default: %(default)s)")
    p.add_argument("--split", default="validation", help="split field to keep, or 'all' (default: %(default)s)")
    p = command(sub, _speech_decode, "decode",
                help="encode an audio file and decode it back to WAV, to listen to the units",
                       description="Round trip: audio -> units -> Griffin-Lim waveform written as 16-bit WAV.")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory")
    p.add_argument("--audio", required=True, help="input WAV or FLAC file")
    p.add_argument("--out", required=True, help="output WAV file")

    vae = kinds.add_parser("vae", help="continuous image autoencoder (KL VAE) of the Transfusion setting")
    sub = vae.add_subparsers(dest="command", required=True, metavar="{train,eval,encode,decode}")
    p = command(sub, _vae_train, "train", help="train an image VAE from a YAML recipe",
                description="Train a KL-regularised convolutional image VAE from a recipe (sources, vae, training, "
                "held_out_fraction); prints held-out PSNR and the latent scaling and saves config.json, "
                "model.safetensors and training_report.json to --out. SIGINT / SIGTERM stop it after the current "
                "step into OUT.resume.pt (exit 130 / 143); the same command continues it.")  # fmt: skip
    _image_model_train_args(p, "tokenizers/recipes/vae_small.yaml", "output VAE directory")
    p = command(sub, _vae_eval, "eval", help="reconstruction PSNR and latent statistics on a folder of images",
                description="Encode (posterior mean) and decode a folder of images (captions.jsonl or <name>.txt "
                "sidecars, as read by the 'folder' image source); print PSNR and the scaled latents' mean and "
                "std.")  # fmt: skip
    p.add_argument("--vae", required=True, help="VAE directory, e.g. tokenizers/small/vae")
    _image_model_eval_args(p)
    p = command(sub, _vae_encode, "encode", help="encode image files to a .npy of scaled latents",
                description="Encode image files (centre-cropped and resized to the VAE's size if needed) to "
                "scaled latents float32 (n, latent_channels, latent_size, latent_size), saved with numpy.save.")
    p.add_argument("--vae", required=True, help="VAE directory")
    p.add_argument("--out", required=True, help="output .npy file")
    p.add_argument("--sample", action="store_true", help="draw from the posterior instead of taking its mean")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
    p.add_argument("--device", default="cpu", help="device to run on: auto, cpu, cuda, cuda:N (default cpu)")
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    p = command(sub, _vae_decode, "decode", help="decode a .npy of scaled latents to PNG files",
                description="Decode latents (n, latent_channels, latent_size, latent_size), or one image's "
                "(latent_channels, latent_size, latent_size), from a .npy file to --out/0000.png, 0001.png, ...")
    p.add_argument("--vae", required=True, help="VAE directory")
    p.add_argument("--latents", required=True, help="input .npy file (as written by `vae encode`)")
    p.add_argument("--out", required=True, help="output folder of PNGs (written whole or not at all)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--device", default="cpu", help="device to run on: auto, cpu, cuda, cuda:N (default cpu)")

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run("mom-tokenizer", lambda: args.body(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
