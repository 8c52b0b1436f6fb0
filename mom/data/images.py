"""Real captioned images from offline sources, as :class:`ImageRecord` streams.

Sources (``iter_image_records(source, ...)``):

* ``"openmoji"``: the npm package ``openmoji`` (colour emoji SVGs + ``data/openmoji.json``; CC BY-SA 4.0),
  rasterised with ``cairosvg`` or ``resvg-py``; captioned from the annotation, group and tags.
* ``"noto-emoji"``: Debian's ``fonts-noto-color-emoji`` font rendered with Pillow; captioned from the Unicode name.
* ``"digits"``: scikit-learn's bundled ``load_digits`` (1,797 8x8 grey digits), upscaled and given a coloured ink.
* ``"tuxpaint"``: Debian's ``tuxpaint-stamps-default`` drawings with their English descriptions
  (:mod:`mom.data.tuxpaint`; GPL-2.0-or-later), padded to a square on white.
* ``"openclipart"``: Debian's ``openclipart-svg``, rasterised (or the PNGs of ``openclipart-png`` with
  ``png_path=/usr/share/openclipart/png``: slower, some are 10,000+ pixels wide), captioned from each SVG's title,
  description and keywords (:mod:`mom.data.openclipart`; public domain), padded to a square.
* ``"folder"``: a folder of images with captions (``captions.jsonl`` or a ``<name>.txt`` sidecar per image).
* ``"hf-dataset"``: a Hugging Face ``datasets`` dataset saved with ``save_to_disk`` (read with ``load_from_disk``).

Options common to every source: ``size`` (square side in pixels; centre-crop then resize), ``limit`` (at most this
many source images), ``seed`` (shuffle the source order deterministically before ``limit``), ``augment`` (``k``
extra augmented variants per image, so the image side grows ``k + 1`` times) and ``augment_seed``.

Transparent pixels are composited onto white. An unusable item (corrupt file, empty caption) is passed to
``on_error`` as a :class:`BadInputError` and skipped; the callback may raise to stop. :func:`export_images`
(command line: ``mom-data images export``) writes a sample of sources to a folder (the committed small raw image set).
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps, UnidentifiedImageError

from mom.utils.atomic import atomic_directory
from mom.utils.errors import BadInputError, MissingDependencyError

SOURCES = ("openmoji", "noto-emoji", "digits", "tuxpaint", "openclipart", "folder", "hf-dataset")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")
NOTO_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"  # Debian's fonts-noto-color-emoji
NOTO_BITMAP_SIZE = 109  # the only pixel size of Noto's CBDT bitmap strikes (glyphs render as 136x128)
OPENMOJI_VIEWBOX = 72  # OpenMoji SVGs are drawn on a 72x72 grid
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_INKS = {  # ink colours of the digits source (name -> RGB); the colour name is in the caption
    "black": (20, 20, 20),
    "blue": (30, 60, 200),
    "red": (200, 30, 30),
    "green": (30, 140, 50),
    "purple": (120, 40, 160),
    "orange": (230, 120, 20),
}
# Captions naming a direction would be wrong after a mirror image, so those images are never flipped.
_DIRECTIONAL = re.compile(r"\b(left|right|leftwards|rightwards|clockwise|anticlockwise|counterclockwise)\b")


@dataclass
class ImageRecord:
    """One image with its caption. ``meta["id"]`` identifies the source item; ``meta["variant"]`` is 0 for the
    original and 1..k for augmented copies."""

    image: Image.Image  # RGB
    caption: str
    source: str
    meta: dict = field(default_factory=dict)


@dataclass
class _Item:
    """A lazily loaded source image: ``load()`` returns (image, caption, meta), ``None`` to skip silently, or
    raises :class:`BadInputError`."""

    key: str
    load: Callable[[], tuple[Image.Image, str, dict] | None]
    source: str
    flip_ok: bool = True


def iter_image_records(
    source: str,
    *,
    on_error: Callable[[BadInputError], None],
    size: int | None = None,
    limit: int | None = None,
    seed: int | None = None,
    augment: int = 0,
    augment_seed: int = 0,
    **options: Any,
) -> Iterator[ImageRecord]:
    """Yield captioned RGB images from ``source`` (one of :data:`SOURCES`); see the module docstring.

    ``options`` are the source's own (e.g. ``path=``); an unknown one raises ``ValueError`` naming it.
    """
    if source not in _SOURCE_FACTORIES:
        raise ValueError(f"unknown image source {source!r}; valid sources are {list(SOURCES)}")
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ValueError(f"size: must be a positive integer or None, got {size!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit: must be a non-negative integer or None, got {limit!r}")
    if not isinstance(augment, int) or augment < 0:
        raise ValueError(f"augment: must be a non-negative integer, got {augment!r}")
    factory, allowed = _SOURCE_FACTORIES[source]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{source}: unknown option(s) {unknown}; valid options are {sorted(allowed)}")
    items = factory(size=size, **options)
    if seed is not None:
        random.Random(seed).shuffle(items)
    produced = 0
    for item in items:
        if limit is not None and produced >= limit:
            return
        try:
            loaded = item.load()
        except BadInputError as err:
            on_error(err)
            continue
        if loaded is None:
            continue
        image, caption, meta = loaded
        caption = " ".join(caption.split())
        if not caption:
            on_error(BadInputError(item.key, "empty caption"))
            continue
        image = _fit(_to_rgb(image), size)
        produced += 1
        meta = {"id": item.key, "variant": 0, **meta}
        yield ImageRecord(image=image, caption=caption, source=item.source, meta=meta)
        flip_ok = item.flip_ok and not _DIRECTIONAL.search(caption.lower())
        for variant in range(1, augment + 1):
            rng = random.Random(f"{augment_seed}:{item.source}:{item.key}:{variant}")
            yield ImageRecord(
                image=augment_image(image, rng, flip=flip_ok),
                caption=caption,
                source=item.source,
                meta={**meta, "variant": variant},
            )


# ---- image helpers -----------------------------------------------------------------------------------------------
def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of ``image``; transparency is composited onto white."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _fit(image: Image.Image, size: int | None) -> Image.Image:
    """Centre-crop to a square and resize to ``size`` x ``size`` (no-op when ``size`` is None)."""
    if size is None or image.size == (size, size):
        return image
    return ImageOps.fit(image, (size, size), method=Image.Resampling.LANCZOS)


def augment_image(image: Image.Image, rng: random.Random, *, flip: bool = True) -> Image.Image:
    """A random variant of ``image`` (same size): crop of 75-100% of the side, resized back; brightness, contrast
    and saturation each scaled by 0.8-1.2 (no hue change: captions may name colours); mirrored with p=0.5 if
    ``flip``. Deterministic given the state of ``rng``."""
    w, h = image.size
    scale = rng.uniform(0.75, 1.0)
    cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    out = image.resize((w, h), Image.Resampling.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enhancer(out).enhance(rng.uniform(0.8, 1.2))
    if flip and rng.random() < 0.5:
        out = ImageOps.mirror(out)
    return out


def _open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy() if im.mode != "P" else im.convert("RGBA")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadInputError(str(path), f"cannot read image ({type(err).__name__}: {err})") from err


# ---- openmoji ----------------------------------------------------------------------------------------------------
_OPENMOJI_HELP = (
    "the 'openmoji' source needs the npm package openmoji unpacked on disk: run `npm pack openmoji && tar xzf "
    "openmoji-*.tgz` (unpacks to ./package) or `npm install openmoji` (./node_modules/openmoji), then pass "
    "path=<that directory>"
)


def _render_cairosvg(path: Path, size: int) -> Image.Image:
    import cairosvg

    png = cairosvg.svg2png(url=str(path), output_width=size, output_height=size)
    return Image.open(io.BytesIO(png)).convert("RGBA")


# CSS absolute units in px (96 px per inch): resvg-py rejects a root <svg> whose width / height carry such units
_SVG_UNITS_PX = {"pt": 96 / 72, "pc": 16.0, "mm": 96 / 25.4, "cm": 96 / 2.54, "in": 96.0}
_SVG_ROOT_SIZE = re.compile(r'(\b(?:width|height)=["\'])([\d.]+)(pt|pc|mm|cm|in)(["\'])')


def _svg_px_sizes(svg: str) -> str:
    """``svg`` with its root element's width / height in absolute units (``400pt``) rewritten in px."""
    root = re.search(r"<svg\b[^>]*>", svg)
    if root is None:
        return svg
    fixed = _SVG_ROOT_SIZE.sub(
        lambda m: f"{m.group(1)}{float(m.group(2)) * _SVG_UNITS_PX[m.group(3)]:.4f}{m.group(4)}", root.group(0)
    )
    return svg[: root.start()] + fixed + svg[root.end() :]


