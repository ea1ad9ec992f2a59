"""The 24 kHz, 80-bin log-mel shared by the flow-matching DiT (its target) and the BigVGAN vocoder (its input).

The release never documents its mel front end (KIMI_AUDIO.md §6.4: n_fft, win, fmin, fmax unknown; only
80 bins, 24 kHz and hop 480 = 50 Hz are fixed by the DiT and the vocoder). Training our own DiT + vocoder
only needs the two to agree, so kimia fixes it here, in the BigVGAN(-v2) convention:

    hop 480 (50 Hz), n_fft = win = 1920 (4 x hop, like BigVGAN-v2's 24 kHz configs: n_fft 1024 / hop 256),
    periodic Hann window, reflect pad (n_fft - hop) / 2 on both sides, `center=False` (so a waveform of
    T * 480 samples gives exactly T frames and the vocoder maps them back to T * 480 samples),
    magnitude sqrt(re^2 + im^2 + 1e-9), Slaney-scale Slaney-normalised filters over [fmin 0, fmax 12000]
    (= librosa.filters.mel defaults), natural log of max(mel, 1e-5).

Values lie in about [-11.5, 2]. `MelConfig` makes the other resolutions the vocoder's multi-scale mel loss
uses. `mel_spectrogram` is differentiable (the vocoder's mel loss runs through it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kimia.errors import AudioError, ConfigError

SAMPLE_RATE = 24000
HOP_SIZE = 480
NUM_MELS = 80


@dataclass(frozen=True)
class MelConfig:
    """One STFT + mel filterbank resolution (defaults: the DiT/vocoder mel)."""

    sample_rate: int = SAMPLE_RATE
    n_fft: int = 1920
    win_size: int = 1920
    hop_size: int = HOP_SIZE
    num_mels: int = NUM_MELS
    fmin: float = 0.0
    fmax: float | None = 12000.0  # None: sample_rate / 2
    clamp: float = 1e-5

    def __post_init__(self) -> None:
        if min(self.sample_rate, self.n_fft, self.win_size, self.hop_size, self.num_mels) <= 0:
            raise ConfigError(f"mel config needs positive sizes, got {self}")
        if self.win_size > self.n_fft:
            raise ConfigError(f"mel win_size {self.win_size} exceeds n_fft {self.n_fft}")
        top = self.sample_rate / 2 if self.fmax is None else self.fmax
        if not 0 <= self.fmin < top <= self.sample_rate / 2:
            raise ConfigError(f"mel band [{self.fmin}, {top}] must lie in [0, {self.sample_rate / 2}]")

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT = MelConfig()


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale (linear below 1 kHz, logarithmic above)."""
    f = np.asarray(f, dtype=np.float64)
    step = math.log(6.4) / 27.0
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / step, f * 3.0 / 200.0)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    step = math.log(6.4) / 27.0
    return np.where(m >= 15.0, 1000.0 * np.exp(step * (m - 15.0)), m * 200.0 / 3.0)


_FILTERS: dict[tuple, torch.Tensor] = {}
_WINDOWS: dict[tuple, torch.Tensor] = {}


def mel_filterbank(cfg: MelConfig = DEFAULT, device=None) -> torch.Tensor:
    """Triangular Slaney filters [num_mels, n_fft // 2 + 1] (float32) with unit area in Hz per band."""
    key = (cfg.sample_rate, cfg.n_fft, cfg.num_mels, cfg.fmin, cfg.fmax, str(device))
    if key not in _FILTERS:
        fmax = cfg.sample_rate / 2 if cfg.fmax is None else cfg.fmax
        freqs = np.linspace(0.0, cfg.sample_rate / 2, cfg.n_fft // 2 + 1)
        edges = _mel_to_hz(np.linspace(_hz_to_mel(cfg.fmin), _hz_to_mel(fmax), cfg.num_mels + 2))
        widths = np.diff(edges)
        ramps = edges[:, None] - freqs[None, :]
        up = -ramps[:-2] / widths[:-1, None]
        down = ramps[2:] / widths[1:, None]
        w = np.maximum(0.0, np.minimum(up, down)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]
        with torch.inference_mode(False):  # cached for every later caller, training ones included
            _FILTERS[key] = torch.from_numpy(w.astype(np.float32)).to(device)
    return _FILTERS[key]


def _window(cfg: MelConfig, device) -> torch.Tensor:
    key = (cfg.win_size, str(device))
    if key not in _WINDOWS:
        with torch.inference_mode(False):  # an inference tensor in the cache would break a later backward
            _WINDOWS[key] = torch.hann_window(cfg.win_size, device=device)
    return _WINDOWS[key]


def linear_magnitude(wav: torch.Tensor, cfg: MelConfig = DEFAULT) -> torch.Tensor:
    """[B, S] -> STFT magnitude [B, n_fft // 2 + 1, S // hop] (reflect pad, center=False), fp32."""
    pad = (cfg.n_fft - cfg.hop_size) // 2
    if wav.shape[-1] <= pad:
        raise AudioError("<array>", f"{wav.shape[-1]} samples are too few for a mel with n_fft {cfg.n_fft}")
    x = F.pad(wav.float()[:, None], (pad, pad), mode="reflect")[:, 0]
    spec = torch.stft(x, cfg.n_fft, cfg.hop_size, cfg.win_size, window=_window(cfg, x.device), center=False,
                      return_complex=True)
    return torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)


def mel_spectrogram(wav: torch.Tensor, cfg: MelConfig = DEFAULT) -> torch.Tensor:
    """24 kHz waveform [S] or [B, S] (or [B, 1, S]) -> log-mel [B, num_mels, S // hop] in fp32.

    Differentiable. With the default config a waveform of T * 480 samples gives T frames.
    """
    if wav.dim() == 3 and wav.shape[1] == 1:
        wav = wav[:, 0]
    if wav.dim() == 1:
        wav = wav[None]
    if wav.dim() != 2:
        raise AudioError("<array>", f"mel input must be [S], [B, S] or [B, 1, S], got {tuple(wav.shape)}")
    mag = linear_magnitude(wav, cfg)
    mel = mel_filterbank(cfg, mag.device) @ mag
    return torch.log(torch.clamp(mel, min=cfg.clamp))


def mel_frames(wav: torch.Tensor, cfg: MelConfig = DEFAULT) -> torch.Tensor:
    """1-D 24 kHz waveform -> frame-major log-mel [T, num_mels] (the DiT's layout)."""
    if wav.dim() != 1:
        raise AudioError("<array>", f"mel_frames expects a 1-D waveform, got {tuple(wav.shape)}")
    return mel_spectrogram(wav, cfg)[0].t().contiguous()


__all__ = ["MelConfig", "DEFAULT", "SAMPLE_RATE", "HOP_SIZE", "NUM_MELS", "mel_filterbank", "linear_magnitude",
           "mel_spectrogram", "mel_frames"]
