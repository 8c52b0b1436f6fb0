"""Audio files and DSP: WAV / FLAC reading and writing, band-limited resampling, STFT / log-mel features, mel
inversion and Griffin-Lim.

The DSP is deterministic, runs on CPU or GPU and has no dependency beyond torch and numpy (torchaudio is not
installable beside our torch build, so the few pieces we need are written out here). WAV files need only the standard
library; FLAC needs ``soundfile``.
"""

from __future__ import annotations

import io
import math
import os
import wave
from pathlib import Path

import numpy as np
import torch

from mom.utils.atomic import atomic_file
from mom.utils.errors import BadInputError, MissingDependencyError

# Telephone band (8 kHz) up to studio rate (48 kHz): the range of sample rates speech tools here accept.
MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 48_000
# Resampler defaults: 16 zero crossings of the windowed sinc on each side and a cut-off at 94.5 % of the lower Nyquist
# frequency, so the transition band sits just below Nyquist (the usual trade-off of speech toolkits).
RESAMPLE_ZERO_CROSSINGS = 16
RESAMPLE_ROLLOFF = 0.945
_RESAMPLE_CHUNK = 16384  # output samples per gather, bounds memory at ~chunk * taps floats
_RESAMPLE_MAX_KERNEL = 1 << 22  # polyphase kernel elements (32 MB of float64) above which resample gathers instead
AUDIO_SUFFIXES = (".wav", ".flac")


# ---- audio files -------------------------------------------------------------------------------------------------


def _soundfile():
    try:
        import soundfile
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingDependencyError("reading/writing FLAC needs the `soundfile` package: pip install soundfile") from e
    return soundfile


def to_mono_float32(samples: np.ndarray) -> np.ndarray:
    """``(n,)`` or ``(n, channels)`` -> mono float32 ``(n,)`` (channels averaged)."""
    samples = np.asarray(samples, dtype=np.float32)
    return samples.mean(axis=1) if samples.ndim == 2 else samples