def _render_resvg(path: Path, size: int) -> Image.Image:
    import resvg_py

    try:
        png = resvg_py.svg_to_bytes(svg_path=str(path), width=size, height=size)
    except ValueError as err:
        if "invalid size" not in str(err):
            raise
        svg = _svg_px_sizes(path.read_text(encoding="utf-8", errors="replace"))
        png = resvg_py.svg_to_bytes(svg_string=svg, width=size, height=size)
    return Image.open(io.BytesIO(bytes(png))).convert("RGBA")


def _svg_rasterizer(name: str) -> Callable[[Path, int], Image.Image]:
    """SVG file -> RGBA image of side ``size``, with cairosvg (needs libcairo2) and/or resvg-py.

    ``"auto"`` uses every one installed, trying the next when one fails on a file.
    """
    if name not in ("auto", "cairosvg", "resvg"):
        raise ValueError(f"openmoji: rasterizer must be 'auto', 'cairosvg' or 'resvg', got {name!r}")
    renderers, errors = [], []
    for module, renderer in (("cairosvg", _render_cairosvg), ("resvg_py", _render_resvg)):
        if name != "auto" and not module.startswith(name):
            continue
        try:
            __import__(module)  # cairosvg raises OSError when the cairo C library is missing
            renderers.append(renderer)
        except (ImportError, OSError) as err:
            errors.append(f"{module}: {err}")
    if not renderers:
        raise MissingDependencyError(
            "no SVG rasteriser for the 'openmoji' source: `pip install resvg-py`, or `pip install cairosvg` with "
            f"`apt-get install libcairo2` ({'; '.join(errors)})"
        )

    def render(path: Path, size: int) -> Image.Image:
        for renderer in renderers[:-1]:
            try:
                return renderer(path, size)
            except Exception:  # noqa: BLE001 - rasterisers raise many types on SVG features they lack
                pass
        return renderers[-1](path, size)

    return render


