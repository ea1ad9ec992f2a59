"""BigVGAN-v2 generator: 80-bin log-mel [B, 80, T] -> waveform [B, 1, T * hop] (Kimi-Audio's vocoder).

Structure (NVIDIA BigVGAN v2, the code Kimi-Audio ships): conv_pre (k7) -> for each upsampling stage a
transposed conv that halves the channels, then the mean of one AMP residual block per resblock kernel size
-> anti-aliased Snake/SnakeBeta -> conv_post (k7, 1 channel) -> tanh or clamp to [-1, 1].

The release stores every conv under legacy weight norm (`weight_g`, `weight_v`). Inference never needs the
reparametrisation, so the inference module holds plain convs and the loader folds `w = g * v / ||v||`
(norm over every axis but the first: torch's `weight_norm` default dim=0, for Conv1d and ConvTranspose1d
alike). `BigVGAN(cfg, weight_norm=True)` builds a trainable variant with torch's parametrized weight norm;
`fold_weight_norm` turns it back into the plain module. The loaders live at the end of this file:
`load_vocoder` (official `config.json` + `model.pt`, or native `config.json` + `model.safetensors`) and
`save_vocoder` (native).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from kimia.checkpoints.common import build_frozen, load_safetensors
from kimia.detokenizer.alias_free import AntiAliasedActivation, make_snake
from kimia.errors import AudioError, CheckpointError, ConfigError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
OFFICIAL_WEIGHTS = "model.pt"
NATIVE_WEIGHTS = "model.safetensors"


# --------------------------------------------------------------------------------------------- config
@dataclass
class BigVGANConfig:
    """Synthesis hyper-parameters of a BigVGAN-v2 generator (field names = the release's config.json).

    Keys of a config.json that synthesis does not need (training, mel front end) are kept in `extra` so a
    saved config round-trips. Missing `use_tanh_at_final` / `use_bias_at_final` default to True, as in the
    original code (older checkpoints predate these switches).
    """

    num_mels: int = 80
    upsample_rates: list[int] = field(default_factory=lambda: [8, 6, 10])
    upsample_kernel_sizes: list[int] = field(default_factory=lambda: [16, 12, 20])
    upsample_initial_channel: int = 32
    resblock: str = "1"
    resblock_kernel_sizes: list[int] = field(default_factory=lambda: [3, 7])
    resblock_dilation_sizes: list[list[int]] = field(default_factory=lambda: [[1, 3, 5], [1, 3, 5]])
    activation: str = "snakebeta"
    snake_logscale: bool = True
    use_tanh_at_final: bool = True
    use_bias_at_final: bool = True
    sampling_rate: int = 24000
    hop_size: int = 480
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.resblock = str(self.resblock)
        self.upsample_rates = [int(u) for u in self.upsample_rates]
        self.upsample_kernel_sizes = [int(k) for k in self.upsample_kernel_sizes]
        self.resblock_kernel_sizes = [int(k) for k in self.resblock_kernel_sizes]
        self.resblock_dilation_sizes = [[int(d) for d in ds] for ds in self.resblock_dilation_sizes]
        self.validate()

    def validate(self) -> None:
        problems = []
        if self.resblock not in ("1", "2"):
            problems.append(f"resblock must be '1' or '2', got {self.resblock!r}")
        if self.activation not in ("snake", "snakebeta"):
            problems.append(f"activation must be 'snake' or 'snakebeta', got {self.activation!r}")
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes) or not self.upsample_rates:
            problems.append("upsample_rates and upsample_kernel_sizes must be non-empty and of equal length")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes) or not self.resblock_kernel_sizes:
            problems.append("resblock_kernel_sizes and resblock_dilation_sizes must be non-empty and of equal length")
        if math.prod(self.upsample_rates) != self.hop_size:
            problems.append(f"product of upsample_rates {self.upsample_rates} must equal hop_size {self.hop_size}")
        for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes):
            if k < u or (k - u) % 2:
                problems.append(f"upsample kernel {k} for rate {u} must be >= the rate with an even difference")
        if self.upsample_initial_channel % (2 ** len(self.upsample_rates)):
            problems.append(
                f"upsample_initial_channel {self.upsample_initial_channel} must be divisible by 2^{len(self.upsample_rates)}"
            )
        if problems:
            raise ConfigError("invalid BigVGAN config: " + "; ".join(problems))

    # -- serialisation
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BigVGANConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = dict(d.get("extra", {}))
        extra.update({k: v for k, v in d.items() if k not in names and k != "extra"})
        try:
            return cls(**known, extra=extra)
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"invalid BigVGAN config values: {e}") from e

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> BigVGANConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"vocoder config not found: {path}") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"vocoder config {path} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"vocoder config {path} must hold a JSON object")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """Flat dict in the release's config.json layout (extra keys included)."""
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        return {**extra, **d}

    @classmethod
    def from_name(cls, name: str) -> BigVGANConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown BigVGAN preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    @property
    def frame_rate(self) -> float:
        return self.sampling_rate / self.hop_size


PRESETS: dict[str, dict[str, Any]] = {
    # The fixture dims (reference/vocoder/config.json): 3 stages, 32 channels, snakebeta.
    "tiny": dict(
        upsample_rates=[8, 6, 10], upsample_kernel_sizes=[16, 12, 20], upsample_initial_channel=32,
        resblock_kernel_sizes=[3, 7], resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
        use_tanh_at_final=False, use_bias_at_final=False,
    ),
    # A few M parameters for our own training at 24 kHz / hop 480.
    "small": dict(
        upsample_rates=[8, 5, 4, 3], upsample_kernel_sizes=[16, 11, 8, 7], upsample_initial_channel=256,
        resblock_kernel_sizes=[3, 7, 11], resblock_dilation_sizes=[[1, 3, 5]] * 3,
        use_tanh_at_final=False, use_bias_at_final=False,
    ),
    # Kimi-Audio release (KIMI_AUDIO.md 6.4; final-layer switches as in BigVGAN-v2's published configs).
    "kimi-audio": dict(
        upsample_rates=[5, 2, 2, 2, 2, 3, 2], upsample_kernel_sizes=[9, 4, 4, 4, 4, 5, 4],
        upsample_initial_channel=2048, resblock_kernel_sizes=[3, 5, 7, 11],
        resblock_dilation_sizes=[[1, 3, 5]] * 4, use_tanh_at_final=False, use_bias_at_final=False,
    ),
}


# --------------------------------------------------------------------------------------------- model
def _same_padding(kernel_size: int, dilation: int) -> int:
    return (kernel_size * dilation - dilation) // 2


def _init_small(module: nn.Module) -> None:
    # BigVGAN initialises upsamplers, AMP convs and conv_post with N(0, 0.01); conv_pre keeps torch's default.
    if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)) and module.weight.device.type != "meta":
        nn.init.normal_(module.weight, 0.0, 0.01)


