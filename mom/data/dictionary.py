"""Dictionaries in the dictd format (``NAME.index`` + ``NAME.dict.dz``), e.g. Debian's ``dict-gcide``. The ``.index``
file has one ``headword<TAB>offset<TAB>length`` line per entry, offsets and lengths in dictd's base-64 digits
(``A-Za-z0-9+/``, most significant first) into the uncompressed ``.dict`` data; ``.dict.dz`` is dictzip, a gzip file
that :mod:`gzip` reads whole. Entries whose headword starts with ``00-`` (``00-database-info``, ...) are the
dictionary's own metadata and are skipped. GCIDE (the GNU Collaborative International Dictionary of English, from
Webster's 1913 and WordNet) is GPL-3.0-or-later.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from mom.utils.errors import BadInputError

GCIDE_DIR = "/usr/share/dictd"  # Debian package dict-gcide
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_VALUE = {c: i for i, c in enumerate(_B64)}


def decode_b64_number(text: str) -> int:
    """A dictd base-64 number (``"5I"`` -> 5 * 64 + 8 = 328); ``ValueError`` on other characters."""
    value = 0
    for c in text:
        if c not in _B64_VALUE:
            raise ValueError(f"not a dictd base-64 digit: {c!r} in {text!r}")
        value = value * 64 + _B64_VALUE[c]
    return value


def read_index(path: Path, report: Callable[[BadInputError], None]) -> list[tuple[str, int, int]]:
    """``(headword, offset, length)`` per index line, in file order; bad lines go to ``report``."""
    entries = []
    with path.open(encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            fields = line.rstrip("\n").split("\t")
            try:
                if len(fields) != 3:
                    raise ValueError(f"expected 3 tab-separated fields, got {len(fields)}")
                entries.append((fields[0], decode_b64_number(fields[1]), decode_b64_number(fields[2])))
            except ValueError as e:
                report(BadInputError(f"{path}:{number}", f"bad index line ({e})"))
    return entries


def dictionary_pages(
    directory: Path, name: str, max_chars: int, report: Callable[[BadInputError], None]
) -> Iterator[tuple[str, dict]]:
    """``(text, meta)`` per "page": consecutive entries (in data order) joined by blank lines, at most ``max_chars``
    characters (a longer entry is a page alone, cut later by the caller's chunking)."""
    index, data_path = directory / f"{name}.index", directory / f"{name}.dict.dz"
    if not index.is_file() or not data_path.is_file():
        raise ValueError(f"dictionary {name!r}: {index} or {data_path} not found")
    try:
        data = gzip.open(data_path).read()
    except (OSError, EOFError, zlib.error) as e:
        report(BadInputError(str(data_path), f"cannot decompress ({e.__class__.__name__}: {e})"))
        return
    spans: dict[tuple[int, int], str] = {}  # several headwords may point at one entry: keep the first
    for word, offset, length in read_index(index, report):
        if not word.startswith("00-"):
            spans.setdefault((offset, length), word)
    entries = sorted((o, n, w) for (o, n), w in spans.items())
    page: list[str] = []
    first = ""
    for offset, length, word in entries:
        if offset + length > len(data):
            report(BadInputError(f"{index}:{word}", f"entry runs past the end of {data_path.name}"))
            continue
        text = data[offset : offset + length].decode("utf-8", errors="replace").strip()
        if not text:
            continue
        if page and sum(len(p) + 2 for p in page) + len(text) > max_chars:
            yield "\n\n".join(page), {"dictionary": name, "first": first}
            page = []
        if not page:
            first = word
        page.append(text)
    if page:
        yield "\n\n".join(page), {"dictionary": name, "first": first}