def _openmoji_root(path: str | os.PathLike | None) -> Path:
    if path is None:
        raise MissingDependencyError(_OPENMOJI_HELP)
    root = Path(path)
    for candidate in (root, root / "package", root / "node_modules" / "openmoji"):
        if (candidate / "data" / "openmoji.json").is_file() and (candidate / "color" / "svg").is_dir():
            return candidate
    raise MissingDependencyError(f"{root} holds no data/openmoji.json and color/svg/: {_OPENMOJI_HELP}")


def _openmoji_caption(entry: dict, n_tags: int) -> str:
    group = str(entry.get("group", "")).strip()
    group_words = {"extras-openmoji": "openmoji extra", "extras-unicode": "unicode extra"}.get(
        group, group.replace("-", " and ") if group.count("-") == 1 else group
    )
    caption = str(entry.get("annotation", "")).strip()
    if caption and group_words:
        caption = f"{caption}, a {group_words} emoji"
    tags = [t.strip() for t in f"{entry.get('openmoji_tags', '')},{entry.get('tags', '')}".split(",") if t.strip()]
    tags = list(dict.fromkeys(t for t in tags if t.lower() not in caption.lower()))[:n_tags]
    if caption and tags:
        caption += f" ({', '.join(tags)})"
    return caption


def _openmoji_items(
    *,
    size: int | None,
    path: str | None = None,
    skin_tones: bool = False,
    groups: Sequence[str] | None = None,
    caption_tags: int = 3,
    rasterizer: str = "auto",
) -> list[_Item]:
    root = _openmoji_root(path)
    render = _svg_rasterizer(rasterizer)
    side = size or OPENMOJI_VIEWBOX
    entries = json.loads((root / "data" / "openmoji.json").read_text(encoding="utf-8"))
    items = []
    for entry in entries:
        if not skin_tones and str(entry.get("skintone", "")) != "":
            continue
        if groups is not None and entry.get("group") not in groups:
            continue
        hexcode = str(entry.get("hexcode", ""))
        svg = root / "color" / "svg" / f"{hexcode}.svg"

        def load(svg: Path = svg, entry: dict = entry) -> tuple[Image.Image, str, dict]:
            if not svg.is_file():
                raise BadInputError(str(svg), "SVG file listed in openmoji.json is missing")
            try:
                image = render(svg, side)
            except Exception as err:  # rasterisers raise many types on a malformed SVG
                raise BadInputError(str(svg), f"cannot rasterise SVG ({type(err).__name__}: {err})") from err
            meta = {k: entry.get(k, "") for k in ("hexcode", "emoji", "group", "subgroups", "openmoji_author")}
            return image, _openmoji_caption(entry, caption_tags), {**meta, "license": "CC BY-SA 4.0"}

        items.append(_Item(key=hexcode, load=load, source="openmoji"))
    return items


