"""Discrete speech units: log-mel frames quantised by k-means (kind ``"mel-kmeans-speech"``).

A waveform is resampled to ``sample_rate``, cut into Hann-windowed frames every ``hop_length`` samples (so
``units_per_second = sample_rate / hop_length``, 50 by default), turned into ``n_mels`` log-mel energies, normalised
per feature with statistics of the training set, and each frame is replaced by the index of its nearest k-means
centroid. Decoding maps units back to centroid log-mels, inverts the mel filterbank with its pseudo-inverse and
recovers a waveform with Griffin-Lim, so one can listen to what the units keep (coarse spectral envelope; no pitch
detail, so the voice sounds robotic).

Command line (``mom-tokenizer speech --help``, in :mod:`mom.cli.tokenizer`): ``train --recipe R --out DIR``,
``eval --tokenizer DIR``, ``decode --tokenizer DIR --audio in.wav --out out.wav``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mom.utils.atomic import atomic_save, atomic_write_text
from mom.utils.audio import (
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    as_mono_tensor,
    griffin_lim,
    mel_filterbank,
    mel_to_linear,
    resample,
    stft,
)
from mom.utils.configio import from_dict

KIND = "mel-kmeans-speech"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Added to mel power before the log: ~-80 dB below a loud 16 kHz speech frame with this window, so silence and
# quantisation noise land on one floor instead of spreading over log(0) = -inf.
LOG_MEL_FLOOR = 1e-4
_CHUNK = 65536  # frames per distance computation; bounds memory at chunk * num_units floats


# ---- configuration -------------------------------------------------------------------------------------------------


def _positive_int(owner: object, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class SpeechTokenizerConfig:
    """Feature extraction and codebook size. Defaults: 16 kHz, 25 ms windows every 20 ms (50 units/s), 80 mels."""

    sample_rate: int = 16_000
    n_fft: int = 512
    win_length: int = 400  # 25 ms at 16 kHz
    hop_length: int = 320  # 20 ms at 16 kHz -> 50 frames (units) per second
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float = 8_000.0
    num_units: int = 256  # k of k-means = vocabulary size
    mel_inversion_iters: int = 30  # decoding only: non-negative refinement steps after the pseudo-inverse
    griffin_lim_iters: int = 32  # decoding only
    decode_upsample: int = 4  # decoding runs Griffin-Lim at hop_length / decode_upsample for overlap-add redundancy

    def __post_init__(self) -> None:
        _positive_int(self, "sample_rate", "n_fft", "win_length", "hop_length", "n_mels", "num_units",
                      "griffin_lim_iters", "decode_upsample")
        if type(self.mel_inversion_iters) is not int or self.mel_inversion_iters < 0:
            raise ValueError(f"mel_inversion_iters: must be an integer >= 0, got {self.mel_inversion_iters!r}")
        if not MIN_SAMPLE_RATE <= self.sample_rate <= MAX_SAMPLE_RATE:
            raise ValueError(f"sample_rate: must be in {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz, got {self.sample_rate}")
        if self.win_length > self.n_fft:
            raise ValueError(f"win_length: must be <= n_fft ({self.n_fft}), got {self.win_length}")
        if self.hop_length > self.win_length:
            raise ValueError(f"hop_length: must be <= win_length ({self.win_length}) or frames skip samples, "
                             f"got {self.hop_length}")
        if self.hop_length % self.decode_upsample:
            raise ValueError(f"decode_upsample: must divide hop_length ({self.hop_length}), got {self.decode_upsample}")
        if self.n_mels > self.n_fft // 2 + 1:
            raise ValueError(f"n_mels: must be <= n_fft // 2 + 1 ({self.n_fft // 2 + 1}), got {self.n_mels}")
        for name in ("f_min", "f_max"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name}: must be a number, got {value!r}")
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise ValueError(f"f_min/f_max: need 0 <= f_min < f_max <= sample_rate / 2 ({self.sample_rate / 2}), "
                             f"got {self.f_min}, {self.f_max}")

    @property
    def units_per_second(self) -> float:
        return self.sample_rate / self.hop_length


@dataclass(frozen=True)
class KMeansConfig:
    """k-means training: at most ``max_frames`` frames (a seeded random subset), ``iters`` Lloyd iterations or until
    the mean distortion improves by less than ``tolerance`` (relative), on ``device``."""

    iters: int = 50
    max_frames: int = 200_000
    tolerance: float = 1e-4
    device: str = "cpu"

    def __post_init__(self) -> None:
        _positive_int(self, "iters", "max_frames")
        if not isinstance(self.tolerance, (int, float)) or isinstance(self.tolerance, bool) or self.tolerance < 0:
            raise ValueError(f"tolerance: must be a number >= 0, got {self.tolerance!r}")


# ---- the tokenizer -------------------------------------------------------------------------------------------------


class SpeechTokenizer:
    """Waveform <-> discrete units. ``centroids`` ``(num_units, n_mels)`` live in normalised log-mel space;
    ``feature_mean`` / ``feature_std`` ``(n_mels,)`` are the training-set statistics used to normalise."""

    def __init__(self, config: SpeechTokenizerConfig, centroids: torch.Tensor, feature_mean: torch.Tensor,
                 feature_std: torch.Tensor, info: dict | None = None) -> None:
        expected = {"centroids": (config.num_units, config.n_mels), "feature_mean": (config.n_mels,),
                    "feature_std": (config.n_mels,)}
        for name, tensor in (("centroids", centroids), ("feature_mean", feature_mean), ("feature_std", feature_std)):
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"{name}: expected shape {expected[name]}, got {tuple(tensor.shape)}")
        self.config = config
        self.centroids = centroids.detach().to(torch.float32).cpu().contiguous()
        self.feature_mean = feature_mean.detach().to(torch.float32).cpu().contiguous()
        self.feature_std = feature_std.detach().to(torch.float32).cpu().contiguous()
        self.info = dict(info or {})  # free-form metadata saved in config.json (e.g. the training report)
        self._filterbank = mel_filterbank(config.sample_rate, config.n_fft, config.n_mels, config.f_min,
                                          config.f_max)  # (M, F)
        self._filterbank_pinv = torch.linalg.pinv(self._filterbank.double()).float()  # (F, M)

    @property
    def vocab_size(self) -> int:
        return self.config.num_units

    @property
    def units_per_second(self) -> float:
        return self.config.units_per_second

    # ---- features ------------------------------------------------------------------------------------------------
    def log_mel(self, waveform: np.ndarray | torch.Tensor, sample_rate: int) -> torch.Tensor:
        """Log-mel frames ``(t, n_mels)`` of a mono waveform ``(n,)``, ``t = 1 + n' // hop_length`` where ``n'`` is
        the length after resampling to ``config.sample_rate``."""
        c = self.config
        x = as_mono_tensor(waveform)
        if sample_rate != c.sample_rate:
            x = torch.from_numpy(resample(x, int(sample_rate), c.sample_rate))
        power = stft(x.to(torch.float32), c.n_fft, c.hop_length, c.win_length).abs() ** 2  # (F, t)
        return torch.log(self._filterbank @ power + LOG_MEL_FLOOR).T.contiguous()  # (t, M)

    def normalise(self, log_mel: torch.Tensor) -> torch.Tensor:
        return (log_mel - self.feature_mean) / self.feature_std

    def quantise(self, features: torch.Tensor) -> torch.Tensor:
        """Nearest-centroid index of each normalised frame ``(t, n_mels) -> (t,)`` int64."""
        return _assign(features, self.centroids)[0]

    # ---- public API ------------------------------------------------------------------------------------------------
    def encode(self, waveform: np.ndarray | torch.Tensor, sample_rate: int) -> torch.Tensor:
        """Units ``(t,)`` int64 in ``[0, vocab_size)`` of a mono float waveform ``(n,)`` at ``sample_rate`` Hz
        (resampled as needed); ``t = 1 + n' // hop_length``, i.e. ``units_per_second`` per second of audio."""
        if not isinstance(sample_rate, (int, np.integer)) or isinstance(sample_rate, bool) or sample_rate <= 0:
            raise ValueError(f"sample_rate: must be a positive integer, got {sample_rate!r}")
        return self.quantise(self.normalise(self.log_mel(waveform, int(sample_rate))))

    def decode(self, units: torch.Tensor | np.ndarray | Sequence[int]) -> tuple[np.ndarray, int]:
        """Listenable reconstruction ``(waveform (t * hop_length,) float32, sample_rate)`` of units ``(t,)``:
        centroid log-mels -> mel power -> linear power (filterbank pseudo-inverse, refined non-negatively) ->
        Griffin-Lim."""
        c = self.config
        units = torch.as_tensor(np.asarray(units) if not isinstance(units, torch.Tensor) else units)
        if units.dim() != 1:
            raise ValueError(f"units: expected shape (t,), got {tuple(units.shape)}")
        if units.is_floating_point() or units.dtype == torch.bool:
            raise ValueError(f"units: expected integer ids, got dtype {units.dtype}")
        if units.numel() == 0:
            return np.zeros(0, dtype=np.float32), c.sample_rate
        bad = (units < 0) | (units >= self.vocab_size)
        if bool(bad.any()):
            raise ValueError(f"unit {int(units[bad][0])} is out of range [0, {self.vocab_size})")
        log_mel = self.centroids[units.long()] * self.feature_std + self.feature_mean  # (t, M)
        # Linear interpolation onto a grid decode_upsample times finer: frame k sits at coarse position k / u.
        u, t = c.decode_upsample, log_mel.shape[0]
        pos = torch.arange(t * u, dtype=torch.float32) / u
        lo = pos.floor().long().clamp(max=t - 1)
        hi = (lo + 1).clamp(max=t - 1)
        w = (pos - lo.float())[:, None]
        fine = log_mel[lo] * (1 - w) + log_mel[hi] * w  # (t * u, M)
        mel_power = (fine.exp() - LOG_MEL_FLOOR).clamp(min=0.0)
        linear = mel_to_linear(mel_power, self._filterbank, self._filterbank_pinv, c.mel_inversion_iters)  # (t * u, F)
        magnitude = linear.sqrt().T.contiguous()  # (F, t * u)
        hop = c.hop_length // u
        x = griffin_lim(magnitude, c.n_fft, hop, c.win_length, length=(t * u - 1) * hop + hop,
                        n_iter=c.griffin_lim_iters)
        peak = float(x.abs().max())
        if peak > 1.0:  # the pseudo-inverse can overshoot; keep the result playable
            x = x / peak
        return x.numpy().astype(np.float32), c.sample_rate

    # ---- persistence -----------------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write ``model.safetensors`` then ``config.json`` (each written whole or not at all, ``mom.utils.atomic``)."""
        directory = Path(directory)
        tensors = {"centroids": self.centroids, "feature_mean": self.feature_mean, "feature_std": self.feature_std}
        atomic_save(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"kind": KIND}))
        payload = {"kind": KIND, "format_version": FORMAT_VERSION, "weights": WEIGHTS_FILE,
                   "config": asdict(self.config), "info": self.info}
        atomic_write_text(directory / CONFIG_FILE, json.dumps(payload, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SpeechTokenizer:
        """Load a directory written by :meth:`save`; a missing or mismatched file raises an error naming it."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: missing; not a speech tokenizer directory")
        try:
            payload = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: not valid JSON ({e})") from e
        if not isinstance(payload, dict) or payload.get("kind") != KIND:
            kind = payload.get("kind") if isinstance(payload, dict) else None
            raise ValueError(f"{config_path}: kind is {kind!r}, expected {KIND!r}")
        if payload.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{config_path}: format_version {payload.get('format_version')!r} is not supported "
                             f"(expected {FORMAT_VERSION})")
        try:
            config = from_dict(SpeechTokenizerConfig, payload.get("config"), "config", list_unknown=True)
        except ValueError as e:
            raise ValueError(f"{config_path}: {e}") from e
        if not weights_path.is_file():
            raise FileNotFoundError(f"{weights_path}: missing (the weights that go with {config_path})")
        try:
            tensors = load_file(str(weights_path))
        except Exception as e:
            raise ValueError(f"{weights_path}: unreadable safetensors file ({e})") from e
        names = {"centroids", "feature_mean", "feature_std"}
        if set(tensors) != names:
            raise ValueError(f"{weights_path}: holds tensors {sorted(tensors)}, expected {sorted(names)}")
        try:
            return cls(config, tensors["centroids"], tensors["feature_mean"], tensors["feature_std"],
                       payload.get("info"))
        except ValueError as e:
            raise ValueError(f"{weights_path}: does not match {config_path}: {e}") from e


# ---- k-means -------------------------------------------------------------------------------------------------------


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid ``(n,)`` and squared distance ``(n,)`` of points ``x`` ``(n, d)``, in chunks."""
    c = centroids.to(x.device, x.dtype)
    c_sq = (c * c).sum(1)  # (k,)
    idx, dist = [], []
    for chunk in x.split(_CHUNK):
        d = (chunk * chunk).sum(1, keepdim=True) - 2 * chunk @ c.T + c_sq  # (c, k)
        best, arg = d.min(dim=1)
        idx.append(arg)
        dist.append(best.clamp(min=0))
    if not idx:
        return torch.zeros(0, dtype=torch.long, device=x.device), torch.zeros(0, device=x.device)
    return torch.cat(idx), torch.cat(dist)


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new centre drawn with probability proportional to the
    squared distance to the nearest centre so far. Returns ``(k, d)``."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x[first]]
    nearest = ((x - x[first]) ** 2).sum(1)  # (n,)
    for _ in range(1, k):
        total = float(nearest.sum())
        if total > 0:
            probs = (nearest / total).double().cpu()
        else:  # fewer distinct points than k: any point will do
            probs = torch.full((n,), 1.0 / n, dtype=torch.float64)
        i = int(torch.multinomial(probs, 1, generator=generator))
        centres.append(x[i])
        nearest = torch.minimum(nearest, ((x - x[i]) ** 2).sum(1))
    return torch.stack(centres)


def kmeans(x: torch.Tensor, k: int, iters: int, seed: int, tolerance: float = 1e-4,
           progress: bool = True) -> tuple[torch.Tensor, float]:
    """Full-batch Lloyd k-means of points ``(n, d)`` from k-means++ seeds; deterministic given ``seed`` on one device.

    Empty clusters are re-seeded with the points farthest from their centroid. Returns centroids ``(k, d)`` and the
    final mean squared distance per point.
    """
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} frames, got {x.shape[0]}; add audio or lower num_units")
    generator = torch.Generator().manual_seed(seed)
    centroids = kmeans_plus_plus(x, k, generator)
    previous = math.inf
    bar = tqdm(range(iters), desc="k-means", unit="iter", disable=not progress)
    distortion = math.inf
    for _ in bar:
        assignment, dist = _assign(x, centroids)
        distortion = float(dist.mean())
        counts = torch.bincount(assignment, minlength=k)  # (k,)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, x)  # (k, d)
        empty = (counts == 0).nonzero().flatten()
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None].to(x.dtype), centroids)
        if empty.numel():
            far = dist.topk(empty.numel()).indices
            centroids[empty] = x[far]
        bar.set_postfix(distortion=f"{distortion:.4f}", empty=int(empty.numel()))
        if empty.numel() == 0 and math.isfinite(previous) and previous - distortion <= tolerance * previous:
            break
        previous = distortion
    _, dist = _assign(x, centroids)
    return centroids, float(dist.mean())


