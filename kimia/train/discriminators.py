"""BigVGAN-v2 discriminators and GAN losses for training the vocoder (`kimia.train.vocoder`).

- Multi-period discriminator (MPD, HiFi-GAN): for each period p the waveform [B, 1, S] is reflect-padded
  to a multiple of p and folded to [B, 1, S/p, p]; five (5, 1) convs with stride (3, 1) except the last
  (channels 32, 128, 512, 1024, 1024 times `channel_mult`) and a (3, 1) output conv see every p-th sample.
- Multi-resolution discriminator (MRD, UnivNet / BigVGAN-v2): for each (n_fft, hop, win) the STFT magnitude
  (reflect pad (n_fft - hop) / 2, center=False, rectangular window like the reference) [B, F, T] is read as an image by a (3, 9) conv, three
  (3, 9) convs with stride (1, 2), a (3, 3) conv (32 x `mrd_channel_mult` channels) and a (3, 3) output.
Every conv is weight-normalised (torch's parametrization), leaky ReLU 0.1 between layers; each
discriminator returns its flattened score map and the list of feature maps (for feature matching).
Parameter names equal those of the `bigvgan` package's discriminators (test oracle; weight norm folded).

Losses (least squares, as BigVGAN): discriminator sum_d mean((1 - D(y))^2) + mean(D(G(x))^2); generator
sum_d mean((1 - D(G(x)))^2); feature matching 2 * sum_{d,l} mean|f_l(y) - f_l(G(x))|.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kimia.errors import ConfigError

LRELU_SLOPE = 0.1
Scores = list[torch.Tensor]
FeatureMaps = list[list[torch.Tensor]]


@dataclass
class DiscriminatorConfig:
    mpd_periods: list[int] = field(default_factory=lambda: [2, 3, 5, 7, 11])
    mrd_resolutions: list[list[int]] = field(default_factory=lambda: [[1024, 120, 600], [2048, 240, 1200],
                                                                      [512, 50, 240]])
    channel_mult: float = 1.0  # MPD widths 32/128/512/1024 x this
    mrd_channel_mult: float = 1.0  # MRD width 32 x this
    weight_norm: bool = True

    def __post_init__(self) -> None:
        if not self.mpd_periods and not self.mrd_resolutions:
            raise ConfigError("discriminators: need at least one MPD period or MRD resolution")
        for r in self.mrd_resolutions:
            if len(r) != 3 or min(r) <= 0 or r[2] > r[0]:
                raise ConfigError(f"discriminators: MRD resolution {r} must be [n_fft, hop, win] with win <= n_fft")
        if any(p < 1 for p in self.mpd_periods) or self.channel_mult <= 0 or self.mrd_channel_mult <= 0:
            raise ConfigError("discriminators: periods and channel multipliers must be positive")

    @classmethod
    def from_name(cls, name: str) -> "DiscriminatorConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown discriminator preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(mpd_periods=[2, 3], mrd_resolutions=[[256, 60, 240], [512, 120, 480], [128, 30, 120]],
                 channel_mult=0.0625, mrd_channel_mult=0.125),
    "small": dict(channel_mult=0.25, mrd_channel_mult=0.5),
    "bigvgan-v2": dict(),
}


def _norm(conv: nn.Module, on: bool) -> nn.Module:
    return nn.utils.parametrizations.weight_norm(conv) if on else conv


class PeriodDiscriminator(nn.Module):
    def __init__(self, period: int, mult: float, weight_norm: bool = True, kernel: int = 5, stride: int = 3):
        super().__init__()
        self.period = period
        ch = [1] + [int(c * mult) for c in (32, 128, 512, 1024, 1024)]
        self.convs = nn.ModuleList(
            _norm(nn.Conv2d(ch[i], ch[i + 1], (kernel, 1), (stride if i < 4 else 1, 1),
                            padding=((kernel - 1) // 2, 0)), weight_norm) for i in range(5))
        self.conv_post = _norm(nn.Conv2d(ch[-1], 1, (3, 1), 1, padding=(1, 0)), weight_norm)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x [B, 1, S] -> (scores [B, N], feature maps)."""
        b, c, t = x.shape
        if t % self.period:
            x = F.pad(x, (0, self.period - t % self.period), mode="reflect")
        x = x.view(b, c, -1, self.period)
        fmap = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), LRELU_SLOPE)
            fmap.append(x)
        x = self.conv_post(x)
        fmap.append(x)
        return x.flatten(1), fmap


