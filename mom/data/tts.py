"""Text to speech with Debian's ``flite`` and ``festival`` engines: more voices beside espeak-ng (:mod:`.speech`).

* ``flite`` (CMU Flite 2.2, BSD-like licence): built-in voices ``kal16`` (male, 16 kHz), ``slt`` (female), ``rms``
  (male), ``awb`` (Scottish male); ``kal`` is 8 kHz and ``awb_time`` speaks only times, so neither is a default.
* ``festival`` (Festival 2.5, ``text2wave``): ``kal_diphone`` (``festvox-kallpc16k``), ``ked_diphone``
  (``festvox-kdlpc16k``), ``cmu_us_slt_arctic_hts`` (``festvox-us-slt-hts``; about 4 s a sentence on one core).

:func:`iter_tts` speaks a stream of texts: each text is cut into groups of whole sentences of at most
``max_chars`` characters, and each group gets a voice and a speaking rate drawn from ``seed`` (the choices of item
``i`` do not depend on what failed before it). ``workers`` synthesise in parallel threads (each runs the engine
as a subprocess), results come back in input order.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mom.utils.audio import read_audio, resample
from mom.utils.errors import BadInputError, MissingDependencyError

ENGINES = ("flite", "festival")
_PROGRAMS = {"flite": "flite", "festival": "text2wave"}  # engine -> the program that speaks a text file
FLITE_VOICES = ("kal16", "slt", "rms", "awb")
FESTIVAL_VOICES = ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts")
FESTIVAL_VOICE_PACKAGES = {
    "kal_diphone": "festvox-kallpc16k",
    "ked_diphone": "festvox-kdlpc16k",
    "cmu_us_slt_arctic_hts": "festvox-us-slt-hts",
}
FESTIVAL_VOICES_DIR = "/usr/share/festival/voices"  # <language>/<voice>/ per installed voice
STRETCH_LIMITS = (0.5, 2.0)  # duration stretch factors accepted here (1 = the voice's own rate)
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")


def engine_binary(engine: str) -> str:
    """Path of the engine's program; :class:`MissingDependencyError` with the apt line when it is missing."""
    program = _PROGRAMS.get(engine)
    if program is None:
        raise ValueError(f"tts engine: must be one of {list(ENGINES)}, got {engine!r}")
    binary = shutil.which(program)
    if binary is None:
        raise MissingDependencyError(f"the {engine} speech synthesiser is not installed: `apt-get install {engine}`")
    return binary


def missing_tts(engine: str, voices: Sequence[str] | None = None) -> list[str]:
    """Install hints for ``engine`` and its ``voices`` (empty when all is there)."""
    hints = []
    if shutil.which(_PROGRAMS[engine]) is None:
        hints.append(f"apt-get install {engine}  ({engine} speech source)")
    if engine == "festival":
        for voice in voices or FESTIVAL_VOICES:
            if not _festival_voice_installed(voice):
                package = FESTIVAL_VOICE_PACKAGES.get(voice, f"the festival voice {voice}")
                hints.append(f"apt-get install {package}  (festival voice {voice})")
    return hints


def _festival_voice_installed(voice: str) -> bool:
    return any(p.is_dir() for p in Path(FESTIVAL_VOICES_DIR).glob(f"*/{voice}"))


def installed_voices(engine: str) -> list[str]:
    """The voices ``engine`` has here: flite's built-in ones (``flite -lv``), festival's voice folders."""
    if engine == "flite":
        listing = subprocess.run([engine_binary("flite"), "-lv"], capture_output=True, text=True, timeout=60).stdout
        return listing.partition(":")[2].split()
    engine_binary(engine)
    return sorted(p.name for p in Path(FESTIVAL_VOICES_DIR).glob("*/*") if p.is_dir())


def split_sentences(text: str, max_chars: int) -> list[str]:
    """Whitespace-collapsed ``text`` as groups of whole sentences of at most ``max_chars`` characters (a longer
    sentence is cut at word boundaries)."""
    groups: list[str] = []
    current = ""
    for sentence in _SENTENCE_END.split(" ".join(text.split())):
        pieces = [sentence]
        if len(sentence) > max_chars:  # cut at spaces
            pieces, line = [], ""
            for word in sentence.split(" "):
                if line and len(line) + 1 + len(word) > max_chars:
                    pieces.append(line)
                    line = ""
                line = f"{line} {word}" if line else word
            pieces.append(line)
        for piece in pieces:
            if current and len(current) + 1 + len(piece) > max_chars:
                groups.append(current)
                current = ""
            current = f"{current} {piece}" if current else piece
    if current:
        groups.append(current)
    return [g for g in groups if g.strip()]