# ---- training and evaluation ---------------------------------------------------------------------------------------


@dataclass
class SpeechTokenizerReport:
    """Codebook statistics over a set of clips; perplexity = exp(entropy of the unit histogram)."""

    clips: int
    seconds: float
    units: int
    units_per_second: float
    used_units: int
    total_units: int
    perplexity: float
    distortion: float  # mean squared distance of a normalised frame to its centroid (0 = perfect; ~n_mels = none)

    def summary(self) -> str:
        return (f"{self.clips} clips, {self.seconds:.1f} s, {self.units} units = {self.units_per_second:.2f} units/s; "
                f"codebook usage {self.used_units}/{self.total_units} "
                f"({100 * self.used_units / self.total_units:.1f}%), perplexity {self.perplexity:.1f}, "
                f"distortion {self.distortion:.3f}")


def _clips(data: Iterable[object], sample_rate: int) -> Iterable[tuple[np.ndarray | torch.Tensor, int]]:
    """``(waveform, sample_rate)`` from SpeechRecords, ``(waveform, sr)`` pairs or bare waveforms at ``sample_rate``."""
    for item in data:
        if hasattr(item, "waveform") and hasattr(item, "sample_rate"):
            yield item.waveform, int(item.sample_rate)
        elif isinstance(item, tuple) and len(item) == 2:
            yield item[0], int(item[1])
        else:
            yield item, sample_rate


