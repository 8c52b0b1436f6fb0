"""`mom-data`: build a tokenized corpus, and prepare its raw image and speech sources.

    mom-data build [--recipe recipes/data/small.yaml] [--out DIR] [--restart] [--check]
    mom-data images export --out DIR --source openmoji:300 --source digits:150 [--opt openmoji.path=./package]
    mom-data speech synth --texts sentences.txt --out DIR
    mom-data speech voices [--language en]
    mom-data codes --tokenizer tokenizers/small --images data/small/raw/images --text-from data/small --out DIR
    mom-data latents --vae DIR --images data/small/raw/images --text-from data/small --out data/small_latent

See docs/data.md (codes: "The Chameleon-like corpus on the GPU"), docs/image.md, docs/speech.md and (latents: the
Transfusion setting) docs/transfusion.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from mom.cli.common import add_debug_flag, run
from mom.utils.configio import parse_yaml
from mom.utils.errors import BadInputError, MissingDependencyError

DEFAULT_RECIPE = "recipes/data/small.yaml"  # the recipe of the bundled corpus data/small


def source_options(opts: Sequence[str]) -> dict[str, dict]:
    """``["openmoji.path=./package", ...]`` -> ``{"openmoji": {"path": "./package"}}``.

    Values are parsed as YAML (numbers, booleans, lists), falling back to the text itself."""
    options: dict[str, dict] = {}
    for opt in opts:
        key, sep, text = opt.partition("=")
        name, dot, option = key.partition(".")
        if not sep or not dot or not name or not option:
            raise ValueError(f"--opt {opt!r}: expected SOURCE.KEY=VALUE, e.g. openmoji.path=./package")
        try:
            value = parse_yaml(text)
        except yaml.YAMLError:  # not YAML (e.g. "a: b: c"): the text itself
            value = text
        options.setdefault(name, {})[option] = value
    return options


def command(sub: Any, body: Callable[[argparse.Namespace], int], name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """Add to ``sub`` (``add_subparsers()``) the leaf command ``name``, with ``--debug``, that runs ``body(args)``."""
    parser = sub.add_parser(name, **kwargs)
    parser.set_defaults(body=body)
    add_debug_flag(parser)
    return parser


# ---- build -------------------------------------------------------------------------------------------------------
def _build(args: argparse.Namespace) -> int:
    from mom.data.build import BuildRecipe, build, format_summary, missing_requirements

    if args.recipe == DEFAULT_RECIPE and not Path(DEFAULT_RECIPE).is_file():
        raise FileNotFoundError(f"{DEFAULT_RECIPE} not found: run from the repository root or pass --recipe")
    recipe = BuildRecipe.from_yaml(args.recipe)
    if args.check:
        missing = missing_requirements(recipe)
        if missing:
            raise MissingDependencyError("the recipe needs, missing here:\n  " + "\n  ".join(missing))
        print(f"{args.recipe}: OK, every requirement is installed")
        return 0
    try:
        manifest = build(recipe, args.out, restart=args.restart)
    except BadInputError as e:
        raise BadInputError(e.path, f"{e.reason} (on_error: skip in the recipe skips such items)") from e
    except KeyboardInterrupt:
        print("\nrerun the same command to resume from the completed work", file=sys.stderr)
        raise
    total = sum(s["documents"] for s in manifest["splits"].values())
    print(f"built {args.out or recipe.out}: {total:,} documents in {manifest['build_seconds']} s")
    print(format_summary(manifest))
    return 0


# ---- images ------------------------------------------------------------------------------------------------------
def _images_export(args: argparse.Namespace) -> int:
    from mom.data.images import export_images

    options = source_options(args.opt)
    sources = []
    for spec in args.source:
        name, _, count = spec.partition(":")
        if count and not count.isdigit():
            raise ValueError(f"--source {spec!r}: expected NAME[:COUNT] with a whole number of images")
        sources.append((name, int(count) if count else None, options.pop(name, {})))
    if options:
        raise ValueError(f"--opt names sources not given with --source: {sorted(options)}")
    summary = export_images(
        args.out, sources, size=args.size, held_out=args.held_out, seed=args.seed, overwrite=args.overwrite
    )
    print(json.dumps(summary, indent=2))
    return 0


# ---- speech ------------------------------------------------------------------------------------------------------
def _speech_synth(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mom.data.speech import SpeechRecord, assign_split, iter_speech_records, write_speech_folder

    texts = [t for t in Path(args.texts).read_text(encoding="utf-8").splitlines() if t.strip()]
    skipped: list[BadInputError] = []
    records = iter_speech_records("espeak", on_error=skipped.append, texts=texts, voices=args.voices,
                                  speed_range=args.speed_range, pitch_range=args.pitch_range, seed=args.seed,
                                  sample_rate=args.sample_rate)  # fmt: skip
    kept: list[SpeechRecord] = []

    def progress() -> Iterator[SpeechRecord]:
        for r in tqdm(records, total=len(texts), desc="synthesising", unit="clip"):
            kept.append(r)
            yield r

    n = write_speech_folder(progress(), args.out, audio_format=args.format, bits=args.bits,
                            validation_fraction=args.validation_fraction, overwrite=args.overwrite)  # fmt: skip
    seconds = sum(r.duration for r in kept)
    n_val = sum(assign_split(r.transcript, args.validation_fraction) == "validation" for r in kept)
    size = sum(f.stat().st_size for f in Path(args.out).iterdir())
    print(f"wrote {n} clips ({n - n_val} train, {n_val} validation), {seconds:.1f} s of audio, "
          f"{size / 1e6:.2f} MB, to {args.out}; skipped {len(skipped)}")  # fmt: skip
    for e in skipped:
        print(f"  skipped {e}", file=sys.stderr)
    return 0


def _speech_voices(args: argparse.Namespace) -> int:
    from mom.data.speech import list_voices

    for name in list_voices(args.language):
        print(name)
    return 0


# ---- command line ------------------------------------------------------------------------------------------------
def _latents(args: argparse.Namespace) -> int:
    from mom.data.latent_corpus import build_latent_corpus
    from mom.generation.image_diffusion import load_vae
    from mom.tokenization.multimodal import MultimodalTokenizer
    from mom.utils.devices import pick_device

    vae = load_vae(args.vae).to(pick_device(args.device))
    tokenizer = MultimodalTokenizer.load(args.tokenizer)
    records = _folder_records(args.images or ["data/small/raw/images"], int(vae.config.image_size), args)
    manifest = build_latent_corpus(records, vae, tokenizer, args.out, patch_size=args.patch_size,
                                   **_captioned_options(args))
    print(f"built {args.out}: {_splits(manifest)}; latent {manifest['latent']}")
    return 0


def _codes(args: argparse.Namespace) -> int:
    from mom.data.captioned import build_code_corpus
    from mom.tokenization.multimodal import MultimodalTokenizer
    from mom.utils.devices import pick_device

    tokenizer = MultimodalTokenizer.load(args.tokenizer)
    image = tokenizer.image.to(pick_device(args.device))
    records = _folder_records(args.images, int(image.image_size), args)
    manifest = build_code_corpus(records, tokenizer, args.out, batch_size=args.batch_size, **_captioned_options(args))
    print(f"built {args.out}: {_splits(manifest)}; {manifest['image_tokens']} codes an image")
    return 0


def _captioned_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options `codes` and `latents` pass on to `mom.data.captioned.build_captioned_corpus`."""
    return dict(caption_first=args.caption_first, validation_fraction=args.validation_fraction, seed=args.seed,
                name=Path(args.out).name, text_from=args.text_from)


