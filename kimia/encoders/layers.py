"""Whisper-style transformer encoder blocks shared by both audio encoders.

The continuous Whisper-large-v3 encoder (`kimia.encoders.whisper`) and the GLM-4-Voice semantic tokenizer
(`kimia.encoders.semantic`) are the same pre-LN transformer layer stacked behind two conv front ends; only
the attention mask differs (none vs block-causal with padding). One implementation lives here so a fix or
a fast path lands in both.

Parameter names follow the Hugging Face Whisper encoder (`self_attn.{q,k,v,out}_proj`, `self_attn_layer_norm`,
`fc1`, `fc2`, `final_layer_norm`) because those are the key names of every checkpoint we read; `k_proj` has
no bias, as in Whisper. LayerNorm runs in fp32 whatever the weight dtype; attention uses torch SDPA with the
scale 1/sqrt(head_dim).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimia.errors import ConfigError


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back to the input dtype (keeps bf16/fp16 inference stable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention with Whisper's biases: q, v and out have a bias, k has none."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ConfigError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D]; mask broadcastable to [B, H, T, T] (bool: True = may attend, or additive float).

        Returns [B, T, D].
        """
        B, T, D = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class EncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + fc2(gelu(fc1(LN(x))))."""

    def __init__(self, d_model: int, n_heads: int, ffn_dim: int, eps: float = 1e-5):
        super().__init__()
        self.self_attn = SelfAttention(d_model, n_heads)
        self.self_attn_layer_norm = LayerNorm(d_model, eps=eps)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = LayerNorm(d_model, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]; `mask` as in `SelfAttention.forward`."""
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


def init_encoder_weights(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """Fill every parameter of a (possibly `to_empty`-materialised) encoder with a random init.

    Linear/conv weights ~ N(0, 1/fan_in), biases small, LayerNorm at identity, position tables ~ N(0, 0.02).
    Used for random-weight benchmarks and tests, never for real checkpoints.
    """
    norms = {id(m) for m in module.modules() if isinstance(m, nn.LayerNorm)}
    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                if id(m) in norms:
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif p.ndim == 1:
                    p.normal_(0.0, 0.02, generator=generator)
                elif isinstance(m, nn.Embedding) or p.ndim == 2 and not isinstance(m, nn.Linear):
                    p.normal_(0.0, 0.02, generator=generator)
                else:
                    p.normal_(0.0, p[0].numel() ** -0.5, generator=generator)
