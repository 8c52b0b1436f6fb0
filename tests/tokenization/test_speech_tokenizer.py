"""Log-mel k-means speech tokenizer: frame rate, save/load, decoding, codebook usage, recipes and errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mom.data.speech import iter_speech_records
from mom.data.tokenizer_training import SpeechTokenizerRecipe
from mom.tokenization.speech import (
    KMeansConfig,
    SpeechTokenizer,
    SpeechTokenizerConfig,
    evaluate,
    kmeans,
    train_speech_tokenizer,
)
from mom.utils.audio import resample

ROOT = Path(__file__).resolve().parents[2]
CLIPS = ROOT / "data" / "small" / "raw" / "speech" / "clips"
SMALL = ROOT / "tokenizers" / "small" / "speech"
RECIPES = ROOT / "tokenizers" / "recipes"


@pytest.fixture(scope="module")
def tokenizer() -> SpeechTokenizer:
    return SpeechTokenizer.load(SMALL)


@pytest.fixture(scope="module")
def validation_clips() -> list:
    return list(iter_speech_records("folder", on_error=pytest.fail, path=CLIPS, split="validation"))


def test_committed_tokenizer_matches_its_recipe(tokenizer):
    recipe = SpeechTokenizerRecipe.from_yaml(RECIPES / "speech_small.yaml")
    assert tokenizer.config == recipe.tokenizer
    assert tokenizer.vocab_size == 256 and tokenizer.units_per_second == 50.0
    assert sum(f.stat().st_size for f in SMALL.iterdir()) < 1_000_000


@pytest.mark.parametrize("sample_rate", [16000, 22050, 8000])
@pytest.mark.parametrize("seconds", [0.05, 1.0, 2.37])
def test_encode_rate_is_units_per_second_within_one_frame(tokenizer, sample_rate, seconds):
    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal(int(sample_rate * seconds))).astype(np.float32)
    units = tokenizer.encode(x, sample_rate)
    assert units.dtype == torch.int64 and units.dim() == 1
    assert abs(units.numel() - seconds * tokenizer.units_per_second) <= 1
    assert int(units.min()) >= 0 and int(units.max()) < tokenizer.vocab_size


def test_encode_resamples_before_framing(tokenizer, validation_clips):
    clip = validation_clips[0]
    at_16k = tokenizer.encode(clip.waveform, 16000)
    at_22k = tokenizer.encode(resample(clip.waveform, 16000, 22050), 22050)
    assert at_16k.shape == at_22k.shape
    assert (at_16k == at_22k).float().mean() > 0.85  # same frames; resampling error flips a few near boundaries


def test_decode_returns_audio_of_the_encoded_duration(tokenizer, validation_clips):
    clip = validation_clips[1]
    units = tokenizer.encode(clip.waveform, clip.sample_rate)
    audio, sr = tokenizer.decode(units)
    assert sr == 16000 and audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) / sr - clip.duration) <= 1 / tokenizer.units_per_second
    assert 0.01 < np.abs(audio).max() <= 1.0
    # The decoded audio re-encodes to a log-mel close to the units' centroids: decoding keeps what the units hold.
    centroid_mel = tokenizer.centroids[units] * tokenizer.feature_std + tokenizer.feature_mean
    decoded_mel = tokenizer.log_mel(audio, sr)[: len(units)]
    corr = np.corrcoef(centroid_mel.flatten(), decoded_mel.flatten())[0, 1]
    assert corr > 0.95


def test_units_out_of_range_or_of_wrong_type_are_rejected(tokenizer):
    with pytest.raises(ValueError, match=r"unit 256 is out of range \[0, 256\)"):
        tokenizer.decode(torch.tensor([3, 256]))
    with pytest.raises(ValueError, match="unit -1"):
        tokenizer.decode([0, -1])
    with pytest.raises(ValueError, match="integer"):
        tokenizer.decode(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \(t,\)"):
        tokenizer.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="mono"):
        tokenizer.encode(np.zeros((2, 100), np.float32), 16000)
    with pytest.raises(ValueError, match="empty"):
        tokenizer.encode(np.zeros(0, np.float32), 16000)


def test_save_load_is_identical_and_bad_directories_are_named(tokenizer, validation_clips, tmp_path):
    tokenizer.save(tmp_path / "tok")
    loaded = SpeechTokenizer.load(tmp_path / "tok")
    assert loaded.config == tokenizer.config
    for name in ("centroids", "feature_mean", "feature_std"):
        assert torch.equal(getattr(loaded, name), getattr(tokenizer, name))
    clip = validation_clips[2]
    assert torch.equal(loaded.encode(clip.waveform, 16000), tokenizer.encode(clip.waveform, 16000))
    assert json.loads((tmp_path / "tok" / "config.json").read_text())["kind"] == "mel-kmeans-speech"

    with pytest.raises(FileNotFoundError, match="config.json"):
        SpeechTokenizer.load(tmp_path / "nowhere")
    shutil.copytree(tmp_path / "tok", tmp_path / "no_weights")
    (tmp_path / "no_weights" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        SpeechTokenizer.load(tmp_path / "no_weights")
    for edit, message in [(lambda p: p.update(kind="vq-image"), "kind is 'vq-image'"),
                          (lambda p: p["config"].update(num_units=128), "does not match.*centroids"),
                          (lambda p: p["config"].update(hop_lenght=1), "unknown key.*config.hop_lenght")]:
        shutil.rmtree(tmp_path / "edited", ignore_errors=True)
        shutil.copytree(tmp_path / "tok", tmp_path / "edited")
        payload = json.loads((tmp_path / "edited" / "config.json").read_text())
        edit(payload)
        (tmp_path / "edited" / "config.json").write_text(json.dumps(payload))
        with pytest.raises(ValueError, match=message):
            SpeechTokenizer.load(tmp_path / "edited")


def test_committed_tokenizer_codebook_usage_on_held_out_clips(tokenizer, validation_clips):
    report = evaluate(tokenizer, validation_clips, progress=False)
    assert abs(report.units_per_second - 50.0) < 1.0
    # Floors a few points under the measured 236/256 units and perplexity 96 (docs/speech.md).
    assert report.used_units >= 200
    assert report.perplexity >= 70


def test_training_is_deterministic_and_uses_the_codebook():
    clips = list(iter_speech_records("folder", on_error=pytest.fail, path=CLIPS, split="train"))[:60]
    config = SpeechTokenizerConfig(num_units=32)
    kc = KMeansConfig(iters=15)
    tok_a, report = train_speech_tokenizer(clips, config, seed=1, kmeans_config=kc, progress=False)
    tok_b, _ = train_speech_tokenizer(clips, config, seed=1, kmeans_config=kc, progress=False)
    assert torch.equal(tok_a.centroids, tok_b.centroids)
    assert report.used_units == 32 and report.perplexity > 16
    assert report.distortion < 0.25 * config.n_mels  # k-means explains >75% of the normalised feature variance
    assert abs(report.units_per_second - 50.0) < 1.0
    tok_c, _ = train_speech_tokenizer(clips[:20], config, seed=2, kmeans_config=kc, progress=False)
    assert not torch.equal(tok_a.centroids, tok_c.centroids)


def test_kmeans_finds_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = (centres.repeat_interleave(200, 0) + 0.1 * torch.randn(800, 2, generator=gen))
    found, distortion = kmeans(x, 4, iters=20, seed=0, progress=False)
    assert distortion < 0.05
    assert torch.cdist(centres, found).min(dim=1).values.max() < 0.1
    with pytest.raises(ValueError, match="at least k=16 frames"):
        kmeans(x[:10], 16, iters=5, seed=0, progress=False)


def test_config_validation():
    with pytest.raises(ValueError, match="hop_length"):
        SpeechTokenizerConfig(hop_length=500)
    with pytest.raises(ValueError, match="num_units"):
        SpeechTokenizerConfig(num_units=0)
    with pytest.raises(ValueError, match="sample_rate"):
        SpeechTokenizerConfig(sample_rate=96000, f_max=8000.0)