def _read_wav_stdlib(source: str) -> tuple[np.ndarray, int]:
    """PCM WAV (8/16/24/32-bit integer) with the standard library."""
    with wave.open(source, "rb") as w:
        width, channels, sr = w.getsampwidth(), w.getnchannels(), w.getframerate()
        raw = w.readframes(w.getnframes())
    if width == 1:  # 8-bit WAV is unsigned
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 3:  # 24-bit little endian: widen to int32 by hand
        b = np.frombuffer(raw[: len(raw) // 3 * 3], dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8).astype(np.float32) / 2**23
    elif width in (2, 4):
        dtype = np.int16 if width == 2 else np.int32
        x = np.frombuffer(raw[: len(raw) // width * width], dtype=dtype).astype(np.float32) / 2 ** (8 * width - 1)
    else:
        raise ValueError(f"unsupported WAV sample width {width} bytes")
    return to_mono_float32(x[: len(x) // channels * channels].reshape(-1, channels)), sr


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read a WAV or FLAC file as ``(waveform (n,) float32 mono in [-1, 1], sample_rate)``; channels are averaged.

    Raises ``FileNotFoundError`` for a missing file, :class:`BadInputError` for an unreadable, corrupt or empty one,
    and :class:`MissingDependencyError` for FLAC without the ``soundfile`` package. WAV needs only the standard
    library (integer PCM); ``soundfile``, when installed, also reads float WAV.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such audio file")
    suffix = path.suffix.lower()
    if suffix not in AUDIO_SUFFIXES:
        raise BadInputError(str(path), f"unsupported audio format {suffix!r}; supported: {', '.join(AUDIO_SUFFIXES)}")
    try:
        if suffix == ".wav":
            try:
                x, sr = _read_wav_stdlib(str(path))
            except (wave.Error, ValueError, EOFError) as stdlib_error:
                try:
                    import soundfile
                except ImportError:
                    raise stdlib_error from None
                x, sr = soundfile.read(str(path), dtype="float32", always_2d=False)
        else:
            x, sr = _soundfile().read(str(path), dtype="float32", always_2d=False)
    except MissingDependencyError:
        raise
    except Exception as e:  # every decoder error means the same thing to the caller: this file is unusable
        raise BadInputError(str(path), f"cannot decode audio ({type(e).__name__}: {e})") from e
    x = to_mono_float32(x)
    if x.size == 0:
        raise BadInputError(str(path), "audio file holds no samples")
    return x, int(sr)


def decode_audio_bytes(data: bytes, where: str) -> tuple[np.ndarray, int]:
    """Decode an encoded audio file held in memory (any format ``soundfile`` reads) to ``(waveform, sample_rate)``;
    :class:`BadInputError` naming ``where`` if it does not decode."""
    soundfile = _soundfile()
    try:
        x, sr = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=False)
    except Exception as e:  # every decoder error means the same thing to the caller: these bytes are unusable
        raise BadInputError(where, f"cannot decode audio bytes ({type(e).__name__}: {e})") from e
    return to_mono_float32(x), int(sr)


def write_audio(path: str | os.PathLike, waveform: np.ndarray, sample_rate: int, bits: int = 16) -> None:
    """Write mono float audio to ``.wav`` (16-bit PCM, standard library) or ``.flac`` (``soundfile``), atomically.

    ``bits`` < 16 rounds samples to that many significant bits (still stored as 16-bit): FLAC then detects the unused
    low bits and the file shrinks by about a third at 12 bits, at ~72 dB signal-to-quantisation-noise ratio.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in AUDIO_SUFFIXES:
        raise ValueError(f"{path}: unsupported audio format {suffix!r}; use one of {', '.join(AUDIO_SUFFIXES)}")
    if not 8 <= bits <= 16:
        raise ValueError(f"bits: must be in [8, 16], got {bits}")
    step = 2 ** (16 - bits)
    pcm = np.clip(np.round(np.asarray(waveform, dtype=np.float64) * 32767 / step) * step, -32768, 32767)
    pcm = pcm.astype(np.int16)
    soundfile = _soundfile() if suffix == ".flac" else None  # a missing package fails before any file is made
    with atomic_file(path) as tmp:
        if soundfile is None:
            with wave.open(str(tmp), "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(int(sample_rate))
                w.writeframes(pcm.tobytes())
        else:
            soundfile.write(str(tmp), pcm, int(sample_rate), format="FLAC", subtype="PCM_16")


# ---- DSP ---------------------------------------------------------------------------------------------------------


def as_mono_tensor(waveform: np.ndarray | torch.Tensor, name: str = "waveform") -> torch.Tensor:
    """Return a 1-D float tensor; ``ValueError`` for multi-channel, empty or non-finite input."""
    x = torch.as_tensor(np.asarray(waveform) if not isinstance(waveform, torch.Tensor) else waveform)
    if x.dim() != 1:
        raise ValueError(f"{name}: expected a mono waveform of shape (n,), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name}: waveform is empty")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected float samples in [-1, 1], got dtype {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: waveform contains NaN or infinite samples")
    return x


def resample(waveform: np.ndarray | torch.Tensor, from_sr: int, to_sr: int) -> np.ndarray:
    """Band-limited resampling of a mono waveform ``(n,)`` from ``from_sr`` to ``to_sr`` Hz (float32 numpy out).

    Each output sample at input time ``t = j * from_sr / to_sr`` is a Hann-windowed sinc interpolation of the input
    (zero outside it), low-passed at ``RESAMPLE_ROLLOFF`` of the lower Nyquist frequency to avoid aliasing. Output
    length is ``ceil(n * to_sr / from_sr)``. Times are kept as exact rationals, so long inputs do not drift.
    """
    for name, sr in (("from_sr", from_sr), ("to_sr", to_sr)):
        if not isinstance(sr, int) or isinstance(sr, bool) or sr <= 0:
            raise ValueError(f"{name}: sample rate must be a positive integer, got {sr!r}")
    x = as_mono_tensor(waveform).to(torch.float64)
    if from_sr == to_sr:
        return x.to(torch.float32).numpy()
    g = math.gcd(from_sr, to_sr)
    orig, new = from_sr // g, to_sr // g
    n = x.numel()
    n_out = -(-n * new // orig)  # ceil
    fc = 0.5 * min(1.0, new / orig) * RESAMPLE_ROLLOFF  # cut-off, cycles per input sample
    half_width = RESAMPLE_ZERO_CROSSINGS / (2 * fc)  # window half-width in input samples
    p = int(math.ceil(half_width)) + 1
    taps = torch.arange(-p, p + 1, dtype=torch.int64)  # (T,)
    if new * (orig + 2 * p + 1) > _RESAMPLE_MAX_KERNEL:  # unusual rate pair: gather per output sample
        out = torch.empty(n_out, dtype=torch.float64)
        for start in range(0, n_out, _RESAMPLE_CHUNK):
            j = torch.arange(start, min(start + _RESAMPLE_CHUNK, n_out), dtype=torch.int64)  # (c,)
            base = (j * orig) // new  # integer part of t_j
            frac = ((j * orig) % new).to(torch.float64) / new  # fractional part of t_j, in [0, 1)
            idx = base[:, None] + taps[None, :]  # (c, T) input sample indices
            tau = frac[:, None] - taps[None, :].to(torch.float64)  # (c, T) t_j - k, in input samples
            h = 2 * fc * torch.sinc(2 * fc * tau)
            h = h * torch.where(tau.abs() <= half_width, torch.cos(math.pi * tau / (2 * half_width)) ** 2, 0.0)
            valid = (idx >= 0) & (idx < n)
            out[start : start + j.numel()] = (x[idx.clamp(0, n - 1)] * h * valid).sum(dim=1)
        return out.to(torch.float32).numpy()
    # Output j = k + m * new (phase k) sits at input time m * orig + (k * orig) / new: one filter per phase, and
    # all outputs of a phase are a strided correlation of the input with it, so the whole resampling is one conv1d
    # with `new` output channels and stride `orig` (each phase's filter placed at its integer offset in the kernel).
    k = torch.arange(new, dtype=torch.int64)  # (new,)
    tau = ((k * orig) % new).to(torch.float64)[:, None] / new - taps[None, :].to(torch.float64)  # (new, T) t_j - k
    h = 2 * fc * torch.sinc(2 * fc * tau)
    h = h * torch.where(tau.abs() <= half_width, torch.cos(math.pi * tau / (2 * half_width)) ** 2, 0.0)
    cols = ((k * orig) // new)[:, None] + torch.arange(2 * p + 1)[None, :]  # (new, T) kernel positions
    kernel = torch.zeros(new, 1, orig + 2 * p + 1, dtype=torch.float64)
    kernel[k[:, None].expand_as(cols), 0, cols] = h
    m = -(-n_out // new)  # outputs per phase
    right = max(0, (m - 1) * orig + kernel.shape[-1] - n - p)
    padded = torch.nn.functional.pad(x, (p, right))  # zero outside the input
    out = torch.nn.functional.conv1d(padded[None, None], kernel, stride=orig)[0]  # (new, m)
    return out.t().reshape(-1)[:n_out].to(torch.float32).numpy()


def hz_to_mel(f: torch.Tensor | float) -> torch.Tensor:
    """HTK mel scale: ``2595 log10(1 + f / 700)``."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> torch.Tensor:
    """Triangular HTK mel filters of peak 1, shape ``(n_mels, n_fft // 2 + 1)`` (float32)."""
    freqs = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)  # (F,)
    edges = mel_to_hz(torch.linspace(float(hz_to_mel(f_min)), float(hz_to_mel(f_max)), n_mels + 2,
                                     dtype=torch.float64))  # (M + 2,)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (M, 1) each
    rising = (freqs[None, :] - lo) / (mid - lo)
    falling = (hi - freqs[None, :]) / (hi - mid)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).to(torch.float32)  # (M, F)


def stft(x: torch.Tensor, n_fft: int, hop_length: int, win_length: int) -> torch.Tensor:
    """Centred (zero-padded) STFT with a Hann window: ``(n,) -> (n_fft // 2 + 1, 1 + n // hop_length)`` complex."""
    window = torch.hann_window(win_length, dtype=x.dtype, device=x.device)
    return torch.stft(x, n_fft, hop_length=hop_length, win_length=win_length, window=window, center=True,
                      pad_mode="constant", return_complex=True)


def istft(spec: torch.Tensor, n_fft: int, hop_length: int, win_length: int, length: int) -> torch.Tensor:
    """Inverse of :func:`stft`: ``(F, t)`` complex -> ``(length,)`` real."""
    window = torch.hann_window(win_length, dtype=spec.real.dtype, device=spec.device)
    return torch.istft(spec, n_fft, hop_length=hop_length, win_length=win_length, window=window, center=True,
                       length=length)


def griffin_lim(magnitude: torch.Tensor, n_fft: int, hop_length: int, win_length: int, length: int, n_iter: int,
                seed: int = 0, momentum: float = 0.99) -> torch.Tensor:
    """Waveform ``(length,)`` whose STFT magnitude approximates ``magnitude`` ``(F, t)``.

    Fast Griffin-Lim (Perraudin, Balazs & Sondergaard 2013): alternate projections between consistent spectrograms and
    spectrograms of the target magnitude, with ``momentum`` on the phase estimate; random initial phase from ``seed``.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    phase = torch.rand(magnitude.shape, generator=gen, dtype=magnitude.dtype).to(magnitude.device) * (2 * math.pi)
    angles = torch.polar(torch.ones_like(magnitude), phase)  # (F, t) unit complex
    previous = torch.zeros_like(angles)
    for _ in range(n_iter):
        rebuilt = stft(istft(magnitude * angles, n_fft, hop_length, win_length, length), n_fft, hop_length,
                       win_length)[:, : magnitude.shape[1]]
        angles = rebuilt - previous * (momentum / (1 + momentum))
        angles = angles / angles.abs().clamp(min=1e-12)
        previous = rebuilt
    return istft(magnitude * angles, n_fft, hop_length, win_length, length)


def mel_to_linear(mel_power: torch.Tensor, filterbank: torch.Tensor, filterbank_pinv: torch.Tensor,
                  refine_iters: int) -> torch.Tensor:
    """Linear power ``(t, F)`` whose mel projection approximates ``mel_power`` ``(t, M)``.

    Starts from the filterbank pseudo-inverse (clamped at a tiny positive value, since power is non-negative), then
    runs ``refine_iters`` multiplicative non-negative least-squares updates (Lee & Seung 2001), which keep the result
    non-negative and remove most of the pseudo-inverse's error in low-energy bands.
    """
    linear = (mel_power @ filterbank_pinv.T).clamp(min=1e-8)  # (t, F)
    target = mel_power @ filterbank  # (t, F) = M^T y, fixed
    gram = filterbank.T @ filterbank  # (F, F)
    for _ in range(refine_iters):
        linear = linear * target / (linear @ gram + 1e-12)
    return linear
