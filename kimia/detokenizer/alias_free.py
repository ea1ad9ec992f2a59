"""Periodic activations with anti-aliasing, as used by the BigVGAN-v2 vocoder.

A pointwise non-linearity applied to a sampled signal creates harmonics above Nyquist that fold back as
aliasing. BigVGAN avoids that by running the activation at twice the sample rate: upsample x2 (zero-stuff
+ kaiser-windowed sinc low-pass), apply Snake/SnakeBeta, low-pass again and keep every second sample.

The module tree and buffer names mirror the release checkpoints (`act.alpha`, `act.beta`,
`upsample.filter`, `downsample.lowpass.filter`) so a state dict loads strictly without renaming. The filter
buffers are persistent: loaders take them from the checkpoint, a fresh module computes them itself.

Everything here is plain torch (no fused kernel), so it runs on any device and dtype.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from kimia.errors import ConfigError

# Guards 1/beta (and 1/alpha for Snake) against division by an exact zero.
SNAKE_EPS = 1e-9
# Anti-aliasing design of BigVGAN-v2: ratio 2 both ways, 12-tap filters.
AA_RATIO = 2
AA_KERNEL = 12


def kaiser_sinc_lowpass(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    """Kaiser-windowed sinc low-pass FIR, normalised to unit DC gain.

    `cutoff` and `half_width` are in cycles per sample (Nyquist = 0.5). The Kaiser beta follows the
    classic attenuation rule A = 2.285 (N/2 - 1) pi (4 half_width) + 7.95 dB. An even kernel is centred
    between two taps (time offsets +-0.5, +-1.5, ...). Returns [1, 1, kernel_size] float32 on the
    default device (meta inside `torch.device("meta")`).
    """
    if not 0.0 <= cutoff <= 0.5:
        raise ConfigError(f"low-pass cutoff must be in [0, 0.5] cycles/sample, got {cutoff}")
    # Designed once on the CPU: cheap, and it keeps meta builds from tracing kaiser_window's decomposition.
    return _kaiser_sinc_cpu(float(cutoff), float(half_width), int(kernel_size)).to(torch.get_default_device(), copy=True)


@functools.lru_cache(maxsize=16)
def _kaiser_sinc_cpu(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    half = kernel_size // 2
    atten = 2.285 * (half - 1) * math.pi * (4.0 * half_width) + 7.95
    if atten > 50.0:
        beta = 0.1102 * (atten - 8.7)
    elif atten >= 21.0:
        beta = 0.5842 * (atten - 21.0) ** 0.4 + 0.07886 * (atten - 21.0)
    else:
        beta = 0.0
    cpu = torch.device("cpu")
    window = torch.kaiser_window(kernel_size, periodic=False, beta=beta, dtype=torch.float64, device=cpu)
    if kernel_size % 2 == 0:
        t = torch.arange(-half, half, dtype=torch.float64, device=cpu) + 0.5
    else:
        t = torch.arange(kernel_size, dtype=torch.float64, device=cpu) - half
    if cutoff == 0.0:
        taps = torch.zeros_like(t)
    else:
        taps = 2.0 * cutoff * window * torch.sinc(2.0 * cutoff * t)
        taps = taps / taps.sum()
    return taps.to(torch.float32).view(1, 1, kernel_size)


def _depthwise(x: torch.Tensor, taps: torch.Tensor, *, stride: int, transposed: bool) -> torch.Tensor:
    """Apply the same FIR to every channel as a grouped (depthwise) conv; [B, C, T] in and out."""
    c = x.shape[1]
    weight = taps.to(dtype=x.dtype).expand(c, 1, taps.shape[-1])
    if transposed:
        return F.conv_transpose1d(x, weight, stride=stride, groups=c)
    return F.conv1d(x, weight, stride=stride, groups=c)


class Upsample1d(nn.Module):
    """x`ratio` band-limited upsampling: replicate-pad, zero-stuff + low-pass (transposed conv), crop.

    [B, C, T] -> [B, C, ratio*T].
    """

    def __init__(self, ratio: int = AA_RATIO, kernel_size: int = AA_KERNEL):
        super().__init__()
        self.ratio = ratio
        self.kernel_size = kernel_size
        # Context taken from each edge (in input samples) and the output samples it produces that we drop.
        self.pad = kernel_size // ratio - 1
        self.crop_left = self.pad * ratio + (kernel_size - ratio) // 2
        self.crop_right = self.pad * ratio + (kernel_size - ratio + 1) // 2
        self.register_buffer("filter", kaiser_sinc_lowpass(0.5 / ratio, 0.6 / ratio, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.pad, self.pad), mode="replicate")
        # Zero-stuffing divides the signal energy by `ratio`; the gain restores it.
        y = self.ratio * _depthwise(x, self.filter, stride=self.ratio, transposed=True)
        return y[..., self.crop_left : y.shape[-1] - self.crop_right]


class LowPass1d(nn.Module):
    """Strided FIR low-pass with replicate padding: [B, C, T] -> [B, C, ceil(T/stride)]."""

    def __init__(self, cutoff: float, half_width: float, stride: int, kernel_size: int):
        super().__init__()
        self.stride = stride
        even = kernel_size % 2 == 0
        self.pad_left = kernel_size // 2 - int(even)
        self.pad_right = kernel_size // 2
        self.register_buffer("filter", kaiser_sinc_lowpass(cutoff, half_width, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.pad_left, self.pad_right), mode="replicate")
        return _depthwise(x, self.filter, stride=self.stride, transposed=False)


class Downsample1d(nn.Module):
    """/`ratio` decimation: anti-alias low-pass then keep every `ratio`-th sample."""

    def __init__(self, ratio: int = AA_RATIO, kernel_size: int = AA_KERNEL):
        super().__init__()
        self.lowpass = LowPass1d(0.5 / ratio, 0.6 / ratio, ratio, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowpass(x)


class Snake(nn.Module):
    """Snake: x + sin^2(a x) / a, one frequency `a` per channel (stored as log a when `logscale`)."""

    def __init__(self, channels: int, logscale: bool = True):
        super().__init__()
        self.logscale = logscale
        init = torch.zeros(channels) if logscale else torch.ones(channels)
        self.alpha = nn.Parameter(init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, T] -> [B, C, T]."""
        a = self.alpha[None, :, None]
        if self.logscale:
            a = a.exp()
        return x + torch.sin(x * a).pow(2) / (a + SNAKE_EPS)