# ---- noto-emoji --------------------------------------------------------------------------------------------------
# Code points tried against the font: the Latin-1 symbols, general punctuation .. misc symbols and arrows, CJK
# symbols, and the supplementary emoji planes. Code points without a glyph in the font are skipped silently.
_NOTO_RANGES = ((0xA9, 0xAF), (0x2000, 0x2C00), (0x3030, 0x3300), (0x1F000, 0x1FB00))


def _noto_items(*, size: int | None, font: str = NOTO_FONT) -> list[_Item]:
    if not Path(font).is_file():
        raise MissingDependencyError(
            f"the 'noto-emoji' source needs the Noto Color Emoji font at {font}: "
            "`apt-get install fonts-noto-color-emoji` (or pass font=<path to NotoColorEmoji.ttf>)"
        )
    try:
        face = ImageFont.truetype(font, NOTO_BITMAP_SIZE, layout_engine=ImageFont.Layout.BASIC)
    except OSError as err:
        raise BadInputError(font, f"cannot open font ({err})") from err
    side = size or 128

    def load(ch: str) -> tuple[Image.Image, str, dict] | None:
        try:
            _, _, right, bottom = face.getbbox(ch)
            canvas = Image.new("RGBA", (max(right, 1), max(bottom, 1)), (0, 0, 0, 0))
            ImageDraw.Draw(canvas).text((0, 0), ch, font=face, embedded_color=True)
        except (OSError, RuntimeError, ValueError):
            return None  # FreeType cannot lay this code point out: not in the font
        if canvas.getchannel("A").getbbox() is None:
            return None  # no glyph for this code point
        square = Image.new("RGBA", (max(canvas.size),) * 2, (0, 0, 0, 0))
        square.paste(canvas, ((square.width - canvas.width) // 2, (square.height - canvas.height) // 2))
        square = square.resize((side, side), Image.Resampling.LANCZOS)
        name = unicodedata.name(ch).lower()
        return square, f"{name}, an emoji", {"codepoint": f"U+{ord(ch):04X}", "emoji": ch}

    items = []
    for lo, hi in _NOTO_RANGES:
        for cp in range(lo, hi):
            if unicodedata.name(chr(cp), ""):
                items.append(_Item(key=f"U+{cp:04X}", load=lambda cp=cp: load(chr(cp)), source="noto-emoji"))
    return items


# ---- digits ------------------------------------------------------------------------------------------------------
def _digit_items(*, size: int | None, colourise: bool = True) -> list[_Item]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise MissingDependencyError("the 'digits' source needs scikit-learn: `pip install scikit-learn`") from err
    digits = load_digits()
    side = size or 32
    inks = list(DIGIT_INKS.items()) if colourise else [("black", DIGIT_INKS["black"])]

    def load(i: int) -> tuple[Image.Image, str, dict]:
        grey = Image.fromarray((digits.images[i] * (255 / 16)).astype("uint8"), mode="L")  # values are 0..16
        ink = grey.resize((side, side), Image.Resampling.BICUBIC)
        name, rgb = inks[i % len(inks)]
        image = Image.composite(Image.new("RGB", ink.size, rgb), Image.new("RGB", ink.size, (255, 255, 255)), ink)
        label = int(digits.target[i])
        caption = f"a handwritten digit {DIGIT_WORDS[label]}" + (f" in {name}" if colourise else "")
        return image, caption, {"label": label, "ink": name, "license": "CC BY 4.0 (UCI optdigits)"}

    # A mirrored digit is not a digit, so these are never flipped.
    return [
        _Item(key=f"digit-{i:04d}", load=lambda i=i: load(i), source="digits", flip_ok=False)
        for i in range(len(digits.images))
    ]


# ---- tuxpaint, openclipart: drawings padded to a square ---------------------------------------------------------
def _pad_square(image: Image.Image) -> Image.Image:
    """``image`` (RGB) centred on a white square of its longer side: a drawing keeps all of itself."""
    if image.width == image.height:
        return image
    square = Image.new("RGB", (max(image.size),) * 2, (255, 255, 255))
    square.paste(image, ((square.width - image.width) // 2, (square.height - image.height) // 2))
    return square


def _drawing(path: Path, svg_side: int, rasterizer: str) -> Image.Image:
    """A PNG (or other bitmap) or an SVG rasterised at ``svg_side``, as an RGB square on white."""
    if path.suffix.lower() != ".svg":
        return _pad_square(_to_rgb(_open_image(path)))
    render = _svg_rasterizer(rasterizer)
    try:
        return _pad_square(_to_rgb(render(path, svg_side)))
    except Exception as err:  # rasterisers raise many types on a malformed SVG
        raise BadInputError(str(path), f"cannot rasterise SVG ({type(err).__name__}: {err})") from err


def _tuxpaint_items(*, size: int | None, path: str | None = None, rasterizer: str = "auto") -> list[_Item]:
    from mom.data.tuxpaint import ENGLISH, list_stamps, stamps_root

    stamps = list_stamps(stamps_root(path))
    side = size or 128

    def load(stamp) -> tuple[Image.Image, str, dict]:
        if stamp.error is not None:
            raise stamp.error
        if stamp.image is None:
            raise BadInputError(stamp.key, "description without a drawing (no .png or .svg)")
        caption = stamp.descriptions.get(ENGLISH, "")
        meta = {"category": stamp.category, "license": "GPL-2.0-or-later"}
        return _drawing(stamp.image, side, rasterizer), caption, meta

    return [
        _Item(key=s.key, load=lambda s=s: load(s), source="tuxpaint", flip_ok=s.flip_ok)
        for s in stamps
        if s.image is not None or s.error is not None
    ]


def _openclipart_items(
    *,
    size: int | None,
    path: str | None = None,
    png_path: str | None = None,
    rasterizer: str = "auto",
    keywords: int = 3,
) -> list[_Item]:
    from mom.data import openclipart

    root = Path(path or openclipart.OPENCLIPART_SVG_DIR)
    if not root.is_dir():
        raise MissingDependencyError(
            f"the 'openclipart' source needs the Open Clip Art SVGs at {root}: `apt-get install openclipart-svg` "
            "(and optionally openclipart-png for ready-made bitmaps), or pass path=<a folder of SVGs>"
        )
    png_root = Path(png_path) if png_path else None
    side = size or 128

    def load(svg: Path) -> tuple[Image.Image, str, dict]:
        rel = svg.relative_to(root)
        try:
            metadata = openclipart.svg_metadata(svg.read_text(encoding="utf-8", errors="replace"))
        except OSError as err:
            raise BadInputError(str(svg), f"cannot read ({err})") from err
        caption = openclipart.clipart_caption(metadata, rel.parent.as_posix(), keywords)
        png = png_root / rel.with_suffix(".png") if png_root is not None else None
        image = _drawing(png if png is not None and png.is_file() else svg, side, rasterizer)
        return image, caption, {"file": rel.as_posix(), "license": "public domain"}

    return [
        _Item(
            key=svg.relative_to(root).with_suffix("").as_posix(), load=lambda svg=svg: load(svg), source="openclipart"
        )
        for svg in openclipart.clipart_files(root)
    ]


# ---- folder ------------------------------------------------------------------------------------------------------
def _folder_items(*, size: int | None, path: str | None = None, captions: str = "captions.jsonl") -> list[_Item]:
    if path is None:
        raise ValueError("folder: option 'path' (the image folder) is required")
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"folder: {root} is not a directory")
    jsonl = root / captions
    items: list[_Item] = []
    if jsonl.is_file():
        with jsonl.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{jsonl}:{lineno}"
                try:
                    entry = json.loads(line)
                    file, caption = entry.pop("file"), entry.pop("caption")
                    if not isinstance(file, str) or not isinstance(caption, str):
                        raise TypeError("'file' and 'caption' must be strings")
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                    bad = BadInputError(where, f"bad captions line ({type(err).__name__}: {err})")
                    items.append(_Item(key=where, load=lambda bad=bad: _raise(bad), source="folder"))
                    continue
                source = str(entry.pop("source", "folder"))

                def load(file: str = file, caption: str = caption, entry: dict = entry) -> tuple:
                    image = _open_image(root / file)
                    if not caption.strip():
                        raise BadInputError(str(root / file), "empty caption")
                    return image, caption, {"file": file, **entry}

                items.append(_Item(key=Path(file).stem, load=load, source=source))
        return items
    for image_path in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):

        def load_sidecar(image_path: Path = image_path) -> tuple:
            sidecar = image_path.with_suffix(".txt")
            if not sidecar.is_file():
                raise BadInputError(str(image_path), f"no caption: expected {sidecar.name} or an entry in {captions}")
            caption = sidecar.read_text(encoding="utf-8", errors="replace")
            if not caption.strip():
                raise BadInputError(str(sidecar), "empty caption")
            return _open_image(image_path), caption, {"file": image_path.name}

        items.append(_Item(key=image_path.stem, load=load_sidecar, source="folder"))
    return items


def _raise(err: BadInputError) -> None:
    raise err


# ---- hf-dataset --------------------------------------------------------------------------------------------------
def _hf_items(
    *,
    size: int | None,
    path: str | None = None,
    split: str | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
) -> list[_Item]:
    try:
        import datasets
    except ImportError as err:
        raise MissingDependencyError("the 'hf-dataset' source needs `pip install datasets`") from err
    if path is None:
        raise ValueError("hf-dataset: option 'path' (a dataset saved with save_to_disk) is required")
    if not Path(path).is_dir():
        raise ValueError(f"hf-dataset: {path} is not a directory")
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split is None or split not in ds:
            raise ValueError(f"hf-dataset: {path} holds splits {list(ds)}; choose one with split=<name>")
        ds = ds[split]
    for option, column in (("image_column", image_column), ("caption_column", caption_column)):
        if column not in ds.column_names:
            raise ValueError(f"hf-dataset: {option}={column!r} is not a column of {path}; columns: {ds.column_names}")

    def load(i: int) -> tuple:
        row = ds[i]
        cell, caption, where = row[image_column], row[caption_column], f"{path}[{i}]"
        if isinstance(cell, Image.Image):
            image = cell
        elif isinstance(cell, dict) and cell.get("bytes"):
            try:
                image = Image.open(io.BytesIO(cell["bytes"]))
                image.load()
            except (UnidentifiedImageError, OSError) as err:
                raise BadInputError(where, f"cannot decode image bytes ({err})") from err
        elif (isinstance(cell, dict) and cell.get("path")) or isinstance(cell, str):
            image = _open_image(Path(cell["path"] if isinstance(cell, dict) else cell))
        else:
            raise BadInputError(where, f"unsupported image cell of type {type(cell).__name__}")
        if not isinstance(caption, str):
            raise BadInputError(where, f"caption is {type(caption).__name__}, not a string")
        return image, caption, {"row": i}

    return [_Item(key=f"row-{i}", load=lambda i=i: load(i), source="hf-dataset") for i in range(len(ds))]


_SOURCE_FACTORIES: dict[str, tuple[Callable[..., list[_Item]], tuple[str, ...]]] = {
    "openmoji": (_openmoji_items, ("path", "skin_tones", "groups", "caption_tags", "rasterizer")),
    "noto-emoji": (_noto_items, ("font",)),
    "digits": (_digit_items, ("colourise",)),
    "tuxpaint": (_tuxpaint_items, ("path", "rasterizer")),
    "openclipart": (_openclipart_items, ("path", "png_path", "rasterizer", "keywords")),
    "folder": (_folder_items, ("path", "captions")),
    "hf-dataset": (_hf_items, ("path", "split", "image_column", "caption_column")),
}


# ---- export ------------------------------------------------------------------------------------------------------
def export_images(
    out: str | os.PathLike,
    sources: Sequence[tuple[str, int | None, dict]],
    *,
    size: int = 32,
    held_out: float = 0.1,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Sample ``(source, count, options)`` images to ``out/`` as PNGs plus ``captions.jsonl`` (file, caption,
    source, split, id and source metadata); ``held_out`` of each source is marked ``"split": "validation"``.

    Written to a temporary folder and renamed into place, so ``out`` is never left half-written. Returns a summary.
    """
    from tqdm import tqdm

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if not 0 <= held_out < 1:
        raise ValueError(f"held_out: must be in [0, 1), got {held_out}")
    skipped: Counter = Counter()
    counts: Counter = Counter()
    with atomic_directory(out) as tmp:
        lines = []
        for name, count, options in sources:

            def on_error(err: BadInputError, name: str = name) -> None:
                skipped[name] += 1
                print(f"skipped {err}", file=sys.stderr)

            records = list(
                tqdm(
                    iter_image_records(name, on_error=on_error, size=size, limit=count, seed=seed, **options),
                    total=count,
                    desc=f"export {name}",
                    unit="img",
                )
            )
            n_val = round(held_out * len(records))
            val_ids = {r.meta["id"] for r in random.Random(f"{seed}:{name}:split").sample(records, n_val)}
            for r in records:
                file = re.sub(r"[^A-Za-z0-9_.+-]", "_", f"{r.source}-{r.meta['id']}") + ".png"
                r.image.save(tmp / file, optimize=True)
                split = "validation" if r.meta["id"] in val_ids else "train"
                meta = {("source_file" if k == "file" else k): v for k, v in r.meta.items() if k != "variant"}
                lines.append({**meta, "file": file, "caption": r.caption, "source": r.source, "split": split})
                counts[(r.source, split)] += 1
        with (tmp / "captions.jsonl").open("w", encoding="utf-8") as fh:
            for line in lines:
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    return {
        "images": len(lines),
        "per_source_split": {f"{s}/{p}": n for (s, p), n in sorted(counts.items())},
        "skipped": dict(skipped),
    }