def _splits(manifest: dict) -> str:
    """``train 1,234 documents / 56,789 tokens {'text': ..., 'image': ...}, validation ...``"""
    return ", ".join(f"{split} {s['documents']:,} documents / {s['tokens']:,} tokens {s['tokens_per_modality']}"
                     for split, s in manifest["splits"].items())


def _folder_records(folders: Sequence[str], size: int, args: argparse.Namespace) -> Iterator[Any]:
    """The captioned images of exported folders at ``size``, ``--limit`` of each, each with ``--augment`` variants
    (folder i seeds its variants with i); a bad file stops the command, named."""
    from mom.data.images import iter_image_records

    return itertools.chain.from_iterable(
        iter_image_records("folder", path=folder, size=size, limit=args.limit, augment=args.augment,
                           augment_seed=index, on_error=_raise_bad)
        for index, folder in enumerate(folders))


def _raise_bad(error: BadInputError) -> None:
    raise error


def build_parser() -> argparse.ArgumentParser:
    from mom.data.images import SOURCES
    from mom.data.speech import DEFAULT_VOICES

    parser = argparse.ArgumentParser(
        prog="mom-data",
        description="Build a tokenized interleaved text/image/speech corpus, and prepare its raw image and speech "
        "sources. See docs/data.md.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{build,images,speech,codes,latents}")

    p = command(sub, _build, "build",
        help="build a corpus (Parquet shards + manifest.json) from a recipe",
        description="Build a tokenized interleaved text/image/speech corpus (Parquet shards + manifest.json) from a "
        "recipe. Rerunning after an interruption resumes from the completed work.",
    )
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help="corpus recipe YAML (default: %(default)s)")
    p.add_argument("--out", help="output directory (default: the recipe's `out`)")
    p.add_argument("--restart", action="store_true", help="discard earlier (partial or complete) output first")
    p.add_argument("--check", action="store_true", help="only check the recipe and list what it needs but is missing")

    images = sub.add_parser("images", help="image sources: export a sample to a folder")
    images_sub = images.add_subparsers(dest="images_command", required=True, metavar="{export}")
    p = command(images_sub, _images_export, "export",
        help="sample images from sources into a folder of PNGs + captions.jsonl",
        description="Sample captioned images from sources into OUT/ (one PNG per image + captions.jsonl with "
        "file, caption, source, split, id, metadata). Example: --source openmoji:250 --source digits:150 "
        "--opt openmoji.path=./package",
    )
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--source", action="append", required=True, metavar="NAME[:COUNT]",
                   help=f"a source ({', '.join(SOURCES)}) and how many images to take (all if no count)")
    p.add_argument("--opt", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="a source option, e.g. openmoji.path=./package (VALUE is parsed as YAML)")
    p.add_argument("--size", type=int, default=32, help="square side in pixels (default 32)")
    p.add_argument("--held-out", type=float, default=0.1, help="fraction of each source marked validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the random sample and the held-out split")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    speech = sub.add_parser("speech", help="speech sources: synthesise clips with espeak-ng, list voices")
    speech_sub = speech.add_subparsers(dest="speech_command", required=True, metavar="{synth,voices}")
    p = command(speech_sub, _speech_synth, "synth",
        help="synthesise one espeak-ng clip per line of a text file into a folder",
        description="Synthesise one clip per non-empty line of --texts with espeak-ng (voice, speed and pitch drawn "
        "per clip from --seed) and write NNNNN.flac + transcripts.jsonl.",
    )
    p.add_argument("--texts", required=True, help="UTF-8 text file, one utterance per line")
    p.add_argument("--out", required=True, help="output folder (readable with the 'folder' source)")
    p.add_argument("--voices", nargs="+", default=list(DEFAULT_VOICES), help="espeak-ng voices[+variant] to draw from")
    p.add_argument("--speed-range", nargs=2, type=int, default=[140, 200], metavar=("LOW", "HIGH"),
                   help="words per minute (default: 140 200)")
    p.add_argument("--pitch-range", nargs=2, type=int, default=[30, 70], metavar=("LOW", "HIGH"),
                   help="espeak-ng pitch 0-99 (default: 30 70)")
    p.add_argument("--seed", type=int, default=0, help="seed of the voice/speed/pitch draws (default: 0)")
    p.add_argument("--sample-rate", type=int, default=16_000, help="output sample rate in Hz (default: 16000)")
    p.add_argument("--format", choices=("flac", "wav"), default="flac", help="audio file format (default: flac)")
    p.add_argument("--bits", type=int, default=16, help="significant bits per sample, 8-16 (default: 16)")
    p.add_argument("--validation-fraction", type=float, default=0.1,
                   help="fraction of transcripts marked split=validation (default: 0.1)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p = command(speech_sub, _speech_voices, "voices", help="list installed espeak-ng voices",
                description="List installed espeak-ng voices (MBROLA voices excluded).")
    p.add_argument("--language", default=None, help="language filter, e.g. 'en'; 'variant' lists voice variants")

    p = command(sub, _codes, "codes",
        help="build a discrete corpus of captioned images as VQ codes beside the text documents of another corpus",
        description="Encode folders of captioned images (captions.jsonl, as `mom-data images export` writes them) "
        "with a multimodal tokenizer's image VQ and write a corpus of <s> caption <image> codes </image> </s> "
        "documents (and image-first ones), plus the text documents of --text-from: the Chameleon-like setting's "
        "corpus, built where the images and the tokenizer are (docs/data.md).",
    )
    p.add_argument("--tokenizer", required=True, help="multimodal tokenizer directory: its text part encodes the "
                   "captions, its image part the images (e.g. tokenizers/medium)")
    p.add_argument("--images", action="append", required=True, help="folder of images + captions.jsonl, repeatable")
    p.add_argument("--augment", type=int, default=0, help="augmented variants per image (flips, shifts, colour "
                   "jitter as the image sources' augment option), in the same split as their original")
    p.add_argument("--out", required=True, help="output corpus directory (must not exist)")
    p.add_argument("--text-from", help="a corpus of discrete tokens (mom-data build, same text tokenizer) whose text "
                   "documents are added, e.g. data/medium_img32")
    p.add_argument("--caption-first", type=float, default=0.5, help="share of documents with the caption first")
    p.add_argument("--validation-fraction", type=float, default=0.1, help="share of images held out, drawn per "
                   "image as mom-data build draws it (its augmented variants in its split)")
    p.add_argument("--limit", type=int, default=None, help="at most this many images of each folder")
    p.add_argument("--device", default="cpu",
                   help="where the image VQ encodes (auto, cpu, cuda, cuda:N; default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="images encoded at once (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)

    p = command(sub, _latents, "latents",
        help="build a Transfusion corpus: captioned images as VAE latents beside the caption tokens",
        description="Encode a folder of captioned images (captions.jsonl, as data/small/raw/images) with an image VAE "
        "and write a corpus of <s> caption <image> latent patches </image> </s> documents (and image-first ones) for "
        "the Transfusion setting (docs/transfusion.md).",
    )
    p.add_argument("--vae", required=True, help="image VAE directory (mom.tokenization.vae)")
    p.add_argument("--tokenizer", default="tokenizers/small", help="multimodal tokenizer whose text part encodes "
                   "the captions (default: %(default)s)")
    p.add_argument("--images", action="append", help="folder of images + captions.jsonl, repeatable "
                   "(default: data/small/raw/images)")
    p.add_argument("--augment", type=int, default=0, help="augmented variants per image (flips, shifts, colour "
                   "jitter as the image sources' augment option), in the same split as their original")
    p.add_argument("--out", required=True, help="output corpus directory (must not exist)")
    p.add_argument("--patch-size", type=int, default=2, help="latent patch side: one position per p x p patch")
    p.add_argument("--caption-first", type=float, default=0.5, help="share of documents with the caption first")
    p.add_argument("--validation-fraction", type=float, default=0.1, help="share of images held out")
    p.add_argument("--limit", type=int, default=None, help="at most this many images of each folder")
    p.add_argument("--text-from", help="a corpus of discrete tokens (mom-data build, same text tokenizer) whose text "
                   "documents are added, e.g. data/small")
    p.add_argument("--device", default="cpu",
                   help="where the VAE encodes (auto, cpu, cuda, cuda:N; default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run("mom-data", lambda: args.body(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