def _histogram_report(counts: torch.Tensor, clips: int, seconds: float, distortion: float) -> SpeechTokenizerReport:
    total = int(counts.sum())
    p = counts[counts > 0].double() / max(total, 1)
    return SpeechTokenizerReport(
        clips=clips, seconds=seconds, units=total, units_per_second=total / seconds if seconds else 0.0,
        used_units=int((counts > 0).sum()), total_units=int(counts.numel()),
        perplexity=float(torch.exp(-(p * p.log()).sum())) if total else 0.0, distortion=distortion)


def evaluate(tokenizer: SpeechTokenizer, data: Iterable[object], progress: bool = True) -> SpeechTokenizerReport:
    """Encode every clip and report units per second and codebook usage."""
    counts = torch.zeros(tokenizer.vocab_size, dtype=torch.long)
    clips, seconds, dist_sum = 0, 0.0, 0.0
    for waveform, sr in tqdm(_clips(data, tokenizer.config.sample_rate), desc="encoding", unit="clip",
                             disable=not progress):
        features = tokenizer.normalise(tokenizer.log_mel(waveform, sr))
        units, dist = _assign(features, tokenizer.centroids)
        counts += torch.bincount(units, minlength=tokenizer.vocab_size)
        dist_sum += float(dist.sum())
        clips += 1
        seconds += len(waveform) / sr
    return _histogram_report(counts, clips, seconds, dist_sum / max(int(counts.sum()), 1))


