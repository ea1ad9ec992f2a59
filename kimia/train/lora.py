"""LoRA adapters for `nn.Linear` layers: y = x W^T + b + (alpha / r) * dropout(x) A^T B^T.

Why in place: `LoRALinear` is a subclass of `nn.Linear` that keeps the wrapped layer's own `weight` and `bias`
parameters under their original names and adds `lora_A` [r, in] and `lora_B` [out, r]. The model's state-dict
keys therefore stay those of the native checkpoint (plus the `lora_*` entries), a frozen base loads straight
into it, and `merge_lora` + `strip_lora` give back a plain model whose export is an ordinary native folder.
`lora_B` starts at zero, so an adapted model computes exactly what the base did until it trains.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kimia.errors import ConfigError

logger = logging.getLogger(__name__)

LORA_KEYS = ("lora_A", "lora_B")


class LoRALinear(nn.Linear):
    """A Linear with a low-rank update. Build with `LoRALinear.wrap(linear, r, alpha, dropout)`."""

    r: int
    scale: float
    merged: bool

    @classmethod
    def wrap(cls, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
             generator: torch.Generator | None = None) -> "LoRALinear":
        if r <= 0:
            raise ConfigError(f"LoRA rank must be positive, got {r}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.r, new.scale, new.merged = r, alpha / r, False
        new.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = linear.weight
        new.lora_A = nn.Parameter(torch.empty(r, linear.in_features, device=w.device, dtype=w.dtype))
        new.lora_B = nn.Parameter(torch.zeros(linear.out_features, r, device=w.device, dtype=w.dtype))
        bound = 1.0 / math.sqrt(linear.in_features)  # kaiming-uniform(a=sqrt(5)) bound, as nn.Linear's init
        with torch.no_grad():
            a = torch.rand(new.lora_A.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound
            new.lora_A.copy_(a)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scale

    def delta(self) -> torch.Tensor:
        """The dense update scale * B @ A [out, in] (computed in fp32)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta()).to(self.weight.dtype))
            self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain Linear sharing this layer's weight/bias (merge first to keep the update)."""
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        lin.weight, lin.bias = self.weight, self.bias
        return lin

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scale={self.scale:g}, merged={self.merged}"


def _set_child(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def apply_lora(model: nn.Module, targets: list[str], r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               *, seed: int = 0, freeze_base: bool = True) -> list[str]:
    """Replace every Linear whose qualified name matches one of the glob `targets` (e.g. "*.q_proj",
    "model.layers.*.mlp.*") by a `LoRALinear`. With `freeze_base`, every non-adapter parameter of the model
    stops requiring grad; without it only the adapted layers' own weight and bias are frozen (the rest of the
    model keeps its requires_grad). Returns the adapted module names; raises ConfigError when nothing matched."""
    g = torch.Generator().manual_seed(seed)
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear) and any(fnmatch.fnmatchcase(n, t) for t in targets)]
    if not names:
        raise ConfigError(f"LoRA targets {targets} match no Linear layer of the model")
    for n in names:
        _set_child(model, n, LoRALinear.wrap(model.get_submodule(n), r, alpha, dropout, generator=g))
    if freeze_base:
        for pn, p in model.named_parameters():
            p.requires_grad_(pn.rsplit(".", 1)[-1] in LORA_KEYS)
    else:
        for n in names:
            m = model.get_submodule(n)
            m.weight.requires_grad_(False)
            if m.bias is not None:
                m.bias.requires_grad_(False)
    logger.info("LoRA r=%d alpha=%g on %d layers", r, alpha, len(names))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model_or_sd: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (keys ending in lora_A / lora_B)."""
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
    return {k: v for k, v in sd.items() if k.rsplit(".", 1)[-1] in LORA_KEYS}


def merge_lora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.unmerge()


def strip_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every LoRALinear by a plain Linear (merging the update first unless `merge=False`)."""
    for n, m in lora_layers(model).items():
        if merge:
            m.merge()
        _set_child(model, n, m.to_linear())
    return model


def merge_lora_state_dict(sd: dict[str, torch.Tensor], scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """A state dict with adapters folded into the base weights and the lora keys dropped.

    `scales`: module name -> alpha / r (from `lora_scales(model)`)."""
    out = {k: v for k, v in sd.items() if k.rsplit(".", 1)[-1] not in LORA_KEYS}
    for name, s in scales.items():
        a, b, w = sd[f"{name}.lora_A"], sd[f"{name}.lora_B"], out[f"{name}.weight"]
        out[f"{name}.weight"] = (w.float() + (b.float() @ a.float()) * s).to(w.dtype)
    return out


def lora_scales(model: nn.Module) -> dict[str, float]:
    return {n: m.scale for n, m in lora_layers(model).items()}


def save_lora_factors(path: str | os.PathLike, factors: dict[str, torch.Tensor], scales: dict[str, float]) -> Path:
    """Write adapters (<layer>.lora_A / .lora_B) with their scales (alpha / r) in the file's metadata."""
    from kimia.checkpoints.common import save_safetensors

    return save_safetensors(factors, path, metadata={"format": "pt", "scales": json.dumps(scales)})


def read_lora_factors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(factors, scales) of a `save_lora_factors` file."""
    from safetensors import safe_open

    from kimia.checkpoints.common import load_safetensors

    with safe_open(str(path), framework="pt") as f:
        scales = json.loads((f.metadata() or {}).get("scales", "{}"))
    return load_safetensors(path), scales


def load_lora_factors(model: nn.Module, path: str | os.PathLike) -> None:
    """Start the model's adapters from a `save_lora_factors` file. Strict: the file must hold both factors of
    exactly the model's adapted layers, in their shapes, with the same scales (same r and alpha)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"lora.init: adapters file {path} not found")
    factors, scales = read_lora_factors(path)
    layers = lora_layers(model)
    missing = sorted(n for n in layers if f"{n}.lora_A" not in factors or f"{n}.lora_B" not in factors)
    extra = sorted({k.rsplit(".", 1)[0] for k in factors} - set(layers))
    if missing or extra:
        raise ConfigError(f"lora.init {path}: adapters do not match the model's LoRA layers (missing "
                          f"{missing[:3]}{'...' if len(missing) > 3 else ''}, not adapted here {extra[:3]})")
    for n, m in layers.items():
        a, b = factors[f"{n}.lora_A"], factors[f"{n}.lora_B"]
        if a.shape != m.lora_A.shape or b.shape != m.lora_B.shape:
            raise ConfigError(f"lora.init {path}: {n} factors have shapes {tuple(a.shape)}, {tuple(b.shape)}; the "
                              f"model's are {tuple(m.lora_A.shape)}, {tuple(m.lora_B.shape)} (another r?)")
        if n not in scales or abs(float(scales[n]) - m.scale) > 1e-9:
            raise ConfigError(f"lora.init {path}: {n} was trained with scale {scales.get(n)}, this run's is "
                              f"{m.scale} (alpha / r must match)")
        with torch.no_grad():
            m.lora_A.copy_(a)
            m.lora_B.copy_(b)


__all__ = ["LoRALinear", "apply_lora", "lora_layers", "lora_state_dict", "merge_lora", "unmerge_lora", "strip_lora",
           "merge_lora_state_dict", "lora_scales", "save_lora_factors", "read_lora_factors",
           "load_lora_factors"]
