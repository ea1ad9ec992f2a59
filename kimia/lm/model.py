"""`AudioLM`: the Kimi-Audio LLM — shared trunk, text tail + text head, audio ("mimo") branch + audio head.

Input side (reference KIMI_AUDIO.md §2.3): two id streams of equal length share one embedding table.
At continuous positions (the audio tokens strictly between `media_begin` and `media_end`), the Whisper
features (5120-d at 12.5 Hz) go through the VQ adaptor (Linear, SiLU, Dropout, Linear, LayerNorm) and are
fused as `(E[audio] + adaptor(w)) * sqrt(2)`; elsewhere the audio stream contributes `E[audio]`. The text
stream is then added: `+ E[text]` (a row whose text ids are all 0 gets no text embedding, which for one row
is exactly the reference's "skip when the text ids sum to 0").

Trunk (§3.2): main layers 0..F (F = kimia_mimo_transformer_from_layer_index) are shared. The hidden state
AFTER layer F forks: the text tail runs main layers F+1.. -> `norm` -> `lm_head` (text logits); the audio
branch runs `mimo_layers` -> `mimo_norm` -> `mimo_output` (audio logits). Both heads are full-vocabulary.

Module names mirror the release checkpoint keys (`model.embed_tokens`, `model.layers.*`, `model.mimo_layers.*`,
`model.vq_adaptor.layers.{0,3,4}`, `model.norm`, `model.mimo_norm`, `lm_head`, `mimo_output`) so the release
loads without any key remapping. The model is teacher-forced and stateless apart from the optional static KV
cache it is handed (`kimia.lm.cache`); generation rules live in the engine.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kimia.errors import ConfigError, PromptError
from kimia.lm.cache import KVCache
from kimia.lm.config import AudioLMConfig
from kimia.lm.layers import DecoderLayer, RMSNorm, RotaryEmbedding

logger = logging.getLogger(__name__)


@dataclass
class LMOutput:
    """Logits of both heads, fp32. L' = L, or 1 when `logits_at` was given."""

    audio_logits: torch.Tensor | None  # [B, L', V] audio head (mimo branch); None with skip_audio=True
    text_logits: torch.Tensor | None  # [B, L', V] text head (main trunk); None with skip_text=True


