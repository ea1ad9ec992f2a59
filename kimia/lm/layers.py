"""Building blocks of the audio LLM: RMSNorm, rotary embedding, GQA attention, gated MLP, decoder block.

The maths follows the Qwen2 decoder layer that Kimi-Audio uses for both its trunk and its audio branch
(reference KIMI_AUDIO.md §3.2):
- RMSNorm computed in fp32, cast back, then scaled by the weight.
- Rotary embedding in the "rotate half" convention (first half / second half of each head form the pairs),
  `inv_freq = theta^(-2i/d)`; cos/sin tables are precomputed in fp32 up to `max_position_embeddings` and
  indexed by explicit position ids, so every row of a batch may sit at its own position.
- Grouped-query attention through `torch.nn.functional.scaled_dot_product_attention`; q/k/v carry a bias when
  `attention_bias` is set (Qwen2), o_proj never does.
- SiLU-gated MLP without biases.

Attention writes its keys/values into a static cache layer (see `kimia.lm.cache`) when one is given; masking
is then positional: a query at position p sees cache slots 0..p of its own row (slot index == position).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimia.lm.cache import KVCacheLayer
from kimia.lm.config import AudioLMConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, computed in fp32 (weight applied in the input dtype)."""

    def __init__(self, dim: int, eps: float = 1e-6, *, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class RotaryEmbedding(nn.Module):
    """Precomputed rotate-half RoPE tables `cos`, `sin` [max_pos, head_dim] (fp32, non-persistent).

    The tables are not part of the state dict: after building on the meta device and loading weights,
    call `reset_buffers(device)` (the loaders do) to compute them on the target device.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float, *, device=None):
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = float(theta)
        self.register_buffer("cos", torch.empty(max_positions, head_dim, device=device), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim, device=device), persistent=False)
        if self.cos.device.type != "meta":
            self.reset_buffers(self.cos.device)

    @torch.no_grad()
    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        device = torch.device(device) if device is not None else self.cos.device
        if device.type == "meta":
            return
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        inv_freq = 1.0 / (self.theta ** exponent)  # [D/2]
        t = torch.arange(self.max_positions, dtype=torch.int64, device=device).float()
        freqs = torch.outer(t, inv_freq)  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.cos = emb.cos()
        self.sin = emb.sin()

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, L] long -> (cos, sin) each [B, 1, L, D] in `dtype` (broadcast over heads)."""
        return self.cos[positions].to(dtype).unsqueeze(1), self.sin[positions].to(dtype).unsqueeze(1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D]; cos/sin [B, 1, L, D]."""
    return x * cos + _rotate_half(x) * sin


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, groups: int) -> torch.Tensor:
    """q [B, H, L, D], k/v [B, Hkv, S, D]; boolean `mask` [B, 1, L, S] (True = attend) or causal when None.

    Query head h reads kv head h // groups. With a mask (the cached path) the `groups` query heads that share
    a kv head are folded into the query axis, [B, Hkv, groups*L, D], so the cache is read as is instead of
    being repeated per query head (a large copy per layer and step for a long cache).
    """
    if mask is None:
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1)
    if groups == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    b, h, n, d = q.shape
    hk, s = k.shape[1], k.shape[2]
    qf = q.reshape(b, hk, groups * n, d)
    mf = mask[:, :, None].expand(b, 1, groups, n, s).reshape(b, 1, groups * n, s)
    return F.scaled_dot_product_attention(qf, k, v, attn_mask=mf).view(b, h, n, d)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions and an optional static KV cache layer."""

    def __init__(self, config: AudioLMConfig, *, device=None, dtype=None):
        super().__init__()
        c = config
        self.n_heads = c.num_attention_heads
        self.n_kv_heads = c.num_key_value_heads
        self.head_dim = c.head_dim
        kw = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=c.attention_bias, **kw)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv_heads * self.head_dim, bias=c.attention_bias, **kw)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv_heads * self.head_dim, bias=c.attention_bias, **kw)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=False, **kw)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        *,
        positions: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCacheLayer | None = None,
    ) -> torch.Tensor:
        """x [B, L, D] -> [B, L, D].

        Without `cache`: causal attention over the L inputs (index order). With `cache`: k/v are written at
        `positions` [B, L] of the cache layer first and the queries attend over the cache slots selected by
        `mask` [B, 1, L, S] (built by the model from the positions).
        """
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, positions, kv_len=None if mask is None else mask.shape[-1])
        y = _sdpa(q, k, v, mask, self.n_heads // self.n_kv_heads)  # [B, H, L, D]
        return self.o_proj(y.transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SiLU-gated feed-forward: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, config: AudioLMConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype, bias=False)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, **kw)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, **kw)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)). Key names match the release."""

    def __init__(self, config: AudioLMConfig, *, device=None, dtype=None):
        super().__init__()
        self.self_attn = Attention(config, device=device, dtype=dtype)
        self.mlp = MLP(config, device=device, dtype=dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device=device, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device=device, dtype=dtype)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        *,
        positions: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCacheLayer | None = None,
    ) -> torch.Tensor:
        """x [B, L, D] -> [B, L, D]."""
        x = x + self.self_attn(self.input_layernorm(x), rope, positions=positions, mask=mask, cache=cache)
        return x + self.mlp(self.post_attention_layernorm(x))
