"""Open Clip Art Library 0.18 (Debian ``openclipart-svg``): public-domain drawings.

Each SVG under ``/usr/share/openclipart/svg/<category>/...`` carries its own Dublin Core metadata: a title, often
a description, and keywords (``<dc:subject>``). :func:`clipart_caption` turns them into a caption; the image
source ``openclipart`` (:mod:`mom.data.images`) rasterises the SVG, or reads the matching PNG of
``openclipart-png`` (same relative path, ``.png``) when given ``png_path`` (:data:`OPENCLIPART_PNG_DIR`).
"""

from __future__ import annotations

import html
import re
from pathlib import Path

OPENCLIPART_SVG_DIR = "/usr/share/openclipart/svg"  # Debian package openclipart-svg
OPENCLIPART_PNG_DIR = "/usr/share/openclipart/png"  # Debian package openclipart-png (optional, png_path=)
MAX_DESCRIPTION_CHARS = 300  # longer descriptions are cut at a word boundary: a caption, not an essay
_TITLE = re.compile(r"<dc:title>([^<]*)</dc:title>")
_DESCRIPTION = re.compile(r"<dc:description>([^<]*)</dc:description>")
_SUBJECT = re.compile(r"<dc:subject>(.*?)</dc:subject>", re.S)
_KEYWORD = re.compile(r"<rdf:li>([^<]*)</rdf:li>")


def _clean(text: str) -> str:
    """Entities decoded (the files double-escape some: ``&amp;quot;``) and whitespace collapsed."""
    return " ".join(html.unescape(html.unescape(text)).split())


def svg_metadata(svg_text: str) -> dict:
    """``{"title", "description", "keywords"}`` from an SVG's Dublin Core metadata (empty strings / list when
    absent; the first ``dc:title`` is the work's, later ones name the publisher, creator and licence)."""
    title = _TITLE.search(svg_text)
    description = _DESCRIPTION.search(svg_text)
    subject = _SUBJECT.search(svg_text)
    keywords = [_clean(k) for k in _KEYWORD.findall(subject.group(1))] if subject else []
    return {
        "title": _clean(title.group(1)) if title else "",
        "description": _clean(description.group(1)) if description else "",
        "keywords": [k for k in keywords if k],
    }


def clipart_caption(metadata: dict, category: str, n_keywords: int = 3) -> str:
    """``"Title. Description (keyword, keyword), clip art of <category>"``; ``""`` when there is no title.

    ``category`` is the folder path (``buildings/furniture``); keywords already in the text are dropped."""
    title = metadata.get("title", "")
    if not title:
        return ""
    caption = title
    description = metadata.get("description", "")
    if description and description.lower() != title.lower():
        if len(description) > MAX_DESCRIPTION_CHARS:
            description = description[:MAX_DESCRIPTION_CHARS].rsplit(" ", 1)[0] + " ..."
        caption = f"{caption.rstrip('.')}. {description}"
    seen = caption.lower()
    keywords = [k for k in dict.fromkeys(metadata.get("keywords", [])) if k.lower() not in seen][:n_keywords]
    if keywords:
        caption += f" ({', '.join(keywords)})"
    words = category.replace("_", " ").replace("/", ", ")
    return f"{caption}, clip art of {words}" if words else caption


def clipart_files(root: Path) -> list[Path]:
    """Every ``.svg`` file under ``root``, sorted; symbolic links (the package files some drawings under a second
    category that way) are left out, so each drawing is read once and lands in one split."""
    return sorted(p for p in root.rglob("*.svg") if p.is_file() and not p.is_symlink())