def train_speech_tokenizer(records_or_waveforms: Iterable[object], config: SpeechTokenizerConfig, seed: int = 0,
                           kmeans_config: KMeansConfig | None = None,
                           progress: bool = True) -> tuple[SpeechTokenizer, SpeechTokenizerReport]:
    """Fit normalisation statistics and a k-means codebook on log-mel frames of the given clips.

    ``records_or_waveforms``: records with ``waveform`` and ``sample_rate`` attributes (e.g. ``SpeechRecord``),
    ``(waveform, sample_rate)`` pairs or bare waveforms at ``config.sample_rate``. All frames are held in memory
    (``n_frames * n_mels * 4`` bytes); k-means runs on at most ``kmeans_config.max_frames`` of them. Prints and
    returns a report on the training clips.
    """
    kc = kmeans_config or KMeansConfig()
    probe = SpeechTokenizer(config, torch.zeros(config.num_units, config.n_mels), torch.zeros(config.n_mels),
                            torch.ones(config.n_mels))
    frames, clips, seconds = [], 0, 0.0
    for waveform, sr in tqdm(_clips(records_or_waveforms, config.sample_rate), desc="log-mel", unit="clip",
                             disable=not progress):
        frames.append(probe.log_mel(waveform, sr))
        clips += 1
        seconds += len(waveform) / sr
    if not frames:
        raise ValueError("no training audio: the data yielded no clips")
    x = torch.cat(frames)  # (n, M)
    mean = x.double().mean(0)
    std = x.double().std(0).clamp(min=1e-3)  # floor: a constant mel band (e.g. above a low-pass) must not blow up
    x = ((x - mean) / std).float()
    generator = torch.Generator().manual_seed(seed)
    subset = x if x.shape[0] <= kc.max_frames else x[torch.randperm(x.shape[0], generator=generator)[: kc.max_frames]]
    centroids, _ = kmeans(subset.to(kc.device), config.num_units, kc.iters, seed, kc.tolerance, progress)
    tokenizer = SpeechTokenizer(config, centroids.cpu(), mean.float(), std.float())
    units, dist = _assign(x, tokenizer.centroids)
    report = _histogram_report(torch.bincount(units, minlength=config.num_units), clips, seconds,
                               float(dist.mean()))
    tokenizer.info = {"train_report": asdict(report), "seed": seed, "kmeans": asdict(kc),
                      "train_frames": int(x.shape[0]), "kmeans_frames": int(subset.shape[0])}
    print(f"train: {report.summary()}")
    return tokenizer, report
