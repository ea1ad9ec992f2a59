"""Flow-matching DiT of the Kimi-Audio detokenizer (semantic tokens -> 80-bin mel velocity field).

The network predicts the flow-matching velocity for a chunk of noisy mel frames, conditioned per frame on
the diffusion time and on the semantic token of that frame (tokens are already upsampled 12.5 -> 50 Hz).
It is an adaLN-Zero DiT whose modulation is computed PER TOKEN (condition = time embedding + token
embedding), with interleaved-pair ("complex") RoPE on absolute positions and non-causal attention of
the current chunk over [prefix cache ; current chunk]. The prefix cache holds the keys/values of the
already emitted audio (block-causal streaming) and lives in `DiTKVCache`, a preallocated buffer with a
length counter: the hot path writes into slices, never concatenates.

Parameter names follow the release checkpoint (`audio_detokenizer/model.pt`, prefix `speech_model.`) so
weights load strictly without renaming.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from kimia.errors import BudgetError, ConfigError

MEL_BINS = 80
TIMESTEP_FREQ_DIM = 256


@dataclass
class DiTConfig:
    """Fields of `model.dit` in the release's `audio_detokenizer/config.yaml` (+ top-level mel stats)."""

    input_size: int = 80
    semantic_vocab_size: int = 16384  # codebook size; the embedding has one more row (unused CFG token)
    hidden_size: int = 2304
    depth: int = 16
    num_heads: int = 18
    mlp_ratio: float = 4.0
    ffn_type: str = "vanilla_mlp"
    use_rope: bool = True
    rope_params: dict = field(
        default_factory=lambda: {"max_position_embeddings": 4096, "rope_base": 10000.0, "rope_interpolation_factor": 1.0}
    )
    position_embedding_type: str = "skip"
    max_seq_len: int = 4096
    normalize_mel: bool = False
    mel_mean: float | list | None = None
    mel_std: float | list | None = None

    def __post_init__(self) -> None:
        if self.ffn_type != "vanilla_mlp":
            raise ConfigError(f"DiT ffn_type {self.ffn_type!r} is not supported (only 'vanilla_mlp')")
        if self.position_embedding_type != "skip":
            raise ConfigError(
                f"DiT position_embedding_type {self.position_embedding_type!r} is not supported (only 'skip' + RoPE)"
            )
        if not self.use_rope:
            raise ConfigError("DiT without RoPE is not supported (use_rope must be true)")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(
                f"DiT hidden_size {self.hidden_size} must split into {self.num_heads} heads of even size (RoPE)"
            )
        if self.input_size != MEL_BINS:
            raise ConfigError(f"DiT input_size must be {MEL_BINS} mel bins, got {self.input_size}")
        if self.normalize_mel and (self.mel_mean is None or self.mel_std is None):
            raise ConfigError("DiT normalize_mel is set but mel_mean/mel_std are missing")
        rp = dict(self.rope_params or {})
        rp.setdefault("max_position_embeddings", 4096)
        rp.setdefault("rope_base", 10000.0)
        rp.setdefault("rope_interpolation_factor", 1.0)
        self.rope_params = rp

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_positions(self) -> int:
        """Number of RoPE positions the release can address (its table is truncated to max_seq_len)."""
        return min(int(self.rope_params["max_position_embeddings"]), int(self.max_seq_len))

    @classmethod
    def from_name(cls, name: str) -> "DiTConfig":
        if name not in DIT_PRESETS:
            raise ConfigError(f"unknown DiT preset {name!r}; known: {sorted(DIT_PRESETS)}")
        return cls(**DIT_PRESETS[name])

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        """Build from a `model.dit` mapping (+ mel stats); unknown keys (ffn_gated_glu, ...) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


DIT_PRESETS: dict[str, dict] = {
    # the reference fixture's tiny DiT
    "tiny": dict(semantic_vocab_size=1024, hidden_size=64, depth=2, num_heads=4, mlp_ratio=2.0),
    # ~50M parameters: a trainable/benchmarkable middle size
    "small": dict(semantic_vocab_size=16384, hidden_size=512, depth=9, num_heads=8, mlp_ratio=4.0),
    # the release (1.58 B parameters)
    "kimi-audio": dict(semantic_vocab_size=16384, hidden_size=2304, depth=16, num_heads=18, mlp_ratio=4.0),
}


class DiTKVCache:
    """Per-layer prefix keys/values of a batch of streams, preallocated as [B, H, capacity, hd].

    `length` frames are committed. A forward pass writes its chunk at [length, length + T) and attends
    over [0, length + T); `commit(T)` makes the last pass's chunk part of the prefix, `trim(n)` keeps the
    newest n committed frames (one copy per chunk, not per step).
    """

    def __init__(self, cfg: DiTConfig, batch: int, capacity: int, device=None, dtype=torch.float32):
        self.cfg, self.batch, self.device, self.dtype = cfg, batch, device, dtype
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.capacity = 0
        self.length = 0
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        shape = (self.batch, self.cfg.num_heads, capacity, self.cfg.head_dim)
        new_k = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.cfg.depth)]
        new_v = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.cfg.depth)]
        for old, new in zip(self.k + self.v, new_k + new_v):
            new[:, :, : self.length] = old[:, :, : self.length]
        self.k, self.v, self.capacity = new_k, new_v, capacity

    def ensure(self, chunk: int) -> None:
        """Make room for a chunk of `chunk` frames after the committed prefix (rare reallocation)."""
        if self.length + chunk > self.capacity:
            self._alloc(self.length + chunk)

    def commit(self, n: int) -> None:
        self.length += n

    def trim(self, keep: int) -> None:
        if self.length > keep:
            start = self.length - keep
            for buf in self.k + self.v:
                buf[:, :, :keep] = buf[:, :, start : self.length].clone()
            self.length = keep

    def reset(self) -> None:
        self.length = 0

    def snapshot(self) -> tuple[int, list[torch.Tensor], list[torch.Tensor]]:
        n = self.length
        return n, [k[:, :, :n].clone() for k in self.k], [v[:, :, :n].clone() for v in self.v]

    def restore(self, snap: tuple[int, list[torch.Tensor], list[torch.Tensor]]) -> None:
        n, ks, vs = snap
        self.length = 0
        self.ensure(n)
        for buf, src in zip(self.k + self.v, ks + vs):
            buf[:, :, :n] = src
        self.length = n


def timestep_embedding(timesteps: torch.Tensor, dim: int = TIMESTEP_FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """[B] integer-valued timesteps -> [B, dim] fp32 sinusoids laid out as [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def to_timestep(t: torch.Tensor | float, batch: int, device=None) -> torch.Tensor:
    """Flow time t in [0, 1] (scalar or [batch]) -> integer timesteps floor(t * 1000) in fp32, shape [batch]."""
    ts = (torch.as_tensor(t, dtype=torch.float32, device=device) * 1000).long().reshape(-1)
    return ts.expand(batch) if ts.numel() == 1 else ts


def rope_cos_sin(cfg: DiTConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute positions [B, T] -> fp32 cos, sin of shape [B, T, 1, head_dim/2] (pairs = complex numbers)."""
    hd = cfg.head_dim
    rp = cfg.rope_params
    inv = 1.0 / (float(rp["rope_base"]) ** (torch.arange(0, hd, 2, device=positions.device)[: hd // 2].float() / hd))
    pos = positions.float() * (1.0 / float(rp["rope_interpolation_factor"]))
    ang = pos[..., None] * inv
    return torch.cos(ang)[:, :, None, :], torch.sin(ang)[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x [B, T, H, hd] by the angles; fp32 math, dtype kept."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    return out.to(x.dtype)


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x.float(), (x.shape[-1],), eps=1e-6).to(x.dtype)


def _runs(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """View frames x [B, T, D] as [B, Tc, r, D] so a condition [B, Tc, 1, D] that is constant over runs
    of r = T / Tc frames broadcasts onto them (r = 1: one condition per frame)."""
    return x.view(x.shape[0], c.shape[1], -1, x.shape[-1])


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, T, D], shift/scale [B, Tc, 1, D] -> x * (1 + scale) + shift, [B, T, D]."""
    return (_runs(x, shift) * (1 + scale) + shift).flatten(1, 2)


def _gate(gate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (gate * _runs(x, gate)).flatten(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = TIMESTEP_FREQ_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        """timesteps [B] (integers 0..1000) -> [B, D]."""
        emb = timestep_embedding(timesteps, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, cos, sin, cache: DiTKVCache | None = None, layer: int = 0) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]; attends (non-causally) over [cache[:length] ; this chunk]."""
        B, T, D = x.shape
        H, hd = self.cfg.num_heads, self.cfg.head_dim
        q, k, v = self.qkv(x).view(B, T, 3, H, hd).unbind(2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, hd]
        if cache is not None:
            n = cache.length
            cache.k[layer][:, :, n : n + T] = k
            cache.v[layer][:, :, n : n + T] = v
            k = cache.k[layer][:, :, : n + T]
            v = cache.v[layer][:, :, : n + T]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.attn = Attention(cfg)
        self.mlp = Mlp(D, int(D * cfg.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x, c, cos, sin, cache=None, layer=0):
        """x [B, T, D], c [B, Tc, D] (condition per run of T/Tc frames) -> [B, T, D]."""
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = self.adaLN_modulation(c).unsqueeze(2).chunk(6, dim=-1)
        x = x + _gate(g_a, self.attn(_modulate(_layer_norm(x), sh_a, sc_a), cos, sin, cache, layer))
        return x + _gate(g_m, self.mlp(_modulate(_layer_norm(x), sh_m, sc_m)))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out: int):
        super().__init__()
        self.linear = nn.Linear(hidden, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).unsqueeze(2).chunk(2, dim=-1)
        return self.linear(_modulate(_layer_norm(x), shift, scale))


class DiT(nn.Module):
    """The detokenizer's velocity network (release name `DiTPrefix`)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.t_embedder = TimestepEmbedder(D)
        self.semantic_token_embedding = nn.Embedding(cfg.semantic_vocab_size + 1, D)
        self.input_linear = nn.Linear(cfg.input_size, D)
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(D, cfg.input_size)

    def new_cache(self, batch: int, capacity: int, device=None, dtype=None) -> DiTKVCache:
        p = self.input_linear.weight
        return DiTKVCache(self.cfg, batch, capacity, device=device or p.device, dtype=dtype or p.dtype)

    def check_positions(self, last: int) -> None:
        """Raise BudgetError if absolute position `last` is beyond the model's RoPE table."""
        if last >= self.cfg.max_positions:
            raise BudgetError(f"DiT position {last} exceeds the model's {self.cfg.max_positions} positions")

    def condition_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] (0..vocab) -> token part of the condition [B, T, D] (constant over ODE steps)."""
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) > self.cfg.semantic_vocab_size):
            raise ConfigError(
                f"semantic token ids must be in [0, {self.cfg.semantic_vocab_size}], got "
                f"[{int(tokens.min())}, {int(tokens.max())}]"
            )
        return self.semantic_token_embedding(tokens)

    def forward(
        self,
        x: torch.Tensor,
        tokens: torch.Tensor,
        timesteps: torch.Tensor,
        positions: torch.Tensor,
        cache: DiTKVCache | None = None,
        token_emb: torch.Tensor | None = None,
        cond_rate: int = 1,
    ) -> torch.Tensor:
        """Velocity for one chunk.

        x [B, T, 80] noisy (normalised) mel; tokens [B, T] semantic ids at 50 Hz; timesteps [B] integer
        diffusion steps floor(t*1000); positions [B, T] absolute RoPE positions; cache: prefix K/V
        (this chunk's K/V are written after its committed frames, not committed).
        cond_rate r: the caller guarantees tokens are constant over aligned runs of r frames (the x4
        upsampling), so the per-token adaLN modulations are computed once per run (r times fewer; the
        values are identical). token_emb: optional precomputed `condition_tokens(tokens[:, ::r])`
        [B, T/r, D], constant over the ODE steps. Returns [B, T, 80].
        """
        T = x.shape[1]
        if T % cond_rate:
            raise ConfigError(f"chunk of {T} frames is not made of runs of cond_rate={cond_rate} frames")
        # checked here only for CPU tensors (free); on accelerators the caller checks with Python ints
        # (`check_positions`) so the per-step hot path has no host sync
        if positions.device.type == "cpu" and positions.numel():
            self.check_positions(int(positions.max()))
        if cache is not None:
            cache.ensure(T)
        emb = token_emb if token_emb is not None else self.condition_tokens(tokens[:, ::cond_rate])
        c = self.t_embedder(timesteps)[:, None, :] + emb  # [B, T/r, D]
        h = self.input_linear(x)
        cos, sin = rope_cos_sin(self.cfg, positions)
        for i, block in enumerate(self.blocks):
            h = block(h, c, cos, sin, cache, i)
        return self.final_layer(h, c)


def count_params(cfg: DiTConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in DiT(cfg).parameters())
