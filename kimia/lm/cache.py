"""Static, preallocated KV cache for the audio LLM (trunk and audio branch).

Layout: one key and one value tensor of shape [layers, B, kv_heads, max_len, head_dim], allocated once.
Layers 0..num_hidden_layers-1 are the main (trunk + text tail) layers, the following kimia_mimo_layers the
audio branch, the same order as the reference's legacy tuple cache.

Positions, lengths and padding (the contract with the engine)
-------------------------------------------------------------
* Slot == position: the key/value of a token at position p of row b is written to slot p of row b
  (`scatter_` along the time axis, in place; never `torch.cat`). Every row therefore has its own length:
  the engine passes explicit `positions` [B, L] on every call and keeps each row's length itself.
* The attention mask is purely positional: a query at position p of row b attends to slots 0..p of row b.
  Slots beyond p are ignored whatever they hold, so stale data from an earlier request or from padding never
  leaks in and `reset()` is optional (it only zeroes memory).
* Batching uses RIGHT padding. Prefill a batch with rows of lengths n_b by giving every row positions
  0..L-1 (L = max n_b, pad ids of your choice after n_b) and read each row's logits at index n_b - 1
  (`AudioLM.forward(..., logits_at=lengths - 1)`). The pad keys written at slots n_b..L-1 are invisible to
  the row's real tokens (they lie in the future) and are overwritten by its decode steps: the next decode
  step of row b uses position n_b, the one after n_b + 1, and so on, each row independently.
* `kv_len` (optional, per call): attend only over slots [0, kv_len). It must exceed every query position
  of the call. Passing it bounds the work of a decode step to the live part of the cache; leaving it out
  attends over all max_len slots (static shapes, friendly to CUDA graphs, correct either way).

Typical use::

    cache = KVCache.allocate(config, batch=B, max_len=T, device=dev, dtype=torch.bfloat16)
    out = model(audio_ids, text_ids, positions, cache=cache, logits_at=lengths - 1)   # prefill
    out = model(a_next[:, None], t_next[:, None], lengths[:, None], cache=cache)      # decode, lengths += 1
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kimia.errors import BudgetError, ConfigError
from kimia.lm.config import AudioLMConfig


@dataclass
class KVCacheLayer:
    """View of one layer of a `KVCache`: k, v [B, kv_heads, max_len, head_dim]."""

    k: torch.Tensor
    v: torch.Tensor

    def update(
        self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, kv_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, Hkv, L, D] at `positions` [B, L] in place; return the cached k, v [B, Hkv, S, D]
        with S = kv_len (or max_len)."""
        b, h, n, d = k.shape
        idx = positions[:, None, :, None].expand(b, h, n, d)
        self.k.scatter_(2, idx, k.to(self.k.dtype))
        self.v.scatter_(2, idx, v.to(self.v.dtype))
        if kv_len is None:
            return self.k, self.v
        return self.k[:, :, :kv_len], self.v[:, :, :kv_len]


class KVCache:
    """Preallocated keys/values for all main and mimo layers. See the module docstring for the contract."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, num_main_layers: int):
        if k.shape != v.shape or k.dim() != 5:
            raise ConfigError(f"KVCache needs k, v of equal shape [layers, B, Hkv, T, D], got {k.shape}, {v.shape}")
        self.k = k
        self.v = v
        self.num_main_layers = num_main_layers

    @classmethod
    def allocate(
        cls,
        config: AudioLMConfig,
        batch: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        """Zero-filled cache for `batch` rows of up to `max_len` positions (<= max_position_embeddings)."""
        if batch <= 0 or max_len <= 0:
            raise ConfigError(f"KVCache.allocate needs batch > 0 and max_len > 0, got {batch}, {max_len}")
        if max_len > config.max_position_embeddings:
            raise BudgetError(
                f"KV cache length {max_len} exceeds max_position_embeddings {config.max_position_embeddings}"
            )
        shape = (config.num_total_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
        k = torch.zeros(shape, device=device, dtype=dtype)
        v = torch.zeros(shape, device=device, dtype=dtype)
        return cls(k, v, config.num_hidden_layers)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def main(self, i: int) -> KVCacheLayer:
        """Cache of main layer i (0-based)."""
        return KVCacheLayer(self.k[i], self.v[i])

    def mimo(self, j: int) -> KVCacheLayer:
        """Cache of audio-branch (mimo) layer j (0-based)."""
        return KVCacheLayer(self.k[self.num_main_layers + j], self.v[self.num_main_layers + j])

    def reset(self) -> None:
        """Zero all slots (optional: masking is positional, stale slots are never attended)."""
        self.k.zero_()
        self.v.zero_()

    def copy_row_(self, src: int, dst: int) -> None:
        """Copy every layer's slots of row `src` onto row `dst` (e.g. to fork a prefilled prompt)."""
        self.k[:, dst].copy_(self.k[:, src])
        self.v[:, dst].copy_(self.v[:, src])

    def attention_mask(self, positions: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        """Boolean mask [B, 1, L, S] (True = attend): slot s is visible to a query at position p iff s <= p."""
        s = self.max_len if kv_len is None else kv_len
        slots = torch.arange(s, device=positions.device)
        return (slots[None, None, None, :] <= positions[:, None, :, None])

    def check(self, positions: torch.Tensor, kv_len: int | None = None) -> None:
        """Validate a call's positions against the cache (host sync; skipped under torch.compile)."""
        if positions.dim() != 2 or positions.shape[0] != self.batch_size:
            raise ConfigError(
                f"positions must be [B={self.batch_size}, L] for this cache, got {tuple(positions.shape)}"
            )
        if kv_len is not None and not 0 < kv_len <= self.max_len:
            raise BudgetError(f"kv_len {kv_len} must lie in [1, max_len={self.max_len}]")
        limit = self.max_len if kv_len is None else kv_len
        hi, lo = torch.stack([positions.max(), positions.min()]).tolist()  # one host sync
        if hi >= limit or lo < 0:
            raise BudgetError(
                f"positions span [{lo}, {hi}] but the KV cache holds slots [0, {limit}) "
                f"(max_len {self.max_len}, kv_len {kv_len})"
            )