class AMPBlock(nn.Module):
    """Anti-aliased multi-periodicity residual block. [B, C, T] -> [B, C, T].

    Type "1": per dilation d, x += conv_k(act(conv_{k,d}(act(x)))) (`convs1` dilated, `convs2` dilation 1).
    Type "2": per dilation d, x += conv_{k,d}(act(x)) (`convs` only).
    Activations are numbered in call order, as in the release (`activations.{m}`).
    """

    def __init__(self, cfg: BigVGANConfig, channels: int, kernel_size: int, dilations: list[int]):
        super().__init__()
        self.kind = cfg.resblock

        def conv(d: int) -> nn.Conv1d:
            return nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=_same_padding(kernel_size, d))

        if self.kind == "1":
            self.convs1 = nn.ModuleList(conv(d) for d in dilations)
            self.convs2 = nn.ModuleList(conv(1) for _ in dilations)
            n_acts = 2 * len(dilations)
        else:
            self.convs = nn.ModuleList(conv(d) for d in dilations)
            n_acts = len(dilations)
        self.activations = nn.ModuleList(
            AntiAliasedActivation(make_snake(cfg.activation, channels, cfg.snake_logscale)) for _ in range(n_acts)
        )
        self.apply(_init_small)

    def weighted_convs(self) -> list[nn.Module]:
        return [*self.convs1, *self.convs2] if self.kind == "1" else list(self.convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "1":
            acts = self.activations
            for i, (c1, c2) in enumerate(zip(self.convs1, self.convs2)):
                x = x + c2(acts[2 * i + 1](c1(acts[2 * i](x))))
        else:
            for c, act in zip(self.convs, self.activations):
                x = x + c(act(x))
        return x


class BigVGAN(nn.Module):
    """BigVGAN-v2 generator. Build on the meta device and load with `load_vocoder` for inference.

    weight_norm=True wraps every conv in `torch.nn.utils.parametrizations.weight_norm` (for training);
    the default plain build is what inference and the loaders use.
    """

    def __init__(self, config: BigVGANConfig, *, weight_norm: bool = False):
        super().__init__()
        cfg = self.config = config
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        c0 = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(cfg.num_mels, c0, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
            c_in, c_out = c0 >> i, c0 >> (i + 1)
            # Nested list only to keep the release's key names (`ups.{i}.0.*`).
            self.ups.append(nn.ModuleList([nn.ConvTranspose1d(c_in, c_out, k, u, padding=(k - u) // 2)]))
            for rk, rd in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(AMPBlock(cfg, c_out, rk, rd))
        c_last = c0 >> len(cfg.upsample_rates)
        self.activation_post = AntiAliasedActivation(make_snake(cfg.activation, c_last, cfg.snake_logscale))
        self.conv_post = nn.Conv1d(c_last, 1, 7, padding=3, bias=cfg.use_bias_at_final)
        self.ups.apply(_init_small)
        self.conv_post.apply(_init_small)
        if weight_norm:
            for conv in self.weighted_convs():
                nn.utils.parametrizations.weight_norm(conv, dim=0)

    def weighted_convs(self) -> list[nn.Module]:
        """Every conv the release keeps under weight norm (conv_pre, ups, AMP convs, conv_post)."""
        convs = [self.conv_pre, *(up[0] for up in self.ups)]
        for block in self.resblocks:
            convs.extend(block.weighted_convs())
        convs.append(self.conv_post)
        return convs

    def fold_weight_norm(self) -> BigVGAN:
        """Replace parametrized weight norm by plain weights in place (no-op if there is none)."""
        for conv in self.weighted_convs():
            if parametrize.is_parametrized(conv, "weight"):
                parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
        return self

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, num_mels, T] (log-mel, 50 Hz for Kimi-Audio) -> waveform [B, 1, T * hop_size] in [-1, 1]."""
        cfg = self.config
        if mel.dim() != 3 or mel.shape[1] != cfg.num_mels:
            raise AudioError("vocoder input", f"expected mel of shape [B, {cfg.num_mels}, T], got {tuple(mel.shape)}")
        if mel.shape[-1] == 0:
            raise AudioError("vocoder input", "mel has zero frames")
        x = self.conv_pre(mel)
        n = self.num_kernels
        for i, up in enumerate(self.ups):
            x = up[0](x)
            blocks = self.resblocks[i * n : (i + 1) * n]
            acc = blocks[0](x)
            for block in blocks[1:]:
                acc = acc + block(x)
            x = acc / n
        x = self.conv_post(self.activation_post(x))
        return torch.tanh(x) if cfg.use_tanh_at_final else x.clamp(-1.0, 1.0)

    @torch.inference_mode()
    def decode_mel(self, mel: torch.Tensor) -> torch.Tensor:
        """Convenience for frame-major mels: [T, num_mels] or [B, T, num_mels] -> [B, T * hop_size]."""
        if mel.dim() == 2:
            mel = mel[None]
        if mel.dim() != 3:
            raise AudioError("vocoder input", f"expected mel [T, {self.config.num_mels}] or [B, T, {self.config.num_mels}], got {tuple(mel.shape)}")
        p = next(self.parameters())
        return self(mel.transpose(1, 2).to(device=p.device, dtype=p.dtype))[:, 0]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# --------------------------------------------------------------------------------------------- weights
_LEGACY_G, _LEGACY_V = ".weight_g", ".weight_v"
_PARAM_G, _PARAM_V = ".parametrizations.weight.original0", ".parametrizations.weight.original1"


def fold_weight_norm_tensors(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """w = g * v / ||v||, the norm taken over every axis where g has size 1 (all but dim 0 for dim=0)."""
    if g.dim() != v.dim():
        raise CheckpointError(f"weight-norm magnitude of shape {tuple(g.shape)} does not fit direction {tuple(v.shape)}")
    axes = [d for d in range(v.dim()) if g.shape[d] == 1]
    vf = v.float()
    norm = vf.pow(2).sum(dim=axes, keepdim=True).sqrt() if axes else vf.abs()
    return (vf * (g.float() / norm)).to(v.dtype)


def fold_weight_norm_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn legacy (`weight_g`/`weight_v`) or parametrized weight-norm keys into plain `weight` keys.

    Other keys pass through unchanged; a magnitude without its direction (or the reverse) is left as is so
    the strict loader names it.
    """
    out: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for key in sd:
        for g_sfx, v_sfx in ((_LEGACY_G, _LEGACY_V), (_PARAM_G, _PARAM_V)):
            if key.endswith(g_sfx):
                stem = key[: -len(g_sfx)]
                if stem + v_sfx in sd:
                    out[stem + ".weight"] = fold_weight_norm_tensors(sd[key], sd[stem + v_sfx])
                    consumed.update((key, stem + v_sfx))
    for key, value in sd.items():
        if key not in consumed:
            out[key] = value
    return out


def _read_official_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"vocoder weights not found: {path}") from e
    except Exception as e:
        raise CheckpointError(f"cannot read vocoder weights {path}: {e}") from e
    if isinstance(obj, dict) and "generator" in obj:
        obj = obj["generator"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected {{'generator': state_dict}} or a state dict of tensors")
    return obj


def _resolve(path: str | os.PathLike | tuple) -> tuple[Path, Path]:
    """(config.json, weights file) from a folder, a weights file beside its config.json, or a pair."""
    if isinstance(path, tuple):
        if len(path) != 2:
            raise CheckpointError(f"expected (config.json, weights) pair, got {path!r}")
        return Path(path[0]), Path(path[1])
    p = Path(path)
    if p.is_dir():
        for name in (NATIVE_WEIGHTS, OFFICIAL_WEIGHTS):
            if (p / name).is_file():
                return p / CONFIG_FILE, p / name
        raise CheckpointError(f"vocoder folder {p} holds neither {NATIVE_WEIGHTS} nor {OFFICIAL_WEIGHTS}")
    if p.is_file():
        return p.parent / CONFIG_FILE, p
    raise CheckpointError(f"vocoder path not found: {p}")


def load_vocoder(
    path: str | os.PathLike | tuple,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> BigVGAN:
    """Load a BigVGAN generator for inference (eval mode, no grad needed).

    `path`: the release's `vocoder/` folder (config.json + model.pt = {"generator": state dict with
    weight_g/weight_v}), a native folder (config.json + model.safetensors, plain weights), a weights file
    with its config.json beside it, or a (config, weights) pair. Keys are checked strictly: a
    `CheckpointError` names every missing, unexpected or mis-shaped key.
    """
    cfg_path, weights_path = _resolve(path)
    config = BigVGANConfig.from_json(cfg_path)
    if weights_path.suffix == ".safetensors":
        sd = load_safetensors(weights_path)
    else:
        sd = _read_official_weights(weights_path)
    sd = fold_weight_norm_state_dict(sd)
    model = build_frozen(lambda: BigVGAN(config), sd, source=str(weights_path), device=device, dtype=dtype)
    log.info("loaded BigVGAN vocoder from %s (%.1f M params)", weights_path, model.num_parameters() / 1e6)
    return model


def save_vocoder(model: BigVGAN, folder: str | os.PathLike) -> Path:
    """Write the native format: `config.json` + `model.safetensors` with plain (folded) weights."""
    from kimia.checkpoints.common import save_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = fold_weight_norm_state_dict(model.state_dict())
    sd = {k: v.detach().to("cpu") for k, v in sd.items()}
    save_safetensors(sd, folder / NATIVE_WEIGHTS, metadata={"format": "pt", "component": "bigvgan"})
    (folder / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    return folder
