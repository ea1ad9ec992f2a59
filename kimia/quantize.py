"""Weight-only int8 quantization of the audio LLM's linear layers (decode is memory bound: 4x fewer weight bytes
than float32).

`quantize_lm(model, "int8")` replaces every `nn.Linear` of the decoder layers (trunk, text tail, audio branch)
and the two output heads by an `Int8Linear`: int8 weights with one symmetric scale per output row
(`scale = max|w_row| / 127`). The token embedding stays in the model's dtype (lookups, not matmuls); a tied text
head gets its own int8 copy. The Whisper adaptor, the encoders and the detokenizer are untouched.

Two paths compute the same product:
- reference (`Int8Linear.reference`, every device): `x @ (int8 weight -> x.dtype)^T * scale`;
- fast (CPU): PyTorch's `_weight_int8pack_mm` kernel on bfloat16 activations, the result cast back to the
  input dtype. `tests/test_quantize.py` holds the fast path to the reference within bfloat16 rounding.
"""

from __future__ import annotations

import logging
import re

import torch
import torch.nn.functional as F
from torch import nn

from kimia.errors import ConfigError

logger = logging.getLogger(__name__)

MODES = ("int8",)
# AudioLM modules that are quantized (names relative to the AudioLM)
_TARGETS = re.compile(r"(model\.(layers|mimo_layers)\.\d+\..*|lm_head|mimo_output)")


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [O, I] float -> (int8 [O, I], float32 scales [O]) with w ~= q * scale[:, None] (symmetric per row)."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _fast_kernel_ok(device: torch.device) -> bool:
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 rows and per-row scales (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, fast: bool = True):
        super().__init__()
        q, s = quantize_rows(weight)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", q.to(weight.device))
        self.register_buffer("scales", s.to(weight.device))
        self.register_buffer("scales_bf16", s.to(device=weight.device, dtype=torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.fast = fast

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, fast: bool = True) -> Int8Linear:
        return cls(linear.weight, linear.bias, fast=fast)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype) * self.scales.to(dtype)[:, None]

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.fast and _fast_kernel_ok(x.device)):
            return self.reference(x)
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.weight,
                                               self.scales_bf16)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, fast={self.fast}"


def quantize_lm(model: nn.Module, mode: str | None, *, fast: bool = True) -> nn.Module:
    """Swap the AudioLM's decoder/head linears for quantized ones in place (`mode` None: nothing); returns it."""
    if mode is None:
        return model
    if mode not in MODES:
        raise ConfigError(f"unknown quantization {mode!r}; expected one of {MODES} or None")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _TARGETS.fullmatch(n)]
    if not names:
        raise ConfigError("quantize_lm: no linear layer of an AudioLM found to quantize")
    before = sum(m.weight.numel() * m.weight.element_size() for n, m in model.named_modules() if n in names)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.no_grad():
            setattr(parent, attr, Int8Linear.from_linear(getattr(parent, attr), fast=fast))
    after = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, Int8Linear))
    logger.info("quantized %d linear layers to int8: %.0f MB -> %.0f MB of weights", len(names), before / 1e6,
                after / 1e6)
    return model


__all__ = ["Int8Linear", "quantize_lm", "quantize_rows", "MODES"]
