"""Speech sources: audio I/O, resampling, folder / hf-dataset / espeak-ng records and their error handling."""

from __future__ import annotations

import json
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest

from mom.data import speech
from mom.data.speech import SpeechRecord, iter_speech_records, write_speech_folder
from mom.utils.audio import read_audio, resample, write_audio
from mom.utils.errors import BadInputError, MissingDependencyError

CLIPS = Path(__file__).resolve().parents[2] / "data" / "small" / "raw" / "speech" / "clips"
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng not installed (apt-get install -y espeak-ng)")


def _sine(freq: float, sr: int, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_frequency(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[spectrum.argmax()])


def _collect(source: str, **options):
    errors: list[BadInputError] = []
    records = list(iter_speech_records(source, on_error=errors.append, **options))
    return records, errors


# ---- resampling -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("from_sr", "to_sr", "freq"), [(22050, 16000, 440.0), (16000, 8000, 1000.0),
                                                        (8000, 16000, 300.0), (44100, 16000, 3000.0)])
def test_resample_keeps_frequency_amplitude_and_duration(from_sr, to_sr, freq):
    x = _sine(freq, from_sr)
    y = resample(x, from_sr, to_sr)
    assert y.dtype == np.float32
    assert len(y) == -(-len(x) * to_sr // from_sr)
    assert abs(_peak_frequency(y, to_sr) - freq) <= 2.0  # FFT bin width is 1 Hz for 1 s
    middle = y[len(y) // 4 : 3 * len(y) // 4]
    assert np.sqrt(np.mean(middle**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)


def test_resample_removes_content_above_the_new_nyquist():
    x = _sine(10_000.0, 44_100)  # above 8 kHz: must not alias into the 16 kHz output
    y = resample(x, 44_100, 16_000)
    assert np.sqrt(np.mean(y[1000:-1000] ** 2)) < 0.01 * np.sqrt(np.mean(x**2))


def test_resample_rejects_bad_input():
    with pytest.raises(ValueError, match="from_sr"):
        resample(np.zeros(10, np.float32), 0, 16000)
    with pytest.raises(ValueError, match="mono"):
        resample(np.zeros((2, 10), np.float32), 8000, 16000)


# ---- audio files ----------------------------------------------------------------------------------------------------


def test_wav_round_trip_and_read_errors(tmp_path):
    x = _sine(440.0, 16000, 0.25)
    write_audio(tmp_path / "a.wav", x, 16000)
    y, sr = read_audio(tmp_path / "a.wav")
    assert sr == 16000 and y.shape == x.shape
    assert np.abs(y - x).max() < 1e-4  # 16-bit quantisation
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00not really a wav file")
    with pytest.raises(BadInputError, match="bad.wav: cannot decode audio"):
        read_audio(tmp_path / "bad.wav")
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        read_audio(tmp_path / "missing.wav")
    (tmp_path / "a.mp3").write_bytes(b"x")
    with pytest.raises(BadInputError, match="unsupported audio format"):
        read_audio(tmp_path / "a.mp3")


def test_stereo_wav_is_averaged_to_mono(tmp_path):
    left, right = np.full(100, 8000, np.int16), np.full(100, -4000, np.int16)
    with wave.open(str(tmp_path / "s.wav"), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.stack([left, right], 1).tobytes())
    y, _ = read_audio(tmp_path / "s.wav")
    assert y.shape == (100,)
    assert y[0] == pytest.approx(2000 / 32768)


# ---- folder source --------------------------------------------------------------------------------------------------


def test_folder_source_reports_bad_items_and_keeps_good_ones(tmp_path):
    write_audio(tmp_path / "good.wav", _sine(300, 16000, 0.5), 16000)
    (tmp_path / "good.txt").write_text("a good clip\n")
    (tmp_path / "corrupt.wav").write_bytes(b"garbage")
    (tmp_path / "corrupt.txt").write_text("corrupt audio")
    write_audio(tmp_path / "slow.wav", _sine(300, 4000, 0.5), 4000)
    (tmp_path / "slow.txt").write_text("sample rate too low")
    write_audio(tmp_path / "silent.wav", _sine(300, 16000, 0.5), 16000)
    (tmp_path / "silent.txt").write_text("   \n")
    write_audio(tmp_path / "orphan.wav", _sine(300, 16000, 0.5), 16000)
    records, errors = _collect("folder", path=tmp_path)
    assert [r.transcript for r in records] == ["a good clip"]
    assert records[0].sample_rate == 16000 and records[0].meta["file"] == "good.wav"
    reasons = {Path(e.path).name: e.reason for e in errors}
    assert set(reasons) == {"corrupt.wav", "slow.wav", "silent.wav", "orphan.wav"}
    assert "cannot decode" in reasons["corrupt.wav"]
    assert "unsupported sample rate 4000 Hz" in reasons["slow.wav"] and "8000-48000" in reasons["slow.wav"]
    assert reasons["silent.wav"] == "empty transcript"
    assert "no transcript" in reasons["orphan.wav"]


def test_on_error_may_raise(tmp_path):
    (tmp_path / "corrupt.wav").write_bytes(b"garbage")
    (tmp_path / "corrupt.txt").write_text("x")

    def stop(error: BadInputError) -> None:
        raise error

    with pytest.raises(BadInputError, match="corrupt.wav"):
        list(iter_speech_records("folder", on_error=stop, path=tmp_path))


def test_transcripts_jsonl_lines_and_missing_files(tmp_path):
    write_audio(tmp_path / "a.wav", _sine(300, 16000, 0.2), 16000)
    lines = [json.dumps({"file": "a.wav", "transcript": "hello", "split": "train", "voice": "v"}), "{not json",
             json.dumps({"file": "gone.wav", "transcript": "lost", "split": "train"})]
    (tmp_path / "transcripts.jsonl").write_text("\n".join(lines))
    records, errors = _collect("folder", path=tmp_path, split="train")
    assert len(records) == 1 and records[0].meta == {"file": "a.wav", "split": "train", "voice": "v"}
    assert any("transcripts.jsonl:2" in e.path for e in errors)
    assert any(e.path.endswith("gone.wav") and "missing" in e.reason for e in errors)
    assert _collect("folder", path=tmp_path, split="validation")[0] == []


def test_committed_clips_have_disjoint_splits_and_synthesis_metadata():
    train, errors = _collect("folder", path=CLIPS, split="train")
    validation, more_errors = _collect("folder", path=CLIPS, split="validation")
    assert errors == more_errors == []
    assert len(train) >= 150 and len(validation) >= 20
    assert not {r.transcript for r in train} & {r.transcript for r in validation}
    for r in train[:20] + validation[:5]:
        assert r.sample_rate == 16000 and r.source == "espeak-ng"
        assert {"voice", "speed", "pitch"} <= set(r.meta)
        assert 0.3 < r.duration < 5.0
    assert len({r.meta["voice"] for r in train}) >= 10


def test_unknown_source_or_option_is_named():
    with pytest.raises(ValueError, match="unknown speech source 'mp3'"):
        iter_speech_records("mp3", on_error=print)
    with pytest.raises(ValueError, match="folder source: unknown option.*'paht'"):
        iter_speech_records("folder", on_error=print, paht="x")


def test_write_speech_folder_refuses_to_clobber(tmp_path):
    out = tmp_path / "clips"
    rec = SpeechRecord(_sine(200, 16000, 0.2), 16000, "one", "test", {"k": 1})
    assert write_speech_folder([rec], out, audio_format="wav") == 1
    with pytest.raises(FileExistsError, match="overwrite"):
        write_speech_folder([rec, rec], out, audio_format="wav")
    assert len(_collect("folder", path=out)[0]) == 1  # the first folder is intact
    write_speech_folder([rec, rec], out, audio_format="wav", overwrite=True)
    records, _ = _collect("folder", path=out)
    assert [r.meta["k"] for r in records] == [1, 1]


# ---- hf-dataset source ----------------------------------------------------------------------------------------------


def test_hf_dataset_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    audio = [{"array": _sine(300, 16000, 0.3).tolist(), "sampling_rate": 16000},
             {"array": _sine(300, 16000, 0.3).tolist(), "sampling_rate": 16000},
             {"array": _sine(300, 96000, 0.01).tolist(), "sampling_rate": 96000}]
    ds = datasets.Dataset.from_dict({"audio": audio, "sentence": ["first", "", "third"], "speaker": [1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "ds"))
    records, errors = _collect("hf-dataset", path=tmp_path / "ds", text_column="sentence")
    assert [(r.transcript, r.meta["speaker"]) for r in records] == [("first", 1)]
    assert records[0].waveform.shape == (4800,)
    assert [e.reason.split(";")[0] for e in errors] == ["empty transcript", "unsupported sample rate 96000 Hz"]
    with pytest.raises(ValueError, match="no column 'text'"):
        _collect("hf-dataset", path=tmp_path / "ds")


def test_hf_dataset_audio_feature_is_decoded_without_datasets_backends(tmp_path):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("soundfile")
    write_audio(tmp_path / "a.flac", _sine(300, 22050, 0.2), 22050)
    cells = [{"bytes": (tmp_path / "a.flac").read_bytes(), "path": None}, {"bytes": b"not flac", "path": None}]
    ds = datasets.Dataset.from_dict({"audio": cells, "text": ["ok", "broken"]})
    ds = ds.cast_column("audio", datasets.Audio(decode=False)).cast_column("audio", datasets.Audio())
    ds.save_to_disk(str(tmp_path / "ds"))
    records, errors = _collect("hf-dataset", path=tmp_path / "ds")
    assert [(r.transcript, r.sample_rate, len(r.waveform)) for r in records] == [("ok", 22050, 4410)]
    assert len(errors) == 1 and "cannot decode audio bytes" in errors[0].reason


# ---- espeak-ng ------------------------------------------------------------------------------------------------------


def test_missing_espeak_is_a_missing_dependency(monkeypatch):
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    with pytest.raises(MissingDependencyError, match="apt-get install -y espeak-ng"):
        speech.synthesize("hello")
    with pytest.raises(MissingDependencyError):
        _collect("espeak", texts=["hello"])


@needs_espeak
def test_synthesize_returns_speech_at_the_requested_rate():
    x = speech.synthesize("a handwritten digit seven", voice="en-us+f3", speed=175, pitch=60, sample_rate=16000)
    assert x.dtype == np.float32 and x.ndim == 1
    assert 0.8 < len(x) / 16000 < 3.0
    assert 0.05 < np.abs(x).max() <= 1.0


@needs_espeak
def test_espeak_source_is_deterministic_and_records_choices():
    texts = ["grinning face", "", "the number four"]
    records, errors = _collect("espeak", texts=texts, voices=["en-us", "en-gb+f2"], speed_range=(150, 190),
                               pitch_range=(40, 60), seed=3, sample_rate=8000)
    again, _ = _collect("espeak", texts=texts, voices=["en-us", "en-gb+f2"], speed_range=(150, 190),
                        pitch_range=(40, 60), seed=3, sample_rate=8000)
    assert [r.transcript for r in records] == ["grinning face", "the number four"]
    assert [e.reason for e in errors] == ["empty transcript"]
    for r, s in zip(records, again):
        assert r.meta == s.meta and np.array_equal(r.waveform, s.waveform)
        assert r.sample_rate == 8000 and r.meta["voice"] in ("en-us", "en-gb+f2")
        assert 150 <= r.meta["speed"] <= 190 and 40 <= r.meta["pitch"] <= 60


# ---- medium corpus speech: Tux Paint recordings, flite / festival voices, resampling speed path ------------------
FIXTURES = Path(__file__).resolve().parent / "fixtures"
needs_flite = pytest.mark.skipif(shutil.which("flite") is None, reason="flite not installed (apt-get install flite)")
needs_festival = pytest.mark.skipif(
    shutil.which("text2wave") is None or not Path("/usr/share/festival/voices/english/kal_diphone").is_dir(),
    reason="festival or its kal_diphone voice not installed (apt-get install festival festvox-kallpc16k)",
)


def test_tuxpaint_recordings_pair_with_their_language_and_bad_clips_are_counted():
    pytest.importorskip("soundfile")
    errors: list[BadInputError] = []
    records = list(iter_speech_records("tuxpaint", on_error=errors.append, path=str(FIXTURES / "tuxpaint")))
    by_language = {r.meta["language"]: r for r in records}
    assert set(by_language) == {"en", "fr"}
    assert by_language["en"].transcript == "A koala." and by_language["fr"].transcript == "Un koala."
    assert by_language["en"].sample_rate == 44100 and 0.3 < by_language["en"].duration < 3
    assert all(r.source == "tuxpaint" and r.meta["license"] == "GPL-2.0-or-later" for r in records)
    reasons = sorted((Path(e.path).name, e.reason.split(" (")[0]) for e in errors)
    assert reasons == [
        ("corrupt_desc.ogg", "cannot decode audio bytes"),  # a truncated Ogg file
        ("koala_desc_nl.ogg", "no 'nl' description in the stamp's .txt to pair it with"),
    ]
    only_fr = list(iter_speech_records("tuxpaint", on_error=errors.append, path=str(FIXTURES / "tuxpaint"),
                                       languages=["fr"]))  # fmt: skip
    assert [r.meta["language"] for r in only_fr] == ["fr"]


def test_split_sentences_keeps_whole_sentences_under_the_limit():
    from mom.data.tts import split_sentences

    text = "First one. Second sentence here!  Third?\n" + "word " * 30
    groups = split_sentences(text, 35)
    assert groups[0] == "First one. Second sentence here!" and groups[1].startswith("Third?")
    assert all(len(g) <= 35 for g in groups) and " ".join(groups).split() == text.split()


@needs_flite
def test_flite_voices_speak_sentence_groups_in_order_with_parallel_workers():
    texts = ["The cat sat on the mat. It was warm.", "", "A second text, spoken too."]
    errors: list[BadInputError] = []
    records = list(iter_speech_records("flite", on_error=errors.append, texts=texts, voices=["kal16", "slt"],
                                       max_chars=20, workers=2, seed=3))  # fmt: skip
    assert [r.transcript for r in records] == ["The cat sat on the", "mat. It was warm.", "A second text,",
                                               "spoken too."]  # fmt: skip
    assert [r.meta["index"] for r in records] == [0, 1, 3, 4]
    assert len(errors) == 1 and "empty transcript" in errors[0].reason  # the empty text, by position
    assert all(r.sample_rate == 16000 and r.meta["voice"] in ("kal16", "slt") and r.duration > 0.3 for r in records)
    again = list(iter_speech_records("flite", on_error=errors.append, texts=texts, voices=["kal16", "slt"],
                                     max_chars=20, workers=1, seed=3))  # fmt: skip
    assert [r.meta for r in again] == [r.meta for r in records]  # voices and rates do not depend on workers
    with pytest.raises(ValueError, match="flite has no voice .'nobody'."):
        list(iter_speech_records("flite", on_error=errors.append, texts=texts, voices=["nobody"]))


@needs_festival
def test_festival_diphone_voice_speaks():
    errors: list[BadInputError] = []
    records = list(iter_speech_records("festival", on_error=errors.append, texts=["Hello world."],
                                       voices=["kal_diphone"]))  # fmt: skip
    assert len(records) == 1 and not errors and records[0].duration > 0.3


def test_tts_sources_name_the_missing_engine(monkeypatch):
    from mom.data import tts

    monkeypatch.setattr(tts.shutil, "which", lambda name: None)
    with pytest.raises(MissingDependencyError, match="apt-get install festival"):
        list(iter_speech_records("festival", on_error=print, texts=["hi"]))
    assert tts.missing_tts("flite") == ["apt-get install flite  (flite speech source)"]


@pytest.mark.parametrize(("from_sr", "to_sr"), [(22050, 16000), (44100, 16000), (16000, 22050), (8000, 16000)])
def test_resample_polyphase_conv_equals_the_per_sample_gather(monkeypatch, from_sr, to_sr):
    from mom.utils import audio

    x = np.random.default_rng(0).standard_normal(from_sr // 3 + 7).astype(np.float32)
    fast = resample(x, from_sr, to_sr)
    monkeypatch.setattr(audio, "_RESAMPLE_MAX_KERNEL", 0)  # force the gather path: the direct definition
    np.testing.assert_allclose(fast, resample(x, from_sr, to_sr), atol=1e-6)
