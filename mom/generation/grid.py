"""Sheets of images: rows of equal-size cells, each row captioned underneath, written as one PNG.

    rows = sample_rows(lambda prompt, seed: image_of(prompt, seed), ["a red seven", "a face"], seeds=range(4))
    save_grid(check_grid_path("grid.png"), rows, captions=["a red seven", "a face"])

`mom-generate --grid` draws its samples this way (rows = prompts, columns = seeds), and `mom-tokenizer image|vae eval
--save-grid` its originals over their reconstructions. A caption is drawn in PIL's default font under its row when
that font can render every caption (Latin-1 text); otherwise the captions go to ``<grid>.captions.txt`` beside the PNG,
one line per row. Cells are uint8 ``(h, w, 3)`` or ``(h, w)`` arrays, all of one size; a missing cell is white.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from mom.utils.atomic import atomic_file, atomic_write_text

# PIL's default font is a Latin-1 bitmap font where Pillow has no FreeType (Aileron, also Latin, where it has), so
# Latin-1 is what it renders whatever the build.
CAPTION_CHARSET = "latin-1"
CAPTION_MARGIN = 2  # pixels of white around a caption's lines


def sample_rows(sample: Callable[[str, int], np.ndarray], prompts: Sequence[str], seeds: Iterable[int],
                progress: bool = False) -> list[list[np.ndarray]]:
    """``rows[r][c] = sample(prompts[r], seeds[c])``: one row per prompt, one column per seed."""
    seeds = list(seeds)
    bar = tqdm(total=len(prompts) * len(seeds), desc="samples", unit="image", disable=not progress,
               dynamic_ncols=True)  # fmt: skip
    rows = []
    with bar:
        for prompt in prompts:
            row = []
            for seed in seeds:
                row.append(sample(prompt, seed))
                bar.update(1)
            rows.append(row)
    return rows


def captions_path(grid: str | Path) -> Path:
    """Where `save_grid` writes the captions it cannot draw: ``grid.png`` -> ``grid.captions.txt``."""
    return Path(grid).with_suffix(".captions.txt")


def check_grid_path(path: str | Path) -> Path:
    """``path`` if a PNG can be written there (checked before minutes of sampling), else ``ValueError`` /
    ``FileNotFoundError`` saying why."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--grid {path}: is a directory; name a .png file")
    if path.suffix.lower() != ".png":
        raise ValueError(f"--grid {path}: must name a .png file")
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"--grid {path}: no directory {parent} to write it in")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise ValueError(f"--grid {path}: cannot write in {parent} ({err.strerror or err})") from err
    return path


def _rgb(cell: np.ndarray) -> np.ndarray:
    cell = np.asarray(cell)
    if cell.dtype != np.uint8 or not (cell.ndim == 2 or (cell.ndim == 3 and cell.shape[2] in (1, 3))):
        raise ValueError(f"grid cell: expected uint8 (h, w, 3), (h, w, 1) or (h, w), got {cell.dtype} "
                         f"{tuple(cell.shape)}")  # fmt: skip
    cell = cell.reshape(*cell.shape[:2], -1)  # (h, w, c)
    return np.repeat(cell, 3 // cell.shape[2], axis=2)  # (h, w, 3)


def drawable(captions: Sequence[str]) -> bool:
    """Whether PIL's default font renders every caption (printable Latin-1, one line each)."""
    for text in captions:
        try:
            text.encode(CAPTION_CHARSET)
        except UnicodeEncodeError:
            return False
        if not text.isprintable():
            return False
    return True


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels (at spaces, or inside a word too long for a line)."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if font.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        for char in word:  # a word wider than the sheet: as many characters as fit on each line
            if line and font.getlength(line + char) > width:
                lines.append(line)
                line = ""
            line += char
    return [*lines, line] if line else lines


def grid_image(rows: Sequence[Sequence[np.ndarray | None]], captions: Sequence[str] | None = None,
               columns: int | None = None) -> Image.Image:
    """The sheet: row ``r``'s cells side by side (``columns`` wide at least), its caption (if any) drawn under it.

    Without captions the sheet is ``(rows * h, columns * w)``; each caption strip is as high as the most lines any
    caption wraps to, so every row takes the same height.
    """
    cells = [[None if c is None else _rgb(c) for c in row] for row in rows]
    shapes = {c.shape for row in cells for c in row if c is not None}
    if len(shapes) != 1:
        raise ValueError(f"grid: cells must all have one size, got {sorted(shapes) or 'none'}")
    h, w, _ = shapes.pop()
    ncols = max(columns or 0, *(len(row) for row in cells))
    if captions is not None and len(captions) != len(cells):
        raise ValueError(f"grid: {len(captions)} captions for {len(cells)} rows")
    font = ImageFont.load_default()
    wrapped = [_wrap(text, font, ncols * w - 2 * CAPTION_MARGIN) for text in captions or []]
    line_height = font.getbbox("Ag")[3] + 1
    strip = max(map(len, wrapped), default=0) * line_height + 2 * CAPTION_MARGIN if captions else 0
    sheet = Image.new("RGB", (ncols * w, len(cells) * (h + strip)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(cells):
        top = r * (h + strip)
        for c, cell in enumerate(row):
            if cell is not None:
                sheet.paste(Image.fromarray(cell), (c * w, top))
        for i, line in enumerate(wrapped[r] if captions else []):
            draw.text((CAPTION_MARGIN, top + h + CAPTION_MARGIN + i * line_height), line, fill="black", font=font)
    return sheet


def save_grid(path: str | Path, rows: Sequence[Sequence[np.ndarray | None]], captions: Sequence[str] | None = None,
              columns: int | None = None) -> list[Path]:
    """Write `grid_image` to ``path`` (whole or not at all) -> the files written: the PNG, and
    ``<grid>.captions.txt`` when the captions cannot be drawn (`drawable`; a stale one is removed when they can)."""
    path = Path(path)
    draw = captions is not None and drawable(captions)
    sheet = grid_image(rows, captions if draw else None, columns)
    with atomic_file(path) as tmp:
        sheet.save(tmp, format="PNG")
    written, side = [path], captions_path(path)
    if captions is not None and not draw:
        atomic_write_text(side, "".join(f"row {r + 1}: {text}\n" for r, text in enumerate(captions)))
        written.append(side)
    elif side.is_file():
        side.unlink()
    return written