class VQAdaptor(nn.Module):
    """Whisper features [.., 5120] -> hidden [.., H]. Sequential indices 0..4 as in the release (params 0,3,4)."""

    def __init__(self, config: AudioLMConfig, *, device=None, dtype=None):
        super().__init__()
        h = config.hidden_size
        kw = dict(device=device, dtype=dtype)
        self.layers = nn.Sequential(
            nn.Linear(config.kimia_adaptor_input_dim, h, bias=True, **kw),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Linear(h, h, bias=True, **kw),
            nn.LayerNorm(h, eps=config.rms_norm_eps, bias=True, **kw),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class KimiaBackbone(nn.Module):
    """Parameters under the release's `model.` prefix; the control flow lives in `AudioLM.forward`."""

    def __init__(self, config: AudioLMConfig, *, device=None, dtype=None):
        super().__init__()
        c = config
        kw = dict(device=device, dtype=dtype)
        pad = c.pad_token_id if c.pad_token_id is not None and 0 <= c.pad_token_id < c.vocab_size else None
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=pad, **kw)
        self.layers = nn.ModuleList(DecoderLayer(c, **kw) for _ in range(c.num_hidden_layers))
        self.mimo_layers = nn.ModuleList(DecoderLayer(c, **kw) for _ in range(c.kimia_mimo_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.mimo_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.vq_adaptor = VQAdaptor(c, **kw)
        self.rotary = RotaryEmbedding(c.head_dim, c.max_position_embeddings, c.rope_theta, device=device)


class AudioLM(nn.Module):
    """Dual-head audio LLM. Build with `AudioLM(config, device=..., dtype=...)` (meta device supported)."""

    def __init__(self, config: AudioLMConfig, *, device=None, dtype=None):
        super().__init__()
        self.config = config
        kw = dict(device=device, dtype=dtype)
        self.model = KimiaBackbone(config, **kw)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, **kw)
        self.mimo_output = nn.Linear(config.hidden_size, config.vocab_size, bias=False, **kw)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------ setup helpers
    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the non-persistent RoPE tables, e.g. after a meta-device build + assign-load."""
        self.model.rotary.reset_buffers(device if device is not None else self.model.embed_tokens.weight.device)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Random init for tests/training: linears and embeddings N(0, initializer_range), biases 0, norms 1."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std, generator=generator)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, (RMSNorm, nn.LayerNorm)):
                m.weight.fill_(1.0)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        self.init_buffers()

    def allocate_cache(
        self, batch: int, max_len: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """A static KV cache for this model (defaults: the model's device and dtype)."""
        w = self.model.embed_tokens.weight
        return KVCache.allocate(self.config, batch, max_len, device=device or w.device, dtype=dtype or w.dtype)

    # ------------------------------------------------------------------ input side
    def embed(
        self,
        audio_ids: torch.Tensor,
        text_ids: torch.Tensor | None = None,
        continuous: torch.Tensor | None = None,
        continuous_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fused input embeddings [B, L, H] of the two streams and the continuous features (§2.3).

        audio_ids, text_ids [B, L] long; continuous [B, L, Din] aligned to positions (zeros elsewhere);
        continuous_mask [B, L] bool (True at continuous positions).
        """
        emb = self.model.embed_tokens
        e = emb(audio_ids)  # [B, L, H]
        if continuous is not None:
            if continuous_mask is None:
                raise ConfigError("continuous features given without continuous_mask")
            if continuous.shape[:2] != audio_ids.shape or continuous.shape[-1] != self.config.kimia_adaptor_input_dim:
                raise ConfigError(
                    f"continuous must be [B, L, {self.config.kimia_adaptor_input_dim}] aligned with audio_ids "
                    f"{tuple(audio_ids.shape)}, got {tuple(continuous.shape)}"
                )
            m = continuous_mask.to(torch.bool)[..., None]  # [B, L, 1]
            w = self.model.vq_adaptor(continuous.to(e.dtype) * m)
            sqrt2 = torch.tensor(2.0, dtype=e.dtype, device=e.device).sqrt()
            e = torch.where(m, (e + w) * sqrt2, e)
        if text_ids is not None:
            if text_ids.shape != audio_ids.shape:
                raise ConfigError(f"text_ids {tuple(text_ids.shape)} != audio_ids {tuple(audio_ids.shape)}")
            has_text = (text_ids != 0).any(dim=-1)[:, None, None]  # [B, 1, 1]
            e = torch.where(has_text, e + emb(text_ids), e)
        return e

    def scatter_continuous(
        self, audio_ids: torch.Tensor, features: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Place per-span features on the positions between this config's media markers."""
        c = self.config
        return scatter_continuous(
            audio_ids, features, media_begin=c.kimia_media_begin, media_end=c.kimia_media_end,
            dim=c.kimia_adaptor_input_dim, dtype=self.model.embed_tokens.weight.dtype,
        )

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        audio_ids: torch.Tensor,
        text_ids: torch.Tensor | None,
        positions: torch.Tensor,
        *,
        continuous: torch.Tensor | None = None,
        continuous_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        kv_len: int | None = None,
        logits_at: torch.Tensor | int | None = None,
        skip_audio: bool | None = None,
        logits_where: tuple[torch.Tensor, torch.Tensor] | None = None,
        skip_text: bool = False,
    ) -> LMOutput:
        """Teacher-forced pass over L positions of B rows.

        Args:
            audio_ids, text_ids: [B, L] long, the two id streams (`text_ids=None`: no text embedding).
            positions: [B, L] long, absolute positions (RoPE and, with a cache, the cache slots).
            continuous, continuous_mask: [B, L, Din] features and [B, L] bool mask (see `embed`).
            cache: static `KVCache` to write k/v into and attend over (positional mask; see kimia.lm.cache).
                Without a cache, attention is causal over the L inputs in index order.
            kv_len: with a cache, attend only over slots [0, kv_len) (must exceed every position).
            logits_at: None -> logits for all L positions; an int (e.g. -1) -> that index for every row;
                a [B] long tensor -> one index per row (e.g. lengths - 1 of a right-padded prefill).
            skip_audio: True skips the audio branch (mimo layers, mimo_norm, mimo_output) and its KV-cache
                writes; `audio_logits` is then None. Text logits are unaffected (the branch only reads the
                trunk). For text-only generation, where the audio stream is forced to blank; the mimo slots
                of a cache filled this way are stale, so do not later decode audio on that cache.
            skip_text: True skips the text tail (main layers after the fork, norm, lm_head) and its KV-cache
                writes; `text_logits` is then None. For spoken answers once every row's text has ended: the text
                stream is forced to blank from then on, so the tail's output (and its cache) is never read again.
            logits_where: (text_mask, audio_mask), both [B, L] bool: logits only where the mask is set, packed
                in row-major order ([N_text, V], [N_audio, V]). Training uses it to skip the two vocabulary
                projections at positions without loss (most of them); an all-False audio mask also skips the
                audio branch unless `skip_audio=False` is given (data parallel training, where every rank must
                use every parameter). Exclusive with `logits_at`.
        Returns:
            LMOutput with audio_logits (None with skip_audio), text_logits [B, L or 1, V] in fp32.
        """
        if logits_where is not None:
            if logits_at is not None:
                raise ConfigError("logits_at and logits_where are exclusive")
            if any(m.shape != audio_ids.shape or m.dtype != torch.bool for m in logits_where):
                raise ConfigError(f"logits_where masks must be bool [B, L] = {tuple(audio_ids.shape)}")
            if skip_audio is None:
                skip_audio = not bool(logits_where[1].any())
        skip_audio = bool(skip_audio)
        if audio_ids.dim() != 2 or positions.shape != audio_ids.shape:
            raise ConfigError(
                f"audio_ids and positions must both be [B, L], got {tuple(audio_ids.shape)} and {tuple(positions.shape)}"
            )
        if self.model.rotary.cos.is_meta:
            raise ConfigError("RoPE tables are on the meta device: call AudioLM.init_buffers() after loading weights")
        c = self.config
        x = self.embed(audio_ids, text_ids, continuous, continuous_mask)
        rope = self.model.rotary(positions, x.dtype)
        mask = None
        if cache is not None:
            if not torch.compiler.is_compiling():
                cache.check(positions, kv_len)
            mask = cache.attention_mask(positions, kv_len)
        elif kv_len is not None:
            raise ConfigError("kv_len is only meaningful with a cache")

        def run(layer: DecoderLayer, h: torch.Tensor, layer_cache) -> torch.Tensor:
            return layer(h, rope, positions=positions, mask=mask, cache=layer_cache)

        fork = c.kimia_mimo_transformer_from_layer_index
        for i in range(fork + 1):
            x = run(self.model.layers[i], x, cache.main(i) if cache is not None else None)
        a = x
        if not skip_audio:
            for j, layer in enumerate(self.model.mimo_layers):
                a = run(layer, a, cache.mimo(j) if cache is not None else None)
        if skip_audio and skip_text:
            raise ConfigError("skip_audio and skip_text together leave nothing to compute")
        text_logits = None
        if not skip_text:
            for i in range(fork + 1, c.num_hidden_layers):
                x = run(self.model.layers[i], x, cache.main(i) if cache is not None else None)
            if logits_at is not None:
                x = _select(x, logits_at)
            elif logits_where is not None:
                x = x[logits_where[0]]
            text_logits = self.lm_head(self.model.norm(x)).float()
        if skip_audio:
            return LMOutput(audio_logits=None, text_logits=text_logits)
        if logits_at is not None:
            a = _select(a, logits_at)
        elif logits_where is not None:
            a = a[logits_where[1]]
        audio_logits = self.mimo_output(self.model.mimo_norm(a)).float()
        return LMOutput(audio_logits=audio_logits, text_logits=text_logits)


def _select(h: torch.Tensor, at: torch.Tensor | int) -> torch.Tensor:
    """h [B, L, H] -> [B, 1, H] at index `at` (int for all rows, or [B] per row)."""
    if isinstance(at, int):
        return h[:, at : (at + 1) if at != -1 else None]
    idx = at.to(device=h.device, dtype=torch.long).view(-1, 1, 1).expand(h.shape[0], 1, h.shape[2])
    return h.gather(1, idx)


def scatter_continuous(
    audio_ids: torch.Tensor,
    features: Sequence[torch.Tensor],
    *,
    media_begin: int,
    media_end: int,
    dim: int,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay per-span continuous features out along the positions of `audio_ids` [B, L].

    The k-th `media_begin ... media_end` span (rows in order, then left to right) receives `features[k]`
    ([N_k, Din] or [1, N_k, Din]; its first `span length` vectors) on the positions strictly between the
    markers. Returns (continuous [B, L, Din] zeros elsewhere, continuous_mask [B, L] bool).
    Raises PromptError when markers are unbalanced or spans and features do not match.
    """
    b, n = audio_ids.shape
    out = torch.zeros(b, n, dim, dtype=dtype or torch.float32, device=audio_ids.device)
    mask = torch.zeros(b, n, dtype=torch.bool, device=audio_ids.device)
    ids = audio_ids.tolist()
    spans: list[tuple[int, int, int]] = []
    for r, row in enumerate(ids):
        start = None
        for t, tok in enumerate(row):
            if tok == media_begin:
                if start is not None:
                    raise PromptError(f"row {r}: media_begin at {t} inside the span opened at {start}")
                start = t
            elif tok == media_end:
                if start is None:
                    raise PromptError(f"row {r}: media_end at {t} without a media_begin")
                spans.append((r, start + 1, t))
                start = None
        if start is not None:
            raise PromptError(f"row {r}: media_begin at {start} is never closed by media_end")
    if len(spans) != len(features):
        raise PromptError(f"{len(spans)} media spans in the audio stream but {len(features)} feature tensors")
    for k, ((r, s, e), f) in enumerate(zip(spans, features)):
        f = f.reshape(-1, f.shape[-1]) if f.dim() == 3 and f.shape[0] == 1 else f
        if f.dim() != 2 or f.shape[-1] != dim:
            raise PromptError(f"feature tensor {k} must be [N, {dim}] or [1, N, {dim}], got {tuple(f.shape)}")
        if f.shape[0] < e - s:
            raise PromptError(f"feature tensor {k} has {f.shape[0]} frames but its media span holds {e - s} positions")
        out[r, s:e] = f[: e - s].to(device=out.device, dtype=out.dtype)
        mask[r, s:e] = True
    return out, mask
