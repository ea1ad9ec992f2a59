"""BigVGAN vocoder training recipe: 24 kHz log-mel -> waveform, GAN with MPD + MRD (BigVGAN-v2 recipe).

Model: `VocoderGAN` = the trainable generator (`BigVGAN(cfg, weight_norm=True)`, `generator.*`) and the
discriminators (`kimia.train.discriminators`, `discriminators.*`). Two phases, one AdamW each, run by the
shared `Trainer` on the same micro-batches in order:

- "disc": y_hat = G(mel) without gradient; loss = least-squares discriminator loss of MPD + MRD.
- "gen":  y_hat = G(mel); loss = mel_weight * L1(mel(y_hat), mel) + stft_weight * multi-resolution STFT
  loss (spectral convergence + L1 of log magnitudes, averaged over resolutions) + adv_weight * LS
  generator loss + fm_weight * feature matching (BigVGAN: mel 45, adversarial 1, feature matching 2x1).

`loss.adversarial: false` trains the generator on the two reconstruction terms alone (one phase, no
discriminator forward or backward: several times cheaper per step): the CPU-budget start, which a later GAN
run continues from its export (`model.generator: <export folder>`).

The mel is `kimia.detokenizer.mel` (the DiT's target, n_fft 1920 / hop 480 / 80 bins / fmax 12 kHz), so a
trained vocoder and a trained DiT agree. Examples are random segments of `segment_frames` mel frames
(x 480 samples) cut from 24 kHz audio in jsonl manifests (`audio_key`, default `target_audio_path`: the
corpus' spoken answers in the one output voice), or seeded synthetic harmonic signals (`data.synthetic`).
Segment offsets come from torch's default generator, which the Trainer seeds per rank and checkpoints,
so a resumed run cuts the same segments. Export folds weight norm and writes `save_vocoder`'s native
folder (config.json + model.safetensors) that `kimia.detokenizer.bigvgan.load_vocoder` reads.

Manifests are read with `kimia.train.data.read_audio_manifest`, as in the DiT and VQ recipes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kimia import audio as kaudio
from kimia.checkpoints.common import load_state_dict_strict
from kimia.detokenizer.bigvgan import BigVGAN, BigVGANConfig, fold_weight_norm_state_dict, load_vocoder, save_vocoder
from kimia.detokenizer.mel import DEFAULT as MEL, MelConfig, linear_magnitude, mel_spectrogram
from kimia.errors import ConfigError
from kimia.train.common import LossOutput, Recipe
from kimia.train.config import OptimConfig, TrainConfig, to_dict
from kimia.train.data import read_audio_manifest
from kimia.train.discriminators import (DiscriminatorConfig, Discriminators, discriminator_loss,
                                        feature_matching_loss, generator_adv_loss)

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ config
@dataclass
class VocoderModelSpec:
    generator: str = "tiny"  # BigVGANConfig preset name, or a vocoder folder to continue from
    overrides: dict[str, Any] = field(default_factory=dict)  # BigVGANConfig overrides (presets only)
    discriminators: str = "tiny"  # DiscriminatorConfig preset
    disc_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class VocoderDataSpec:
    manifests: list[str] = field(default_factory=list)
    audio_key: str = "target_audio_path"  # field holding the (24 kHz) audio path
    synthetic: int = 0  # > 0: this many seeded synthetic clips instead of manifests
    segment_frames: int = 32  # mel frames per training segment (x 480 samples)


@dataclass
class VocoderLossSpec:
    adversarial: bool = True  # False: no discriminators at all (mel + STFT reconstruction only, one phase)
    mel_weight: float = 45.0
    stft_weight: float = 1.0
    adv_weight: float = 1.0
    fm_weight: float = 1.0
    stft_resolutions: list[list[int]] = field(default_factory=lambda: [[512, 120, 480], [1024, 240, 960],
                                                                       [2048, 480, 1920]])


@dataclass
class VocoderTrainConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, betas=[0.8, 0.99], weight_decay=0.0))
    model: VocoderModelSpec = field(default_factory=VocoderModelSpec)
    data: VocoderDataSpec = field(default_factory=VocoderDataSpec)
    loss: VocoderLossSpec = field(default_factory=VocoderLossSpec)
    export_dir: str | None = None  # default: <out_dir>/export


# ------------------------------------------------------------------------------------------ losses
def multi_resolution_stft_loss(y_hat: torch.Tensor, y: torch.Tensor, resolutions: Sequence[Sequence[int]]
                               ) -> torch.Tensor:
    """Mean over (n_fft, hop, win) of ||S - S_hat||_F / ||S||_F + mean|log S - log S_hat| ([B, S] waveforms)."""
    total = y.new_zeros((), dtype=torch.float32)
    for n_fft, hop, win in resolutions:
        cfg = MelConfig(n_fft=int(n_fft), hop_size=int(hop), win_size=int(win))
        s, s_hat = linear_magnitude(y, cfg), linear_magnitude(y_hat, cfg)
        sc = torch.linalg.norm(s - s_hat) / torch.linalg.norm(s).clamp_min(1e-7)
        total = total + sc + F.l1_loss(torch.log(s_hat.clamp_min(1e-5)), torch.log(s.clamp_min(1e-5)))
    return total / max(1, len(resolutions))


# ------------------------------------------------------------------------------------------ model
class VocoderGAN(nn.Module):
    """Generator + discriminators; `forward(mel, wav, phase)` returns that phase's losses."""

    def __init__(self, gen_cfg: BigVGANConfig, disc_cfg: DiscriminatorConfig, loss: VocoderLossSpec):
        super().__init__()
        if gen_cfg.num_mels != MEL.num_mels or gen_cfg.hop_size != MEL.hop_size:
            raise ConfigError(f"vocoder must take the {MEL.num_mels}-bin hop-{MEL.hop_size} mel of "
                              f"kimia.detokenizer.mel, got num_mels {gen_cfg.num_mels}, hop {gen_cfg.hop_size}")
        if math.prod(gen_cfg.upsample_rates) != gen_cfg.hop_size:
            raise ConfigError(f"vocoder upsample_rates {gen_cfg.upsample_rates} do not multiply to hop "
                              f"{gen_cfg.hop_size}")
        self.generator = BigVGAN(gen_cfg, weight_norm=True)
        self.discriminators = Discriminators(disc_cfg)
        self.loss_cfg = loss

    def forward(self, mel: torch.Tensor, wav: torch.Tensor, phase: str) -> dict[str, torch.Tensor]:
        """mel [B, 80, T], wav [B, T * 480] -> {"loss": scalar, <parts>}."""
        y = wav[:, None]
        if phase == "disc":
            with torch.no_grad():
                y_hat = self.generator(mel)
            real, fake, _, _ = self.discriminators(y, y_hat.detach())
            return {"loss": discriminator_loss(real, fake)}
        if phase != "gen":
            raise ConfigError(f"vocoder recipe has phases 'disc' and 'gen', not {phase!r}")
        c = self.loss_cfg
        y_hat = self.generator(mel)
        mel_l1 = F.l1_loss(mel_spectrogram(y_hat[:, 0]), mel.float())
        stft = multi_resolution_stft_loss(y_hat[:, 0], wav, c.stft_resolutions)
        if not c.adversarial:
            return {"loss": c.mel_weight * mel_l1 + c.stft_weight * stft, "mel_l1": mel_l1, "stft": stft}
        _, fake, f_real, f_fake = self.discriminators(y, y_hat)
        adv, fm = generator_adv_loss(fake), feature_matching_loss(f_real, f_fake)
        loss = c.mel_weight * mel_l1 + c.stft_weight * stft + c.adv_weight * adv + c.fm_weight * fm
        return {"loss": loss, "mel_l1": mel_l1, "stft": stft, "adv": adv, "fm": fm}