def synthesize(engine: str, text: str, voice: str, stretch: float = 1.0, sample_rate: int = 16_000) -> np.ndarray:
    """Speak ``text`` with ``engine``'s ``voice`` at ``stretch`` times the voice's durations; mono float32 ``(n,)``
    at ``sample_rate`` Hz. :class:`BadInputError` names the engine and voice when synthesis fails."""
    binary = engine_binary(engine)
    if not text.strip():
        raise BadInputError(f"{engine} voice {voice!r}", "empty text")
    if not STRETCH_LIMITS[0] <= stretch <= STRETCH_LIMITS[1]:
        raise ValueError(f"stretch: must be in {STRETCH_LIMITS}, got {stretch}")
    with tempfile.TemporaryDirectory(prefix=f"mom-{engine}-") as tmp:
        source, out = os.path.join(tmp, "text.txt"), os.path.join(tmp, "clip.wav")
        with open(source, "w", encoding="utf-8") as fh:
            fh.write(text)
        if engine == "flite":
            cmd = [binary, "-voice", voice, "--setf", f"duration_stretch={stretch:.3f}", "-f", source, "-o", out]
        else:
            setup = f"(begin (voice_{voice}) (Parameter.set 'Duration_Stretch {stretch:.3f}))"
            cmd = [binary, "-eval", setup, "-o", out, source]
        proc = subprocess.run(cmd, capture_output=True, timeout=300)
        if proc.returncode != 0 or not os.path.exists(out) or os.path.getsize(out) <= 44:
            message = proc.stderr.decode("utf-8", "replace").strip()[-300:] or f"exit status {proc.returncode}"
            raise BadInputError(f"{engine} voice {voice!r}", message)
        x, sr = read_audio(out)
    return resample(x, sr, sample_rate) if sr != sample_rate else x


def iter_tts(
    engine: str,
    on_error: Callable[[BadInputError], None],
    texts: Iterable[str],
    voices: Sequence[str] | None = None,
    stretch_range: Sequence[float] = (0.85, 1.2),
    max_chars: int | None = None,
    seed: int = 0,
    sample_rate: int = 16_000,
    workers: int = 1,
) -> Iterator[tuple[np.ndarray, str, dict]]:
    """``(waveform, transcript, meta)`` per spoken text (see the module docstring); failures go to ``on_error``."""
    engine_binary(engine)  # fail before the first text
    voices = list(voices or (FLITE_VOICES if engine == "flite" else FESTIVAL_VOICES))
    # flite speaks an unknown voice name with its default voice, silently: check the names up front
    unknown = sorted(set(voices) - set(installed_voices(engine)))
    if unknown:
        raise ValueError(f"voices: {engine} has no voice {unknown} here; installed: {installed_voices(engine)}")
    lo, hi = stretch_range
    if not STRETCH_LIMITS[0] <= lo <= hi <= STRETCH_LIMITS[1]:
        raise ValueError(
            f"stretch_range: need {STRETCH_LIMITS[0]} <= low <= high <= {STRETCH_LIMITS[1]}, got {lo}, {hi}"
        )
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: must be a positive integer, got {workers!r}")
    if max_chars is not None and (not isinstance(max_chars, int) or max_chars < 1):
        raise ValueError(f"max_chars: must be a positive integer or None, got {max_chars!r}")
    if isinstance(texts, str):
        raise ValueError("texts: expected an iterable of strings, got a single string")

    def pieces() -> Iterator[str]:
        for text in texts:
            if not isinstance(text, str):
                yield ""
            elif max_chars is None:
                yield " ".join(text.split())
            else:
                yield from split_sentences(text, max_chars) or [""]

    rng = random.Random(seed)

    def job(index: int, text: str, voice: str, stretch: float) -> tuple[np.ndarray, str, dict]:
        if not text.strip():
            raise BadInputError(f"{engine} text #{index}", "empty transcript")
        waveform = synthesize(engine, text, voice, stretch, sample_rate)
        return waveform, text, {"engine": engine, "voice": voice, "stretch": stretch, "index": index}

    with ThreadPoolExecutor(max_workers=workers) as pool:
        window: deque[Future] = deque()
        for index, text in enumerate(pieces()):
            voice, stretch = rng.choice(voices), round(rng.uniform(lo, hi), 3)  # drawn before any check
            window.append(pool.submit(job, index, text, voice, stretch))
            if len(window) >= 2 * workers:
                yield from _result(window.popleft(), on_error)
        while window:
            yield from _result(window.popleft(), on_error)


def _result(future: Future, on_error: Callable[[BadInputError], None]) -> Iterator[tuple[np.ndarray, str, dict]]:
    try:
        yield future.result()
    except BadInputError as e:
        on_error(e)
