"""Build a tokenized, interleaved multi-modal corpus (Parquet shards + manifest) from a recipe.

    mom-data build --recipe recipes/data/small.yaml [--out DIR]      # the command line, in mom.cli.data

Stages (each resumable after a kill; everything is deterministic given the recipe's seed):

1. check that the packages / programs / files the recipe's sources need are there (one message listing them all);
2. load the tokenizers (training the text tokenizer first if the recipe says so);
3. read and encode every source into ``<out>/.build/`` chunk files (``on_error``: ``skip`` or ``stop`` on bad items);
4. assign source items to train/validation by group, draw the documents of each kind, write
   ``<out>/<split>/shard-NNNNN.parquet`` (each written whole or not at all), skipping shards that already exist;
5. write ``<out>/manifest.json`` last (its presence means the corpus is complete) and remove ``.build/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mom.data.documents import SPLITS, Document, DocumentPlan, Item, count_tokens, document_ids, plan_documents
from mom.data.kinds import KINDS
from mom.data.openclipart import OPENCLIPART_SVG_DIR
from mom.data.tuxpaint import TUXPAINT_STAMPS_DIR
from mom.tokenization.special import SPECIAL_TOKENS
from mom.utils.atomic import atomic_save, atomic_write_text
from mom.utils.configio import from_file
from mom.utils.errors import BadInputError, MissingDependencyError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WORK_DIR = ".build"  # encoded-source cache of an unfinished build, inside the output directory
MODALITIES = ("text", "image", "speech")
TTS_SOURCES = ("espeak", "flite", "festival")  # speech sources that speak the documents of a `texts_from` source

# ---- recipe ------------------------------------------------------------------------------------------------------


@dataclass
class SourceSpec:
    """One source of a modality: its name, the options passed to ``iter_<modality>_records`` and build options.

    ``max_records`` caps the records taken from the source; ``chunk_size`` overrides the recipe's. ``texts_from``
    (the synthesised speech sources, :data:`TTS_SOURCES`) is a text source
    (``{source: fortunes, max_chars: 160}``) whose documents, whitespace-collapsed, are the sentences to speak.
    """

    source: str
    options: dict = field(default_factory=dict)
    max_records: int | None = None
    texts_from: dict | None = None
    chunk_size: int | None = None  # overrides the recipe's chunk_size (small for slow sources such as espeak)

    def __post_init__(self) -> None:
        if self.max_records is not None and self.max_records < 0:
            raise ValueError(f"max_records: must be >= 0, got {self.max_records}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size: must be positive, got {self.chunk_size}")


@dataclass
class TokenizerSpec:
    """``dir``: multimodal tokenizer directory (``config.json`` + ``text/``, ``image/``, ``speech/``).

    ``train_text``: a text tokenizer recipe (``tokenizers/recipes/*.yaml``); when ``<dir>/text`` does not exist yet
    the build trains it there first. The multimodal ``config.json`` is written when missing.
    """

    dir: str
    train_text: str | None = None


@dataclass
class DocumentsSpec:
    """Document counts (the whole corpus; each split gets its share). ``null``: every record left over."""

    text: int | None = None
    image: int | None = None
    caption_first: float = 0.5
    speech: int | None = None
    transcript_first: float = 0.5
    mixed: int = 0
    mixed_spans: tuple[int, int] = (3, 5)
    mixed_text_chars: int = 600

    def __post_init__(self) -> None:
        for name in ("text", "image", "speech", "mixed"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"documents.{name}: must be >= 0, got {value}")
        for name in ("caption_first", "transcript_first"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"documents.{name}: must be in [0, 1], got {getattr(self, name)}")
        if not 1 <= self.mixed_spans[0] <= self.mixed_spans[1]:
            raise ValueError(f"documents.mixed_spans: need 1 <= min <= max, got {list(self.mixed_spans)}")

    def plan(self) -> DocumentPlan:
        return DocumentPlan(**dataclasses.asdict(self))


@dataclass
class BuildRecipe:
    """A corpus recipe (``recipes/data/*.yaml`` maps onto this one to one)."""

    name: str
    out: str
    tokenizer: TokenizerSpec
    documents: DocumentsSpec = field(default_factory=DocumentsSpec)
    text: list[SourceSpec] = field(default_factory=list)
    image: list[SourceSpec] = field(default_factory=list)
    speech: list[SourceSpec] = field(default_factory=list)
    validation_fraction: float = 0.05
    seed: int = 0
    shard_size: int = 1000  # documents per shard
    row_group_size: int = 256  # documents per Parquet row group (the loader's unit of reading)
    chunk_size: int = 256  # source records per encoded chunk in .build/ (the unit of resumption while encoding)
    image_batch_size: int = 32
    on_error: str = "skip"

    def __post_init__(self) -> None:
        if self.on_error not in ("skip", "stop"):
            raise ValueError(f"on_error: must be 'skip' or 'stop', got {self.on_error!r}")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction: must be in [0, 1), got {self.validation_fraction}")
        for name in ("shard_size", "row_group_size", "chunk_size", "image_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if not any((self.text, self.image, self.speech)):
            raise ValueError("recipe: give at least one source under text, image or speech")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> BuildRecipe:
        return from_file(cls, path, list_unknown=True)

    def sources(self) -> Iterator[tuple[str, int, SourceSpec]]:
        for modality in MODALITIES:
            for index, spec in enumerate(getattr(self, modality)):
                yield modality, index, spec


# ---- requirements ------------------------------------------------------------------------------------------------


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _path_hint(options: dict, what: str) -> list[str]:
    path = options.get("path")
    if not path:
        return [f"{what}: set options.path"]
    return [] if Path(path).exists() else [f"{what}: {path} does not exist"]


def missing_requirements(recipe: BuildRecipe) -> list[str]:
    """Install hints for everything the recipe needs but this machine lacks (empty when all is there)."""
    from mom.data.text import check_text_source

    hints: list[str] = []
    for module, package in (("pyarrow", "pyarrow"), ("yaml", "pyyaml"), ("sentencepiece", "sentencepiece")):
        if not _has_module(module):
            hints.append(f"pip install {package}")
    text_specs = list(recipe.text) + [  # espeak sentences read from a text source
        SourceSpec(spec.texts_from["source"], _without(spec.texts_from, "source"))
        for spec in recipe.speech
        if spec.texts_from
    ]
    for spec in text_specs:
        hints += check_text_source(spec.source, **spec.options)
    for spec in recipe.image:
        o, what = spec.options, f"image source {spec.source!r}"
        if spec.source == "openmoji":
            if not (_has_module("resvg_py") or _cairo_ok()):
                hints.append("pip install resvg-py  (or pip install cairosvg + apt-get install libcairo2; openmoji)")
            root = Path(o.get("path") or "")
            if not o.get("path") or not any(
                (c / "data" / "openmoji.json").is_file()
                for c in (root, root / "package", root / "node_modules/openmoji")
            ):
                hints.append(
                    f"openmoji image source: no npm package at options.path ({o.get('path')}): "
                    "`npm pack openmoji && tar xzf openmoji-*.tgz` and point options.path at ./package"
                )
        elif spec.source == "noto-emoji":
            if not Path(o.get("font") or "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf").is_file():
                hints.append("apt-get install fonts-noto-color-emoji  (noto-emoji image source)")
        elif spec.source == "digits":
            if not _has_module("sklearn"):
                hints.append("pip install scikit-learn  (digits image source)")
        elif spec.source == "tuxpaint":
            if not Path(o.get("path") or TUXPAINT_STAMPS_DIR).is_dir():
                hints.append("apt-get install tuxpaint-stamps-default  (tuxpaint image source)")
            if not (_has_module("resvg_py") or _cairo_ok()):
                hints.append("pip install resvg-py  (tuxpaint image source: the stamps drawn as SVG)")
        elif spec.source == "openclipart":
            if not Path(o.get("path") or OPENCLIPART_SVG_DIR).is_dir():
                hints.append("apt-get install openclipart-svg  (openclipart image source; openclipart-png optional)")
            if not (_has_module("resvg_py") or _cairo_ok()):
                hints.append("pip install resvg-py  (openclipart image source)")
        elif spec.source == "folder":
            hints += _path_hint(o, what)
        elif spec.source == "hf-dataset" and not _has_module("datasets"):
            hints.append("pip install datasets  (hf-dataset image source)")
    for spec in recipe.speech:
        o, what = spec.options, f"speech source {spec.source!r}"
        if spec.source == "espeak" and shutil.which("espeak-ng") is None:
            hints.append("apt-get install espeak-ng  (espeak speech source)")
        elif spec.source in ("flite", "festival"):
            from mom.data.tts import missing_tts

            hints += missing_tts(spec.source, o.get("voices"))
        elif spec.source == "tuxpaint":
            if not Path(o.get("path") or TUXPAINT_STAMPS_DIR).is_dir():
                hints.append("apt-get install tuxpaint-stamps-default  (tuxpaint speech source)")
            if not _has_module("soundfile"):
                hints.append("pip install soundfile  (reading the Ogg Vorbis recordings)")
        elif spec.source == "folder":
            hints += _path_hint(o, what)
            if not _has_module("soundfile"):
                hints.append("pip install soundfile  (reading FLAC clips)")
        elif spec.source == "hf-dataset" and not _has_module("datasets"):
            hints.append("pip install datasets  (hf-dataset speech source)")
    hints += _tokenizer_hints(recipe)
    return list(dict.fromkeys(hints))


def _tokenizer_hints(recipe: BuildRecipe) -> list[str]:
    """The tokenizer directories the recipe's modalities need that are not there (text counts as there when
    ``tokenizer.train_text`` will train it)."""
    root = Path(recipe.tokenizer.dir)
    subdirs = {m: m for m in MODALITIES}
    config = root / "config.json"
    if config.is_file():
        try:
            subdirs.update(json.loads(config.read_text(encoding="utf-8")).get("tokenizers", {}))
        except (OSError, ValueError, AttributeError) as e:
            return [f"tokenizer: {config} is not a readable multimodal config ({e})"]
    hints = []
    for modality in MODALITIES:
        if modality != "text" and not getattr(recipe, modality):
            continue
        if modality == "text" and recipe.tokenizer.train_text:
            continue
        path = root / subdirs[modality]
        if not (path / "config.json").is_file():
            hints.append(f"tokenizer: the {modality} tokenizer {path} is missing (train it: docs/data.md)")
    return hints


def _cairo_ok() -> bool:
    try:
        import cairosvg  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def _without(mapping: dict, *keys: str) -> dict:
    return {k: v for k, v in mapping.items() if k not in keys}


# ---- bad input bookkeeping ---------------------------------------------------------------------------------------


class BadInputLog:
    """Skipped items by reason; ``stop=True`` re-raises the first one instead."""

    def __init__(self, stop: bool) -> None:
        self.stop = stop
        self.items: list[dict] = []

    def record(self, modality: str, source: str) -> Callable[[BadInputError], None]:
        def on_error(error: BadInputError) -> None:
            if self.stop:
                raise error
            self.items.append({"modality": modality, "source": source, "path": error.path, "reason": error.reason})

        return on_error

    def summary(self, examples: int = 5) -> dict:
        by_reason: dict[str, dict] = {}
        for item in self.items:
            entry = by_reason.setdefault(item["reason"], {"count": 0, "examples": []})
            entry["count"] += 1
            if len(entry["examples"]) < examples:
                entry["examples"].append(item["path"])
        return {"total": len(self.items), "by_reason": by_reason}


# ---- encoding sources into .build/ chunks ------------------------------------------------------------------------


def _records(modality: str, spec: SourceSpec, on_error: Callable[[BadInputError], None]) -> Iterator[Any]:
    if modality == "text":
        from mom.data.text import iter_text_records

        return iter_text_records(spec.source, on_error=on_error, **spec.options)
    if modality == "image":
        from mom.data.images import iter_image_records

        return iter_image_records(spec.source, on_error=on_error, **spec.options)
    from mom.data.speech import iter_speech_records

    options = dict(spec.options)
    if spec.texts_from is not None:
        if spec.source not in TTS_SOURCES:
            raise ValueError(f"speech source {spec.source!r}: texts_from only applies to {list(TTS_SOURCES)}")
        from mom.data.text import iter_text_records

        text_options = _without(spec.texts_from, "source")
        texts = (" ".join(r.text.split()) for r in iter_text_records(spec.texts_from["source"], **text_options))
        options["texts"] = texts
    return iter_speech_records(spec.source, on_error=on_error, **options)


def _record_name(meta: dict, fallback: str) -> str:
    for key in ("file", "path", "id", "index"):
        if key in meta:
            return str(meta[key])
    return fallback


def _encode_chunk(modality: str, records: list, tokenizer: Any, batch_size: int, on_error: Callable) -> list[Item]:
    """Encode one chunk of source records into items; a record the tokenizer rejects goes to ``on_error``."""
    if modality == "text":
        return [Item("text", r.source, r.meta, r.text) for r in records]
    items: list[Item] = []
    if modality == "image":
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            try:
                codes = tokenizer.encode_images([r.image for r in batch])
            except Exception:  # noqa: BLE001 - isolate the bad image by encoding one at a time
                codes = []
                for r in batch:
                    try:
                        codes.append(tokenizer.encode_images([r.image])[0])
                    except Exception as e:  # noqa: BLE001
                        name = _record_name(r.meta, f"{r.source} image")
                        on_error(BadInputError(name, f"image tokenizer failed: {e}"))
                        codes.append(None)
            for r, c in zip(batch, codes):
                if c is not None:
                    items.append(Item("image", r.source, r.meta, r.caption, np.asarray(c, dtype=np.int32)))
        return items
    for r in records:
        name = _record_name(r.meta, f"{r.source} clip")
        try:
            units = tokenizer.encode_speech(r.waveform, r.sample_rate)
        except Exception as e:  # noqa: BLE001
            on_error(BadInputError(name, f"speech tokenizer failed: {e}"))
            continue
        if len(units) == 0:
            on_error(BadInputError(name, "speech tokenizer produced no units (clip too short)"))
            continue
        items.append(Item("speech", r.source, r.meta, r.transcript, np.asarray(units, dtype=np.int32)))
    return items


def _write_parquet(table: Any, path: Path, row_group_size: int | None = None) -> None:
    """Write ``table`` to ``path`` whole or not at all (``mom.utils.atomic``), so a file that exists is complete."""
    import pyarrow.parquet as pq

    atomic_save(path, lambda tmp: pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd"))


def _chunk_table(items: list[Item]) -> Any:
    import pyarrow as pa

    return pa.table(
        {
            "source": pa.array([i.source for i in items], pa.string()),
            "meta": pa.array([json.dumps(i.meta, sort_keys=True, default=str) for i in items], pa.string()),
            "text": pa.array([i.text for i in items], pa.string()),
            "codes": pa.array([i.codes.tolist() for i in items], pa.list_(pa.int32())),
        }
    )


def encode_source(
    modality: str, index: int, spec: SourceSpec, tokenizer: Any, work: Path, recipe: BuildRecipe, log: BadInputLog
) -> list[Item]:
    """Encode one source into ``work/<modality>-<index>/chunk-NNNNN.parquet`` files, resuming after the last
    complete chunk, and return its items."""
    import pyarrow.parquet as pq
    from tqdm import tqdm

    folder = work / f"{modality}-{index}"
    folder.mkdir(parents=True, exist_ok=True)
    done_file = folder / "done.json"
    chunks = sorted(folder.glob("chunk-*.parquet"))
    consumed = 0  # source records covered by complete chunks
    for chunk in chunks:
        info = json.loads((chunk.with_suffix(".json")).read_text())
        consumed += info["records"]
        log.items += info["skipped"]
    if not done_file.is_file():
        pending: list[dict] = []  # bad inputs since the last chunk
        stop = log.stop

        def on_error(error: BadInputError) -> None:
            if stop:
                raise error
            pending.append({"modality": modality, "source": spec.source, "path": error.path, "reason": error.reason})

        def flush(records: list) -> None:
            items = _encode_chunk(modality, records, tokenizer, recipe.image_batch_size, on_error)
            path = folder / f"chunk-{len(chunks):05d}.parquet"
            info = {"records": len(records), "items": len(items), "skipped": list(pending)}
            path.with_suffix(".json").write_text(json.dumps(info))  # sidecar first: the parquet marks completion
            _write_parquet(_chunk_table(items), path)
            chunks.append(path)
            log.items += pending
            pending.clear()

        limit = spec.max_records
        records: list = []
        bar = tqdm(desc=f"{modality}/{spec.source}", unit="rec", total=limit, initial=consumed, leave=False)
        for position, record in enumerate(_records(modality, spec, on_error)):
            if limit is not None and position >= limit:
                break
            if position < consumed:  # already in a complete chunk
                pending.clear()
                continue
            records.append(record)
            bar.update()
            if len(records) == (spec.chunk_size or recipe.chunk_size):
                flush(records)
                records = []
        if records or pending:
            flush(records)
        bar.close()
        done_file.write_text(json.dumps({"chunks": len(chunks)}))
    items = []
    for chunk in chunks:
        table = pq.read_table(chunk).to_pydict()
        for source, meta, text, codes in zip(table["source"], table["meta"], table["text"], table["codes"]):
            items.append(Item(modality, source, json.loads(meta), text, np.asarray(codes, dtype=np.int32)))
    return items


# ---- writing shards ----------------------------------------------------------------------------------------------

SHARD_SCHEMA_DOC = "input_ids list<int32>, modality_ids list<int8>, doc_id int64, kind, source, meta (JSON) strings"


def _shard_table(rows: list[dict]) -> Any:
    import pyarrow as pa

    from mom.data.loader import SHARD_SCHEMA

    return pa.table({name: [r[name] for r in rows] for name in SHARD_SCHEMA.names}, schema=SHARD_SCHEMA)


@dataclass
class SplitStats:
    documents: int = 0
    documents_per_kind: dict = field(default_factory=lambda: {k: 0 for k in KINDS})
    tokens_per_modality: dict = field(default_factory=dict)
    shards: list = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(self.tokens_per_modality.values())


def write_split(
    split: str, docs: list[Document], first_doc_id: int, tokenizer: Any, recipe: BuildRecipe, out: Path
) -> SplitStats:
    """Write one split's documents as shards (skipping shards that exist) and return its statistics."""
    import pyarrow.parquet as pq
    from tqdm import tqdm

    plan = recipe.documents.plan()
    stats = SplitStats(tokens_per_modality={m: 0 for m in tokenizer.modalities})
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = (len(docs) + recipe.shard_size - 1) // recipe.shard_size
    for shard in tqdm(range(n_shards), desc=f"shards {split}", unit="shard", leave=False):
        path = folder / f"shard-{shard:05d}.parquet"
        chunk = docs[shard * recipe.shard_size : (shard + 1) * recipe.shard_size]
        rows = None
        if path.is_file():  # complete from an earlier run: read its statistics back
            if "modality_ids" not in pq.read_schema(path).names:  # written before the column was renamed
                raise ValueError(f"{path}: shard of an older build (no modality_ids column); pass --restart")
            table = pq.read_table(path, columns=["modality_ids", "kind"]).to_pydict()
            modalities = [np.asarray(m, dtype=np.int8) for m in table["modality_ids"]]
            kinds = table["kind"]
        else:
            rows = []
            for offset, doc in enumerate(chunk):
                ids = document_ids(doc, tokenizer, plan)
                rows.append(
                    {
                        "input_ids": ids,
                        "modality_ids": tokenizer.modality_of(ids).tolist(),
                        "doc_id": first_doc_id + shard * recipe.shard_size + offset,
                        "kind": doc.kind,
                        "source": doc.source,
                        "meta": doc.meta(),
                    }
                )
            _write_parquet(_shard_table(rows), path, row_group_size=recipe.row_group_size)
            modalities = [np.asarray(r["modality_ids"], dtype=np.int8) for r in rows]
            kinds = [r["kind"] for r in rows]
        for m, kind in zip(modalities, kinds):
            stats.documents += 1
            stats.documents_per_kind[kind] += 1
            for name, n in count_tokens(m, tokenizer.modalities).items():
                stats.tokens_per_modality[name] += n
        stats.shards.append(f"{split}/{path.name}")
    return stats


# ---- the build ---------------------------------------------------------------------------------------------------


def _fingerprint(recipe: BuildRecipe, tokenizer_dir: Path) -> str:
    """Hash of the recipe and the tokenizer files: a resumed build must see the same ones."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(recipe), sort_keys=True, default=str).encode())
    for path in sorted(tokenizer_dir.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(tokenizer_dir)).encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def prepare_tokenizer(recipe: BuildRecipe) -> Any:
    """Load the recipe's multimodal tokenizer, training the text tokenizer first if the recipe asks for it."""
    from mom.data.tokenizer_training import TextTokenizerRecipe, recipe_texts
    from mom.tokenization.multimodal import MultimodalTokenizer, write_config
    from mom.tokenization.text import TextTokenizer

    root = Path(recipe.tokenizer.dir)
    if recipe.tokenizer.train_text and not (root / "text" / "config.json").is_file():
        text_recipe = TextTokenizerRecipe.from_yaml(recipe.tokenizer.train_text)
        print(f"training the text tokenizer into {root / 'text'} ({recipe.tokenizer.train_text}) ...")
        TextTokenizer.train(recipe_texts(text_recipe), text_recipe).save(root / "text")
    needed = [m for m in MODALITIES if m == "text" or getattr(recipe, m)]
    if not (root / "config.json").is_file():
        absent = [str(root / m) for m in needed if not (root / m / "config.json").is_file()]
        if absent:
            raise FileNotFoundError(
                f"tokenizer: {root}/config.json not found and tokenizer directories {absent} are missing "
                "(train them, or set tokenizer.train_text for the text one)"
            )
        write_config(root, {m: m for m in MODALITIES if (root / m / "config.json").is_file()}, None)
    tokenizer = MultimodalTokenizer.load(root)
    missing = [m for m in needed if m not in tokenizer.modalities]
    if missing:
        raise ValueError(f"tokenizer {root}: the recipe has {missing} sources but the tokenizer lacks those modalities")
    return tokenizer


def build(recipe: BuildRecipe, out: str | os.PathLike | None = None, restart: bool = False) -> dict:
    """Build the corpus of ``recipe`` into ``out`` (default ``recipe.out``); return the manifest."""
    start = time.time()
    out = Path(out or recipe.out)
    if (out / MANIFEST).is_file():
        if not restart:
            raise FileExistsError(f"{out / MANIFEST} exists: the corpus is complete (pass --restart to rebuild it)")
    missing = missing_requirements(recipe)
    if missing:
        raise MissingDependencyError("the recipe needs, missing here:\n  " + "\n  ".join(missing))
    tokenizer = prepare_tokenizer(recipe)
    tokenizer_dir = Path(recipe.tokenizer.dir)
    work = out / WORK_DIR
    fingerprint = _fingerprint(recipe, tokenizer_dir)
    fingerprint_file = work / "fingerprint"
    if restart:
        _remove_outputs(out)
    elif fingerprint_file.is_file() and fingerprint_file.read_text() != fingerprint:
        raise ValueError(
            f"{out} holds an unfinished build of a different recipe or tokenizer; pass --restart to discard it"
        )
    elif not fingerprint_file.is_file() and any(any((out / s).glob("shard-*.parquet")) for s in SPLITS):
        raise ValueError(f"{out} holds shards of an unknown build; pass --restart to discard them")
    work.mkdir(parents=True, exist_ok=True)
    fingerprint_file.write_text(fingerprint)

    log = BadInputLog(stop=recipe.on_error == "stop")
    items: dict[str, list[Item]] = {}
    for modality, index, spec in recipe.sources():
        encoded = encode_source(modality, index, spec, tokenizer, work, recipe, log)
        items.setdefault(modality, []).extend(encoded)
        print(f"  {modality}/{spec.source}: {len(encoded)} records")
    documents = plan_documents(items, recipe.documents.plan(), recipe.validation_fraction, recipe.seed)
    splits, first = {}, 0
    for split in SPLITS:
        splits[split] = write_split(split, documents[split], first, tokenizer, recipe, out)
        first += len(documents[split])
    manifest = _manifest(recipe, tokenizer, tokenizer_dir, out, splits, log)
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    shutil.rmtree(work)
    manifest["build_seconds"] = round(time.time() - start, 1)
    return manifest


def _remove_outputs(out: Path) -> None:
    """Delete what a build writes (and nothing else) so it can start over."""
    (out / MANIFEST).unlink(missing_ok=True)
    for split in SPLITS:
        for path in (out / split).glob("shard-*.parquet"):
            path.unlink()
    if (out / WORK_DIR).is_dir():
        shutil.rmtree(out / WORK_DIR)


def _manifest(recipe: BuildRecipe, tokenizer: Any, tokenizer_dir: Path, out: Path, splits: dict, log: BadInputLog):
    rel = os.path.relpath(tokenizer_dir.resolve(), out.resolve())
    return {
        "format": "mom-corpus",
        "version": FORMAT_VERSION,
        "name": recipe.name,
        "tokenizer_dir": rel,  # relative to this manifest's directory
        "tokenizer_dirs": {m: f"{rel}/{m}" for m in tokenizer.modalities},
        "modalities": list(tokenizer.modalities),
        "vocab_sizes": list(tokenizer.vocab_sizes),
        "vocab_offsets": [tokenizer.offsets[m] for m in tokenizer.modalities],
        "special_tokens": {t.name: t.id for t in SPECIAL_TOKENS},
        "columns": SHARD_SCHEMA_DOC,
        "splits": {
            name: {
                "documents": s.documents,
                "tokens": s.tokens,
                "documents_per_kind": s.documents_per_kind,
                "tokens_per_modality": s.tokens_per_modality,
                "shards": s.shards,
            }
            for name, s in splits.items()
        },
        "skipped": log.summary(),
        "recipe": dataclasses.asdict(recipe),
    }


def format_summary(manifest: dict) -> str:
    """Human-readable tables of documents per kind and tokens per modality per split, and skipped inputs."""
    lines = []
    kinds = [k for k in KINDS if any(s["documents_per_kind"].get(k) for s in manifest["splits"].values())]
    header = f"{'split':<12}" + "".join(f"{k:>19}" for k in kinds) + f"{'documents':>11}"
    lines += ["documents per kind:", header]
    for name, s in manifest["splits"].items():
        lines.append(
            f"{name:<12}" + "".join(f"{s['documents_per_kind'][k]:>19,}" for k in kinds) + f"{s['documents']:>11,}"
        )
    lines += [
        "tokens per modality:",
        f"{'split':<12}" + "".join(f"{m:>14}" for m in manifest["modalities"]) + f"{'total':>14}",
    ]
    for name, s in manifest["splits"].items():
        tokens = s["tokens_per_modality"]
        lines.append(
            f"{name:<12}" + "".join(f"{tokens[m]:>14,}" for m in manifest["modalities"]) + f"{s['tokens']:>14,}"
        )
    skipped = manifest["skipped"]
    lines.append(f"skipped inputs: {skipped['total']}")
    for reason, entry in skipped["by_reason"].items():
        lines.append(f"  {entry['count']:>6} x {reason}: {', '.join(entry['examples'])}")
    return "\n".join(lines)