# ------------------------------------------------------------------------------------------ data
class SyntheticVoiced(Sequence):
    """Seeded 24 kHz harmonic clips (glide of f0 with a few partials and an envelope), about 1 s each."""

    def __init__(self, n: int, seed: int = 0, seconds: float = 1.0):
        self.n, self.seed, self.samples = n, seed, int(seconds * MEL.sample_rate)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n:
            raise IndexError(i)
        g = torch.Generator().manual_seed(self.seed * 7919 + i)
        t = torch.arange(self.samples) / MEL.sample_rate
        f0 = 100 + 200 * torch.rand((), generator=g) + 60 * torch.rand((), generator=g) * t
        phase = 2 * math.pi * torch.cumsum(f0 / MEL.sample_rate * torch.ones_like(t), 0)
        amps = torch.rand(4, generator=g)
        x = sum(amps[k] / (k + 1) * torch.sin((k + 1) * phase) for k in range(4))
        env = 0.5 + 0.5 * torch.sin(2 * math.pi * (1 + 3 * torch.rand((), generator=g)) * t)
        x = x * env + 0.01 * torch.randn(self.samples, generator=g)
        return (0.5 * x / x.abs().max()).float()


class ManifestAudio(Sequence):
    """24 kHz waveforms of manifest records (read on access)."""

    def __init__(self, records: list[dict[str, Any]], key: str, sample_rate: int = MEL.sample_rate):
        self.paths = [r[key] for r in records]
        self.sr = sample_rate

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return kaudio.load_audio(self.paths[i], target_sr=self.sr)