class ResolutionDiscriminator(nn.Module):
    def __init__(self, resolution: list[int], mult: float, weight_norm: bool = True):
        super().__init__()
        self.n_fft, self.hop, self.win = (int(v) for v in resolution)
        c = int(32 * mult)
        self.convs = nn.ModuleList([
            _norm(nn.Conv2d(1, c, (3, 9), padding=(1, 4)), weight_norm),
            *(_norm(nn.Conv2d(c, c, (3, 9), stride=(1, 2), padding=(1, 4)), weight_norm) for _ in range(3)),
            _norm(nn.Conv2d(c, c, (3, 3), padding=(1, 1)), weight_norm),
        ])
        self.conv_post = _norm(nn.Conv2d(c, 1, (3, 3), padding=(1, 1)), weight_norm)

    def spectrogram(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 1, S] -> STFT magnitude [B, n_fft/2 + 1, frames] (fp32; rectangular window, as BigVGAN-v2)."""
        pad = (self.n_fft - self.hop) // 2
        x = F.pad(x.float(), (pad, pad), mode="reflect")[:, 0]
        window = torch.ones(self.win, device=x.device)
        spec = torch.stft(x, self.n_fft, self.hop, self.win, window=window, center=False, return_complex=True)
        return spec.abs()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x [B, 1, S] -> (scores [B, N], feature maps)."""
        h = self.spectrogram(x).unsqueeze(1).to(self.conv_post.weight.dtype)
        fmap = []
        for conv in self.convs:
            h = F.leaky_relu(conv(h), LRELU_SLOPE)
            fmap.append(h)
        h = self.conv_post(h)
        fmap.append(h)
        return h.flatten(1), fmap


class _Multi(nn.Module):
    discriminators: nn.ModuleList

    def forward(self, y: torch.Tensor, y_hat: torch.Tensor) -> tuple[Scores, Scores, FeatureMaps, FeatureMaps]:
        """Real y and generated y_hat [B, 1, S] -> (real scores, fake scores, real fmaps, fake fmaps)."""
        real, fake, f_real, f_fake = [], [], [], []
        for d in self.discriminators:
            s, f = d(y)
            real.append(s)
            f_real.append(f)
            s, f = d(y_hat)
            fake.append(s)
            f_fake.append(f)
        return real, fake, f_real, f_fake


class MultiPeriodDiscriminator(_Multi):
    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        self.discriminators = nn.ModuleList(PeriodDiscriminator(p, cfg.channel_mult, cfg.weight_norm)
                                            for p in cfg.mpd_periods)


class MultiResolutionDiscriminator(_Multi):
    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        self.discriminators = nn.ModuleList(ResolutionDiscriminator(r, cfg.mrd_channel_mult, cfg.weight_norm)
                                            for r in cfg.mrd_resolutions)


class Discriminators(nn.Module):
    """MPD + MRD as one module (`mpd.*`, `mrd.*`)."""

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        self.cfg = cfg
        self.mpd = MultiPeriodDiscriminator(cfg)
        self.mrd = MultiResolutionDiscriminator(cfg)

    def forward(self, y: torch.Tensor, y_hat: torch.Tensor) -> tuple[Scores, Scores, FeatureMaps, FeatureMaps]:
        """Concatenated (real scores, fake scores, real fmaps, fake fmaps) of every sub-discriminator."""
        out = [list(a) + list(b) for a, b in zip(self.mpd(y, y_hat), self.mrd(y, y_hat))]
        return out[0], out[1], out[2], out[3]


# ------------------------------------------------------------------------------------------ losses
def discriminator_loss(real: Scores, fake: Scores) -> torch.Tensor:
    """Least-squares: sum_d mean((1 - D(y))^2) + mean(D(G(x))^2)."""
    return sum(torch.mean((1 - r.float()) ** 2) + torch.mean(f.float() ** 2) for r, f in zip(real, fake))


def generator_adv_loss(fake: Scores) -> torch.Tensor:
    """Least-squares: sum_d mean((1 - D(G(x)))^2)."""
    return sum(torch.mean((1 - f.float()) ** 2) for f in fake)


def feature_matching_loss(f_real: FeatureMaps, f_fake: FeatureMaps) -> torch.Tensor:
    """2 * sum over discriminators and layers of mean |f(y) - f(G(x))| (real maps are constants)."""
    return 2 * sum(torch.mean(torch.abs(r.detach().float() - g.float()))
                   for dr, dg in zip(f_real, f_fake) for r, g in zip(dr, dg))


__all__ = ["DiscriminatorConfig", "PeriodDiscriminator", "ResolutionDiscriminator", "MultiPeriodDiscriminator",
           "MultiResolutionDiscriminator", "Discriminators", "discriminator_loss", "generator_adv_loss",
           "feature_matching_loss"]