class SnakeBeta(nn.Module):
    """SnakeBeta: x + sin^2(a x) / b, with separate per-channel frequency `a` and magnitude `b`."""

    def __init__(self, channels: int, logscale: bool = True):
        super().__init__()
        self.logscale = logscale
        init = torch.zeros(channels) if logscale else torch.ones(channels)
        self.alpha = nn.Parameter(init.clone())
        self.beta = nn.Parameter(init.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, T] -> [B, C, T]."""
        a = self.alpha[None, :, None]
        b = self.beta[None, :, None]
        if self.logscale:
            a, b = a.exp(), b.exp()
        return x + torch.sin(x * a).pow(2) / (b + SNAKE_EPS)


def make_snake(kind: str, channels: int, logscale: bool) -> nn.Module:
    if kind == "snake":
        return Snake(channels, logscale)
    if kind == "snakebeta":
        return SnakeBeta(channels, logscale)
    raise ConfigError(f"unknown vocoder activation {kind!r} (expected 'snake' or 'snakebeta')")


class AntiAliasedActivation(nn.Module):
    """Activation evaluated at twice the rate: upsample x2 -> act -> downsample x2. [B,C,T] -> [B,C,T]."""

    def __init__(self, act: nn.Module, ratio: int = AA_RATIO, kernel_size: int = AA_KERNEL):
        super().__init__()
        self.act = act
        self.upsample = Upsample1d(ratio, kernel_size)
        self.downsample = Downsample1d(ratio, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.act(self.upsample(x)))
