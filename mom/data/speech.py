"""Speech with transcripts, offline: espeak-ng, flite and festival synthesis (:mod:`mom.data.tts`), the Tux Paint
stamps' recordings of real people (:mod:`mom.data.tuxpaint`), folders of audio files, and datasets saved to disk.

``iter_speech_records(source, on_error=..., **options)`` yields :class:`SpeechRecord` (mono float32 waveform, sample
rate, transcript, source name, per-clip metadata). Unusable items (corrupt audio, unsupported sample rate, empty
transcript) go to ``on_error(BadInputError(path, reason))`` and iteration continues; the callback may re-raise.

Command line: ``mom-data speech synth`` (one clip per line of a text file into a folder readable by the "folder"
source) and ``mom-data speech voices`` (the espeak-ng voices installed here), in :mod:`mom.cli.data`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mom.utils.atomic import atomic_directory
from mom.utils.audio import (
    AUDIO_SUFFIXES,
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    decode_audio_bytes,
    read_audio,
    resample,
    to_mono_float32,
    write_audio,
)
from mom.utils.errors import BadInputError, MissingDependencyError

__all__ = [
    "DEFAULT_VOICES",
    "ESPEAK_PITCH_RANGE",
    "ESPEAK_SPEED_RANGE",
    "SpeechRecord",
    "assign_split",
    "check_sample_rate",
    "iter_speech_records",
    "list_voices",
    "synthesize",
    "write_speech_folder",
]

TRANSCRIPTS_FILE = "transcripts.jsonl"

ESPEAK_APT_HINT = "install it with `apt-get update && apt-get install -y espeak-ng` (Debian/Ubuntu)"
ESPEAK_SPEED_RANGE = (80, 450)  # words per minute accepted by espeak-ng (-s)
ESPEAK_PITCH_RANGE = (0, 99)  # espeak-ng pitch adjustment (-p), 50 is the voice's default
# English accents of espeak-ng's own (non-MBROLA) voices, crossed with some of its male/female/whisper variants.
DEFAULT_VOICES = (
    "en-us",
    "en-us+f3",
    "en-us+m3",
    "en-us+f2",
    "en-gb",
    "en-gb+f4",
    "en-gb+m2",
    "en-gb-x-rp",
    "en-gb-x-rp+f1",
    "en-gb-scotland",
    "en-gb-scotland+f5",
    "en-gb-x-gbclan+m4",
    "en-gb-x-gbcwmd+f3",
    "en-029",
    "en-029+m7",
    "en-us-nyc+m1",
    "en-us+whisper",
    "en-gb+croak",
)
# A few voices of other languages, for multilingual experiments (pass them as ``voices``).
OTHER_VOICES = ("de", "fr-fr", "es", "it", "nl", "pt-br", "pl", "sv", "cmn", "ja")


@dataclass
class SpeechRecord:
    """One utterance: mono ``waveform`` ``(n,)`` float32 in [-1, 1] at ``sample_rate`` Hz, with its transcript."""

    waveform: np.ndarray
    sample_rate: int
    transcript: str
    source: str
    meta: dict = field(default_factory=dict)

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return len(self.waveform) / self.sample_rate


def check_sample_rate(sample_rate: int, path: str) -> None:
    """:class:`BadInputError` unless ``MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE``."""
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise BadInputError(
            path,
            f"unsupported sample rate {sample_rate} Hz; supported rates are {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz",
        )


def _validated(record: SpeechRecord, path: str) -> SpeechRecord:
    """Return ``record`` with a stripped transcript, or raise :class:`BadInputError` saying what is wrong."""
    check_sample_rate(record.sample_rate, path)
    if record.waveform.ndim != 1 or record.waveform.size == 0:
        raise BadInputError(path, f"expected a non-empty mono waveform, got shape {record.waveform.shape}")
    if not np.isfinite(record.waveform).all():
        raise BadInputError(path, "waveform contains NaN or infinite samples")
    transcript = (record.transcript or "").strip() if isinstance(record.transcript, str) else None
    if not transcript:
        raise BadInputError(path, "empty transcript")
    record.transcript = transcript
    return record


# ---- espeak-ng -----------------------------------------------------------------------------------------------------


def _espeak_binary() -> str:
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise MissingDependencyError(f"the espeak-ng speech synthesiser is not installed; {ESPEAK_APT_HINT}")
    return binary


def synthesize(
    text: str, voice: str = "en-us", speed: int = 175, pitch: int = 50, sample_rate: int = 16_000
) -> np.ndarray:
    """Speak ``text`` with espeak-ng; returns a mono float32 waveform ``(n,)`` at ``sample_rate`` Hz.

    ``voice`` is an espeak-ng voice, optionally with a variant (``"en-gb+f3"``, see ``list_voices``); ``speed`` is in
    words per minute (80-450), ``pitch`` in 0-99 (50 = the voice's default). espeak-ng renders at 22.05 kHz; the
    result is resampled. :class:`MissingDependencyError` if espeak-ng is missing, :class:`BadInputError` for empty
    text or an unknown voice.
    """
    binary = _espeak_binary()
    if not isinstance(text, str) or not text.strip():
        raise BadInputError(repr(text), "empty text")
    if not ESPEAK_SPEED_RANGE[0] <= speed <= ESPEAK_SPEED_RANGE[1]:
        raise ValueError(f"speed: must be in {ESPEAK_SPEED_RANGE} words per minute, got {speed}")
    if not ESPEAK_PITCH_RANGE[0] <= pitch <= ESPEAK_PITCH_RANGE[1]:
        raise ValueError(f"pitch: must be in {ESPEAK_PITCH_RANGE}, got {pitch}")
    with tempfile.TemporaryDirectory(prefix="mom-espeak-") as tmp:
        out = os.path.join(tmp, "clip.wav")
        cmd = [binary, "-v", voice, "-s", str(int(speed)), "-p", str(int(pitch)), "-w", out, "--stdin"]
        proc = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True, timeout=120)
        if proc.returncode != 0 or not os.path.exists(out):
            message = proc.stderr.decode("utf-8", "replace").strip() or f"exit status {proc.returncode}"
            raise BadInputError(f"espeak-ng voice {voice!r}", message)
        x, sr = read_audio(out)
    return resample(x, sr, sample_rate) if sr != sample_rate else x


def list_voices(language: str | None = None) -> list[str]:
    """Names of the installed espeak-ng voices (``--voices[=language]``), MBROLA voices excluded (they need extra
    data packages). Append a variant from ``list_voices("variant")`` with ``+``, e.g. ``"en-us+f3"``."""
    binary = _espeak_binary()
    cmd = [binary, f"--voices={language}"] if language else [binary, "--voices"]
    lines = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[1:]
    names = []
    for line in lines:
        cols = line.split()
        if len(cols) < 5 or cols[4].startswith("mb/"):
            continue
        names.append(cols[4].removeprefix("!v/") if language == "variant" else cols[1])
    return sorted(set(names))


def _iter_espeak(
    on_error: Callable[[BadInputError], None],
    texts: Iterable[str] | None = None,
    texts_file: str | None = None,
    voices: Sequence[str] = DEFAULT_VOICES,
    speed_range: Sequence[int] = (140, 200),
    pitch_range: Sequence[int] = (30, 70),
    seed: int = 0,
    sample_rate: int = 16_000,
) -> Iterator[SpeechRecord]:
    if (texts is None) == (texts_file is None):
        raise ValueError("espeak source: give exactly one of `texts` (an iterable of strings) or `texts_file`")
    if isinstance(texts, str):
        raise ValueError("texts: expected an iterable of strings, got a single string")
    if not voices:
        raise ValueError("voices: need at least one voice")
    for name, (lo, hi), (min_v, max_v) in (
        ("speed_range", speed_range, ESPEAK_SPEED_RANGE),
        ("pitch_range", pitch_range, ESPEAK_PITCH_RANGE),
    ):
        if not min_v <= lo <= hi <= max_v:
            raise ValueError(f"{name}: need {min_v} <= low <= high <= {max_v}, got {lo}, {hi}")
    _espeak_binary()  # fail before the first text, not inside it
    if texts_file is not None:
        texts = Path(texts_file).read_text(encoding="utf-8").splitlines()
    rng = random.Random(seed)
    for index, text in enumerate(texts):
        # Draw the choices before any check so that item i always gets the same voice whatever precedes it.
        voice, speed, pitch = rng.choice(list(voices)), rng.randint(*speed_range), rng.randint(*pitch_range)
        path = f"espeak text #{index}"
        try:
            if not isinstance(text, str) or not text.strip():
                raise BadInputError(path, "empty transcript")
            waveform = synthesize(text, voice, speed, pitch, sample_rate)
            meta = {"engine": "espeak-ng", "voice": voice, "speed": speed, "pitch": pitch, "index": index}
            record = _validated(SpeechRecord(waveform, sample_rate, text, "espeak-ng", meta), path)
        except BadInputError as e:
            on_error(e)
            continue
        yield record


# ---- folders of audio files ----------------------------------------------------------------------------------------


def _read_transcripts(root: Path, on_error: Callable[[BadInputError], None]) -> dict[str, dict]:
    """``transcripts.jsonl`` (one ``{"file": ..., "transcript": ..., ...}`` per line) keyed by relative path."""
    entries: dict[str, dict] = {}
    listing = root / TRANSCRIPTS_FILE
    if not listing.is_file():
        return entries
    for number, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{listing}:{number}"
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                raise ValueError('expected an object with a "file" string')
        except ValueError as e:
            on_error(BadInputError(where, f"bad transcripts line ({e})"))
            continue
        entries[Path(entry["file"]).as_posix()] = entry
    return entries


def _iter_folder(
    on_error: Callable[[BadInputError], None], path: str | os.PathLike | None = None, split: str | None = None
) -> Iterator[SpeechRecord]:
    if path is None:
        raise ValueError("folder source: option `path` (the folder of audio files) is required")
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder of audio files")
    entries = _read_transcripts(root, on_error)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
    seen = set()
    for file in files:
        rel = file.relative_to(root).as_posix()
        seen.add(rel)
        entry = dict(entries.get(rel, {}))
        if split is not None and entry.get("split") != split:
            continue
        try:
            if "transcript" in entry or "text" in entry:
                transcript = entry.pop("transcript", None) or entry.pop("text", None)
            elif file.with_suffix(".txt").is_file():
                transcript = file.with_suffix(".txt").read_text(encoding="utf-8")
            else:
                raise BadInputError(str(file), f"no transcript (no entry in {TRANSCRIPTS_FILE}, no sidecar .txt)")
            waveform, sr = read_audio(file)
            entry.pop("file", None)
            source = str(entry.pop("source", "folder"))
            meta = {"file": rel, **entry}
            record = _validated(SpeechRecord(waveform, sr, transcript, source, meta), str(file))
        except BadInputError as e:
            on_error(e)
            continue
        yield record
    for rel in entries:
        if rel not in seen and (split is None or entries[rel].get("split") == split):
            on_error(BadInputError(str(root / rel), f"listed in {TRANSCRIPTS_FILE} but the audio file is missing"))


# ---- datasets saved with `datasets.save_to_disk` ------------------------------------------------------------------


def _decode_dataset_audio(value: object, where: str) -> tuple[np.ndarray, int]:
    """An audio cell: ``{"array", "sampling_rate"}`` (decoded) or ``{"bytes", "path"}`` (encoded file)."""
    if isinstance(value, dict) and value.get("array") is not None:
        if value.get("sampling_rate") is None:
            raise BadInputError(where, "audio cell has an array but no sampling_rate")
        return to_mono_float32(np.asarray(value["array"])), int(value["sampling_rate"])
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        if value.get("bytes"):
            return decode_audio_bytes(value["bytes"], where)
        return read_audio(value["path"])
    raise BadInputError(where, f"unrecognised audio cell of type {type(value).__name__}")


def _iter_hf_dataset(
    on_error: Callable[[BadInputError], None],
    path: str | os.PathLike | None = None,
    audio_column: str = "audio",
    text_column: str = "text",
    split: str | None = None,
) -> Iterator[SpeechRecord]:
    if path is None:
        raise ValueError("hf-dataset source: option `path` (a directory written by save_to_disk) is required")
    try:
        import datasets
    except ImportError as e:
        raise MissingDependencyError("the hf-dataset source needs the `datasets` package: pip install datasets") from e
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: no such dataset directory")
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split is None or split not in ds:
            raise ValueError(f"split: {path} holds splits {sorted(ds)}; choose one with split=..., got {split!r}")
        ds = ds[split]
    for column in (audio_column, text_column):
        if column not in ds.column_names:
            raise ValueError(f"{path}: no column {column!r}; columns are {ds.column_names}")
    if isinstance(ds.features[audio_column], datasets.Audio):
        # Decode ourselves (soundfile) rather than through `datasets`' optional audio backends.
        ds = ds.cast_column(audio_column, datasets.Audio(decode=False))
    for row_index, row in enumerate(ds):
        where = f"{path}[{row_index}]"
        try:
            waveform, sr = _decode_dataset_audio(row[audio_column], where)
            meta = {"dataset": str(path), "row": row_index}
            meta.update(
                {
                    k: v
                    for k, v in row.items()
                    if k not in (audio_column, text_column) and isinstance(v, (str, int, float, bool))
                }
            )
            record = _validated(SpeechRecord(waveform, sr, row[text_column], "hf-dataset", meta), where)
        except BadInputError as e:
            on_error(e)
            continue
        yield record


# ---- flite and festival ----------------------------------------------------------------------------------------------


def _tts_source(engine: str) -> Callable[..., Iterator[SpeechRecord]]:
    def iterate(on_error: Callable[[BadInputError], None], texts: Iterable[str] | None = None, **options: object):
        from mom.data.tts import iter_tts

        if texts is None:
            raise ValueError(f"{engine} source: option `texts` (an iterable of strings) is required")
        sample_rate = int(options.get("sample_rate", 16_000))
        for waveform, text, meta in iter_tts(engine, on_error, texts, **options):
            path = f"{engine} text #{meta['index']}"
            try:
                yield _validated(SpeechRecord(waveform, sample_rate, text, engine, meta), path)
            except BadInputError as e:
                on_error(e)

    return iterate


# ---- Tux Paint stamp descriptions read aloud -------------------------------------------------------------------------


def _iter_tuxpaint(
    on_error: Callable[[BadInputError], None], path: str | None = None, languages: Sequence[str] | None = None
) -> Iterator[SpeechRecord]:
    from mom.data.tuxpaint import list_stamps, stamps_root

    if languages is not None and (isinstance(languages, str) or not all(isinstance(x, str) for x in languages)):
        raise ValueError(f"tuxpaint source: languages must be a list of language codes, got {languages!r}")
    wanted = None if languages is None else {x.lower() for x in languages}
    for stamp in list_stamps(stamps_root(path)):
        for language, ogg in sorted(stamp.recordings.items()):
            if wanted is not None and language not in wanted:
                continue
            try:
                if stamp.error is not None:
                    raise stamp.error
                transcript = stamp.descriptions.get(language)
                if not transcript:
                    raise BadInputError(str(ogg), f"no {language!r} description in the stamp's .txt to pair it with")
                waveform, sr = decode_audio_bytes(ogg.read_bytes(), str(ogg))
                meta = {
                    "file": f"{stamp.key}:{language}",
                    "language": language,
                    "category": stamp.category,
                    "license": "GPL-2.0-or-later",
                }
                record = _validated(SpeechRecord(waveform, sr, transcript, "tuxpaint", meta), str(ogg))
            except (BadInputError, OSError) as e:
                on_error(e if isinstance(e, BadInputError) else BadInputError(str(ogg), f"cannot read ({e})"))
                continue
            yield record


_TTS_OPTIONS = ("texts", "voices", "stretch_range", "max_chars", "seed", "sample_rate", "workers")
_SOURCES = {
    "espeak": _iter_espeak, "flite": _tts_source("flite"), "festival": _tts_source("festival"),
    "tuxpaint": _iter_tuxpaint, "folder": _iter_folder, "hf-dataset": _iter_hf_dataset,
}  # fmt: skip
_OPTIONS = {
    "espeak": ("texts", "texts_file", "voices", "speed_range", "pitch_range", "seed", "sample_rate"),
    "flite": _TTS_OPTIONS,
    "festival": _TTS_OPTIONS,
    "tuxpaint": ("path", "languages"),
    "folder": ("path", "split"),
    "hf-dataset": ("path", "audio_column", "text_column", "split"),
}


def iter_speech_records(
    source: str, *, on_error: Callable[[BadInputError], None], **options: object
) -> Iterator[SpeechRecord]:
    """Yield :class:`SpeechRecord` from one source; unusable items go to ``on_error`` and are skipped.

    Sources and their options:

    * ``"espeak"``: ``texts`` (iterable of str) or ``texts_file`` (one text per line); ``voices`` (default
      ``DEFAULT_VOICES``), ``speed_range`` (words/min, default (140, 200)), ``pitch_range`` (default (30, 70)),
      ``seed`` (voice/speed/pitch choices are a function of seed and position), ``sample_rate`` (16000).
      meta holds ``voice``, ``speed``, ``pitch``.
    * ``"flite"``, ``"festival"``: ``texts``; ``voices`` (default: every voice of :mod:`mom.data.tts`),
      ``stretch_range`` (duration stretch, default (0.85, 1.2)), ``max_chars`` (cut each text into groups of whole
      sentences of at most this many characters), ``seed``, ``sample_rate``, ``workers`` (parallel synthesis).
      meta holds ``engine``, ``voice``, ``stretch``, ``index``.
    * ``"tuxpaint"``: ``path`` (default Debian's stamps folder), ``languages`` (default all): each recorded
      description (real speech, Ogg Vorbis) with its text in that language. meta holds ``language``, ``category``.
    * ``"folder"``: ``path``; WAV/FLAC files under it (recursively), transcripts from ``transcripts.jsonl``
      (``{"file": "a.flac", "transcript": "...", ...}``, extra fields go to meta; ``"source"`` names the source) or
      a sidecar ``<name>.txt``; ``split`` keeps only entries whose ``"split"`` field equals it.
    * ``"hf-dataset"``: ``path`` written by ``datasets.Dataset.save_to_disk``, ``audio_column`` ("audio"),
      ``text_column`` ("text"), ``split`` (for a DatasetDict).

    Unknown options raise ``ValueError`` naming them.
    """
    if source not in _SOURCES:
        raise ValueError(f"unknown speech source {source!r}; choose one of {sorted(_SOURCES)}")
    unknown = sorted(set(options) - set(_OPTIONS[source]))
    if unknown:
        raise ValueError(f"{source} source: unknown option(s) {unknown}; valid options are {list(_OPTIONS[source])}")
    return _SOURCES[source](on_error, **options)


# ---- writing a folder corpus ---------------------------------------------------------------------------------------


def assign_split(transcript: str, validation_fraction: float) -> str:
    """``"validation"`` for a stable ``validation_fraction`` of transcripts (hash of the text), else ``"train"``;
    identical transcripts always land in the same split."""
    digest = int.from_bytes(hashlib.sha1(transcript.strip().lower().encode("utf-8")).digest()[:8], "big")
    return "validation" if digest / 2**64 < validation_fraction else "train"


def write_speech_folder(
    records: Iterable[SpeechRecord],
    out_dir: str | os.PathLike,
    *,
    audio_format: str = "flac",
    bits: int = 16,
    validation_fraction: float = 0.0,
    overwrite: bool = False,
) -> int:
    """Write records as ``NNNNN.<format>`` plus ``transcripts.jsonl`` (with source, meta and split) into ``out_dir``.

    The folder is assembled beside ``out_dir`` and moved into place at the end, so an interrupted run leaves any
    previous folder intact. Returns the number of clips written.
    """
    out_dir = Path(out_dir)
    if audio_format not in ("flac", "wav"):
        raise ValueError(f"audio_format: must be 'flac' or 'wav', got {audio_format!r}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction: must be in [0, 1), got {validation_fraction}")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists and is not empty (pass overwrite=True / --overwrite)")
    with atomic_directory(out_dir) as tmp:
        lines = []
        for i, r in enumerate(records):
            name = f"{i:05d}.{audio_format}"
            write_audio(tmp / name, r.waveform, r.sample_rate, bits=bits)
            split = assign_split(r.transcript, validation_fraction)
            entry = {
                "file": name,
                "transcript": r.transcript,
                "source": r.source,
                "split": split,
                "sample_rate": r.sample_rate,
                "duration": round(r.duration, 3),
                **r.meta,
            }
            lines.append(json.dumps(entry, ensure_ascii=False))
        (tmp / TRANSCRIPTS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)
