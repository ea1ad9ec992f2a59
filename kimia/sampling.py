"""Pure next-token sampling functions for the two output streams of Kimi-Audio.

The official sampler keeps separate temperature / top-k / repetition-penalty settings for the text and the
audio stream; the maths is the same for both, so here it is a handful of stateless functions over a batch
of logits rows [B, V] with an explicit `torch.Generator` for randomness. The engine owns the state (the
recently generated ids of each stream) and passes it in; nothing here mutates its inputs.

Semantics (matching the reference sampler):
- repetition penalty (CTRL style) only when penalty > 1 and MORE than `window` ids have been generated:
  each distinct id among the last `window` generated ids has its logit divided by the penalty if positive,
  multiplied by it otherwise;
- log-softmax in fp32; temperature <= 1e-6 means greedy argmax (top-k ignored);
- otherwise weights exp(logp / T), restricted to the top-k of them when top_k > 0, sampled in proportion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kimia.errors import ConfigError

GREEDY_EPS = 1e-6  # temperatures at or below this are greedy


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one stream (official `generate()` defaults: text 0.0/5/1.0/16, audio 0.0/5/1.0/64)."""

    temperature: float = 0.0
    top_k: int = 5
    repetition_penalty: float = 1.0
    window: int = 16

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0):
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not (self.repetition_penalty > 0.0):
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.window < 0:
            raise ConfigError(f"repetition window must be >= 0, got {self.window}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_EPS

    @classmethod
    def text_default(cls) -> "SamplingParams":
        return cls(temperature=0.0, top_k=5, repetition_penalty=1.0, window=16)

    @classmethod
    def audio_default(cls) -> "SamplingParams":
        return cls(temperature=0.0, top_k=5, repetition_penalty=1.0, window=64)


RecentIds = torch.Tensor | Sequence[Sequence[int] | torch.Tensor]


def _as_rows(logits: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if logits.dim() == 1:
        return logits.unsqueeze(0), True
    if logits.dim() != 2:
        raise ValueError(f"logits must be [V] or [B, V], got shape {tuple(logits.shape)}")
    return logits, False


def repetition_mask(recent_ids: RecentIds, batch: int, vocab: int, window: int, device: torch.device) -> torch.Tensor:
    """[B, V] bool: ids among the last `window` recent ids of rows that have MORE than `window` of them.

    `recent_ids` is a [B, n] tensor (every row has n ids) or a list of B per-row sequences (any lengths).
    """
    mask = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
    if window <= 0:
        return mask
    if isinstance(recent_ids, torch.Tensor):
        ids = recent_ids.to(device=device, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.shape[0] != batch:
            raise ValueError(f"recent_ids has {ids.shape[0]} rows for {batch} logits rows")
        if ids.shape[1] > window:
            mask.scatter_(1, ids[:, -window:], True)
        return mask
    if len(recent_ids) != batch:
        raise ValueError(f"recent_ids has {len(recent_ids)} rows for {batch} logits rows")
    for b, row in enumerate(recent_ids):
        if len(row) > window:
            tail = torch.as_tensor(list(row[-window:]) if not isinstance(row, torch.Tensor) else row[-window:],
                                   dtype=torch.long, device=device)
            mask[b, tail] = True
    return mask


def apply_repetition_penalty(logits: torch.Tensor, recent_ids: RecentIds, penalty: float, window: int) -> torch.Tensor:
    """Return a penalised copy of `logits` [B, V] (or [V]); the input is not modified.

    For B == 1 (or 1-D logits) `recent_ids` may also be a flat sequence of ids.
    """
    rows, squeeze = _as_rows(logits)
    if penalty <= 1.0:  # the reference only ever penalises (penalty > 1); 1.0 and below are no-ops
        return logits.clone()
    if rows.shape[0] == 1 and not isinstance(recent_ids, torch.Tensor) and (len(recent_ids) == 0 or not _is_seq(recent_ids[0])):
        recent_ids = [recent_ids]  # a flat list of ids for a single row
    mask = repetition_mask(recent_ids, rows.shape[0], rows.shape[1], window, rows.device)
    penalised = torch.where(rows < 0, rows * penalty, rows / penalty)
    out = torch.where(mask, penalised, rows)
    return out.squeeze(0) if squeeze else out


def _is_seq(x: object) -> bool:
    return isinstance(x, (list, tuple)) or (isinstance(x, torch.Tensor) and x.dim() > 0)


def _per_row(value: float | int | Sequence | torch.Tensor, batch: int, name: str) -> list:
    if isinstance(value, torch.Tensor):
        value = value.tolist() if value.dim() else value.item()
    if isinstance(value, (list, tuple)):
        if len(value) != batch:
            raise ValueError(f"{name} has {len(value)} entries for {batch} rows")
        return list(value)
    return [value] * batch


def _weights(logp: torch.Tensor, temperature: float, top_k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unnormalised sampling weights of rows sharing (T, k): exp(logp/T), top-k restricted when k > 0.

    Returns (weights, indices): with top-k, weights [b, k] in `torch.topk` order and their vocabulary ids;
    without, weights [b, V] and None.
    """
    w = torch.exp(logp / temperature)
    if top_k > 0:
        vals, idx = torch.topk(w, min(int(top_k), w.shape[-1]), dim=-1)
        return vals, idx
    return w, None


def _groups(temps: list, ks: list, device: torch.device) -> list[tuple[float, int, torch.Tensor | slice]]:
    """Rows sharing (T, k) as (T, k, row selector); greedy rows have T = 0. One group -> slice(None),
    so the common case (all rows alike) indexes nothing and copies nothing to the device."""
    groups: dict[tuple[float, int], list[int]] = {}
    for b, (t, k) in enumerate(zip(temps, ks)):
        key = (0.0, 0) if t <= GREEDY_EPS else (float(t), int(k))
        groups.setdefault(key, []).append(b)
    if len(groups) == 1:
        (t, k), = groups
        return [(t, k, slice(None))]
    return [(t, k, torch.tensor(rows, device=device)) for (t, k), rows in groups.items()]


def sampling_distribution(logits: torch.Tensor, temperature: float | Sequence[float] | torch.Tensor,
                          top_k: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """The normalised fp32 distribution [B, V] (or [V]) that `sample` draws from.

    Greedy rows (T <= 1e-6) are one-hot at the argmax; top-k rows are zero outside their k ids.
    """
    rows, squeeze = _as_rows(logits)
    B, V = rows.shape
    logp = torch.log_softmax(rows.float(), dim=-1)
    probs = torch.zeros(B, V, dtype=torch.float32, device=rows.device)
    for t, k, sel in _groups(_per_row(temperature, B, "temperature"), _per_row(top_k, B, "top_k"), rows.device):
        if t == 0.0:
            g = logp[sel]
            probs[sel] = torch.zeros_like(g).scatter_(1, g.argmax(dim=-1, keepdim=True), 1.0)
            continue
        w, idx = _weights(logp[sel], t, k)
        w = w / w.sum(dim=-1, keepdim=True)
        if idx is None:
            probs[sel] = w
        else:
            probs[sel] = probs[sel].scatter(1, idx, w)
    return probs.squeeze(0) if squeeze else probs


def sample(logits: torch.Tensor, temperature: float | Sequence[float] | torch.Tensor,
           top_k: int | Sequence[int] | torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Next ids [B] (or a 0-d tensor for [V] logits) from logits [B, V].

    `temperature` and `top_k` are scalars or per-row values. `generator` must live on the logits' device;
    greedy rows never touch it, so a greedy call gives the same ids under any seed.
    """
    rows, squeeze = _as_rows(logits)
    B = rows.shape[0]
    logp = torch.log_softmax(rows.float(), dim=-1)
    out = torch.empty(B, dtype=torch.long, device=rows.device)
    for t, k, sel in _groups(_per_row(temperature, B, "temperature"), _per_row(top_k, B, "top_k"), rows.device):
        if t == 0.0:
            out[sel] = logp[sel].argmax(dim=-1)
            continue
        w, idx = _weights(logp[sel], t, k)
        draw = torch.multinomial(w, num_samples=1, generator=generator)
        out[sel] = (idx.gather(1, draw) if idx is not None else draw).squeeze(1)
    return out.squeeze(0) if squeeze else out


def sample_with_params(logits: torch.Tensor, params: SamplingParams, recent_ids: RecentIds | None,
                       generator: torch.Generator | None) -> torch.Tensor:
    """Repetition penalty (if any) then `sample`, all rows sharing `params`."""
    if recent_ids is not None and params.repetition_penalty > 1.0:
        logits = apply_repetition_penalty(logits, recent_ids, params.repetition_penalty, params.window)
    return sample(logits, params.temperature, params.top_k, generator)


__all__ = [
    "GREEDY_EPS", "SamplingParams", "apply_repetition_penalty", "repetition_mask", "sampling_distribution",
    "sample", "sample_with_params",
]