def random_segment(wav: torch.Tensor, samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random window of `samples` samples (zero-padded when the clip is shorter)."""
    if wav.shape[0] <= samples:
        return F.pad(wav, (0, samples - wav.shape[0]))
    start = int(torch.randint(0, wav.shape[0] - samples + 1, (), generator=generator))
    return wav[start : start + samples]


@dataclass
class VocoderBatch:
    mel: torch.Tensor  # [B, 80, T]
    wav: torch.Tensor  # [B, T * 480]


# ------------------------------------------------------------------------------------------ recipe
def _gen_config(spec: VocoderModelSpec) -> tuple[BigVGANConfig, Path | None]:
    p = Path(spec.generator)
    if (p / "config.json").is_file():
        if spec.overrides:
            raise ConfigError("model.overrides only apply to presets (a folder's architecture is fixed)")
        return BigVGANConfig.from_json(p / "config.json"), p
    cfg = BigVGANConfig.from_name(spec.generator).to_dict()
    cfg.update(spec.overrides)
    return BigVGANConfig.from_dict(cfg), None


class VocoderRecipe(Recipe):
    name = "vocoder"
    phases = ("disc", "gen")
    ddp_kwargs = {"find_unused_parameters": True}  # the generator sits out the "disc" backward

    def __init__(self, cfg: VocoderTrainConfig, dataset: Sequence | None = None):
        self.cfg = cfg
        self.gen_cfg, self.init_folder = _gen_config(cfg.model)
        d = DiscriminatorConfig.from_name(cfg.model.discriminators).to_dict()
        d.update(cfg.model.disc_overrides)
        self.disc_cfg = DiscriminatorConfig(**d)
        self._dataset = dataset
        if not cfg.loss.adversarial:  # reconstruction-only training: the generator's phase alone
            self.phases = ("gen",)
        if cfg.data.segment_frames < 2:
            raise ConfigError("data.segment_frames must be >= 2")

    def build_model(self, device: torch.device) -> nn.Module:
        model = VocoderGAN(self.gen_cfg, self.disc_cfg, self.cfg.loss)
        if self.init_folder is not None:
            plain = load_vocoder(self.init_folder, dtype=torch.float32)  # fp32 master weights (folders may be fp16)
            for conv in plain.weighted_convs():  # re-parametrise: g, v computed from the loaded weights
                nn.utils.parametrizations.weight_norm(conv, dim=0)
            plain.requires_grad_(True)
            model.generator = plain.train()
        n_g = sum(p.numel() for p in model.generator.parameters())
        n_d = sum(p.numel() for p in model.discriminators.parameters())
        logger.info("vocoder: generator %.2f M, discriminators %.2f M parameters", n_g / 1e6, n_d / 1e6)
        return model.to(device)

    def phase_parameters(self, model: nn.Module, phase: str) -> list[tuple[str, nn.Parameter]]:
        prefix = {"disc": "discriminators.", "gen": "generator."}[phase]
        return [(n, p) for n, p in model.named_parameters() if n.startswith(prefix) and p.requires_grad]

    def fsdp_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.generator, *model.discriminators.mpd.discriminators, *model.discriminators.mrd.discriminators]

    def dataset(self) -> Sequence:
        if self._dataset is None:
            d = self.cfg.data
            if d.synthetic > 0:
                self._dataset = SyntheticVoiced(d.synthetic, seed=self.cfg.train.seed)
            elif d.manifests:
                self._dataset = ManifestAudio(read_audio_manifest(d.manifests, [d.audio_key]), d.audio_key)
            else:
                raise ConfigError("data.manifests is empty and data.synthetic is 0: nothing to train on")
        return self._dataset

    def collate(self, items: list[torch.Tensor]) -> VocoderBatch:
        n = self.cfg.data.segment_frames * MEL.hop_size
        wav = torch.stack([random_segment(w, n) for w in items])
        return VocoderBatch(mel=mel_spectrogram(wav), wav=wav)

    def loss(self, model: nn.Module, batch: VocoderBatch, phase: str) -> LossOutput:
        out = model(batch.mel, batch.wav, phase)
        metrics = {k: float(v.detach()) for k, v in out.items() if k != "loss"}
        return LossOutput(out["loss"], tokens=batch.mel.shape[0] * batch.mel.shape[2], metrics=metrics)

    def export(self, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
        sd = {k[len("generator."):]: v for k, v in state_dict.items() if k.startswith("generator.")}
        with torch.device("meta"):
            gen = BigVGAN(self.gen_cfg)
        load_state_dict_strict(gen, fold_weight_norm_state_dict(sd), source="trained vocoder state", assign=True)
        save_vocoder(gen, folder)
        logger.info("exported vocoder to %s", folder)

    def config_dict(self) -> dict[str, Any]:
        return to_dict(self.cfg)


def train_vocoder(cfg: VocoderTrainConfig, dataset: Sequence | None = None, env=None):
    """Build the recipe and trainer, train, export when the run is complete; returns (trainer, history)."""
    from kimia.train.common import run_recipe

    return run_recipe(VocoderRecipe(cfg, dataset), cfg, env)


__all__ = ["VocoderTrainConfig", "VocoderModelSpec", "VocoderDataSpec", "VocoderLossSpec", "VocoderGAN",
           "VocoderRecipe", "VocoderBatch", "SyntheticVoiced", "ManifestAudio",
           "random_segment", "multi_resolution_stft_loss", "train_vocoder"]
