"""Flow-matching DiT training recipe: (semantic ids at 12.5 Hz, 24 kHz log-mel at 50 Hz) -> velocity field.

Objective (KIMI_AUDIO.md §6.1, σ_min = 1e-4): for clean normalised mel x1, noise x0 ~ N(0, I) and t ~ U(0, 1),
x_t = t·x1 + (1 − (1 − σ)t)·x0 and the network regresses u = x1 − (1 − σ)·x0 (mean squared error).

Streaming with a prefix cache (§6.3) is trained, not just tolerated: every micro-batch draws a chunk length
(`min_chunk_tokens`..`max_chunk_tokens`) and, with probability `prefix_prob`, a prefix of already emitted
audio (1..`max_prefix_tokens`). The sequence is [prefix ; chunk]: the prefix holds the CLEAN mel at
t = `prefix_t` (0.999, as the detokenizer's cache-fill call) and attends only to itself; the chunk holds x_t
at time t and attends to [prefix ; chunk]; positions are the frames' absolute indices in the utterance. This
is exactly what the streaming detokenizer computes with its KV cache (tests check the equality), so one
masked forward trains both the first chunk (no prefix) and later chunks; the loss covers the chunk only.
(The detokenizer builds its prefix chunk by chunk, block-causally; training treats the prefix as one block.)

At inference the ids come from the LLM, which gets many of them wrong, mostly for a near code (a row close in
the tokenizer's codebook). `data.token_noise` trains for that: ids are replaced at that rate by one of their
nearest codebook rows, the mel target staying the clean one.

Mel: `kimia.detokenizer.mel` (the vocoder's input), normalised by a scalar mean/std measured on the training
data (or given), stored in the exported DiTConfig (`normalize_mel`, `mel_mean`, `mel_std`) so the streaming
detokenizer de-normalises its output. Semantic ids come from a trained semantic tokenizer folder applied to
the 16 kHz version of the same audio (or from a `semantic_ids` field of the record). Random lengths, offsets,
t and noise are drawn from torch's default generator in `collate`; the Trainer seeds it per rank and
checkpoints it, so resumed runs draw the same. Export: `save_dit` native folder (`load_dit`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kimia import audio as kaudio
from kimia.checkpoints.common import load_state_dict_strict
from kimia.detokenizer.dit import DiT, DiTConfig, apply_rope, rope_cos_sin, to_timestep
from kimia.detokenizer.loader import load_dit, save_dit
from kimia.detokenizer.mel import DEFAULT as MEL, mel_frames
from kimia.errors import ConfigError
from kimia.train.common import LossOutput, Recipe
from kimia.train.config import OptimConfig, TrainConfig, to_dict
from kimia.train.data import read_audio_manifest
from kimia.train.vocoder import SyntheticVoiced

logger = logging.getLogger(__name__)

UPSAMPLE = 4  # mel frames per semantic token (12.5 -> 50 Hz)


# ------------------------------------------------------------------------------------------ config
@dataclass
class DiTModelSpec:
    init: str = "preset:tiny"  # "preset:<name>" (random) or a native DiT folder to continue from
    overrides: dict[str, Any] = field(default_factory=dict)  # DiTConfig overrides (presets only)
    normalize_mel: bool = True
    mel_mean: float | None = None  # None: measured on the training data
    mel_std: float | None = None


@dataclass
class DiTDataSpec:
    manifests: list[str] = field(default_factory=list)
    audio_key: str = "target_audio_path"  # the spoken answers in the one output voice
    ids_key: str = "semantic_ids"  # optional precomputed ids in a record (list of ints)
    semantic_tokenizer: str | None = None  # folder for `load_semantic_tokenizer`
    synthetic: int = 0  # > 0: seeded synthetic clips (needs semantic_tokenizer)
    min_chunk_tokens: int = 4
    max_chunk_tokens: int = 30
    max_prefix_tokens: int = 30
    prefix_prob: float = 0.5
    # robustness to the LLM's codes: each 12.5 Hz id of a training sequence (prefix and chunk) is replaced
    # with probability `token_noise` by one of its `token_noise_neighbours` nearest codebook rows (squared L2
    # in the semantic tokenizer's codebook; 0 = any code, uniformly). The mel target stays the clean one.
    token_noise: float = 0.0
    token_noise_neighbours: int = 32


@dataclass
class FlowSpec:
    sigma_min: float = 1e-4
    prefix_t: float = 0.999


@dataclass
class DiTTrainConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.0))
    model: DiTModelSpec = field(default_factory=DiTModelSpec)
    data: DiTDataSpec = field(default_factory=DiTDataSpec)
    flow: FlowSpec = field(default_factory=FlowSpec)
    export_dir: str | None = None  # default: <out_dir>/export


# ------------------------------------------------------------------------------------------ model
def flow_pair(x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, sigma_min: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target velocity u) for clean x1 and noise x0 [B, T, C] at times t [B]."""
    tt = t.to(x1.dtype)[:, None, None]
    return tt * x1 + (1 - (1 - sigma_min) * tt) * x0, x1 - (1 - sigma_min) * x0


def prefix_mask(prefix: int, total: int, device=None) -> torch.Tensor:
    """[total, total] bool: prefix frames see the prefix only; chunk frames see everything."""
    i = torch.arange(total, device=device)
    return (i[None, :] < prefix) | (i[:, None] >= prefix)


def _ln(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x.float(), (x.shape[-1],), eps=1e-6).to(x.dtype)


def masked_dit_forward(dit: DiT, x: torch.Tensor, cond: torch.Tensor, positions: torch.Tensor,
                       mask: torch.Tensor | None) -> torch.Tensor:
    """The DiT's computation with a per-frame condition and an attention mask (training path).

    x [B, L, 80]; cond [B, L, D] (t-embedding + token embedding per frame); positions [B, L]; mask [L, L]
    bool (True = may attend) or None. Returns the velocity [B, L, 80]. Same parameters and maths as
    `DiT.forward`, whose attention takes no mask (the inference path separates chunks with its KV cache).
    """
    B, L, _ = x.shape
    cfg = dit.cfg
    H, hd = cfg.num_heads, cfg.head_dim
    h = dit.input_linear(x)
    cos, sin = rope_cos_sin(cfg, positions)
    for blk in dit.blocks:
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = blk.adaLN_modulation(cond).chunk(6, dim=-1)
        a = _ln(h) * (1 + sc_a) + sh_a
        q, k, v = blk.attn.qkv(a).view(B, L, 3, H, hd).unbind(2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        h = h + g_a * blk.attn.proj(o.transpose(1, 2).reshape(B, L, -1))
        h = h + g_m * blk.mlp(_ln(h) * (1 + sc_m) + sh_m)
    shift, scale = dit.final_layer.adaLN_modulation(cond).chunk(2, dim=-1)
    return dit.final_layer.linear(_ln(h) * (1 + scale) + shift)


class FlowMatchingDiT(nn.Module):
    """DiT (`dit.*`) + mel normalisation buffers; `forward(batch fields)` returns the flow-matching loss."""

    def __init__(self, cfg: DiTConfig, flow: FlowSpec):
        super().__init__()
        self.dit = DiT(cfg)
        self.flow = flow
        self.register_buffer("mel_mean", torch.zeros(()))
        self.register_buffer("mel_std", torch.ones(()))

    def forward(self, mel: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, t: torch.Tensor,
                noise: torch.Tensor, prefix: int) -> dict[str, torch.Tensor]:
        """mel [B, L, 80] clean log-mel, tokens [B, L] (50 Hz), positions [B, L], t [B], noise [B, L - prefix, 80]."""
        B, L, _ = mel.shape
        x1 = (mel.float() - self.mel_mean) / self.mel_std
        xt, u = flow_pair(x1[:, prefix:], noise.float(), t, self.flow.sigma_min)
        x = torch.cat([x1[:, :prefix], xt], dim=1)
        te_chunk = self.dit.t_embedder(to_timestep(t, B, t.device))
        emb = self.dit.condition_tokens(tokens)
        cond_chunk = emb[:, prefix:] + te_chunk[:, None]
        if prefix:
            te_prefix = self.dit.t_embedder(to_timestep(self.flow.prefix_t, B, t.device))
            cond = torch.cat([emb[:, :prefix] + te_prefix[:, None], cond_chunk], dim=1)
            mask = prefix_mask(prefix, L, mel.device)
        else:
            cond, mask = cond_chunk, None
        v = masked_dit_forward(self.dit, x.to(self.dit.input_linear.weight.dtype), cond, positions, mask)
        loss = F.mse_loss(v[:, prefix:].float(), u)
        return {"loss": loss}


def init_dit_weights(dit: DiT, generator: torch.Generator) -> None:
    """Xavier-uniform linears, N(0, 0.02) embeddings, zero adaLN modulations and output (adaLN-Zero)."""
    with torch.no_grad():
        for m in dit.modules():
            if isinstance(m, nn.Linear):
                bound = (6.0 / (m.in_features + m.out_features)) ** 0.5
                m.weight.uniform_(-bound, bound, generator=generator)
                m.bias.zero_()
        dit.semantic_token_embedding.weight.normal_(0.0, 0.02, generator=generator)
        for m in dit.t_embedder.mlp:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 0.02, generator=generator)
        for blk in dit.blocks:
            blk.adaLN_modulation[-1].weight.zero_()
            blk.adaLN_modulation[-1].bias.zero_()
        dit.final_layer.adaLN_modulation[-1].weight.zero_()
        dit.final_layer.adaLN_modulation[-1].bias.zero_()
        dit.final_layer.linear.weight.zero_()
        dit.final_layer.linear.bias.zero_()


# ------------------------------------------------------------------------------------------ data
@dataclass
class DiTBatch:
    mel: torch.Tensor  # [B, L, 80]
    tokens: torch.Tensor  # [B, L]
    positions: torch.Tensor  # [B, L]
    t: torch.Tensor  # [B]
    noise: torch.Tensor  # [B, L - prefix, 80]
    prefix: int = 0


def align(ids: torch.Tensor, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Trim ids [N] and mel [T, 80] to n = min(N, T // 4) tokens and 4n frames."""
    n = min(ids.shape[0], mel.shape[0] // UPSAMPLE)
    return ids[:n].long(), mel[: n * UPSAMPLE].float()


def make_pairs(waves24: Sequence[torch.Tensor], tokenizer: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(semantic ids of the 16 kHz resample, 24 kHz mel frames) per waveform."""
    out = []
    for w in waves24:
        w16 = kaudio.load_audio(w.numpy(), sr=MEL.sample_rate)
        ids = tokenizer(w16)[0]
        out.append(align(ids, mel_frames(w)))
    return out


# ------------------------------------------------------------------------------------------ recipe
class DiTRecipe(Recipe):
    name = "dit"

    def __init__(self, cfg: DiTTrainConfig, dataset: Sequence | None = None):
        self.cfg = cfg
        d = cfg.data
        if not 1 <= d.min_chunk_tokens <= d.max_chunk_tokens or d.max_prefix_tokens < 0 or not 0 <= d.prefix_prob <= 1:
            raise ConfigError("data: need 1 <= min_chunk_tokens <= max_chunk_tokens, max_prefix_tokens >= 0, "
                              "0 <= prefix_prob <= 1")
        if not 0 <= d.token_noise <= 1 or d.token_noise_neighbours < 0:
            raise ConfigError("data: need 0 <= token_noise <= 1 and token_noise_neighbours >= 0")
        if d.token_noise > 0 and d.token_noise_neighbours > 0 and not d.semantic_tokenizer:
            raise ConfigError("data.token_noise with token_noise_neighbours > 0 needs data.semantic_tokenizer (its "
                              "codebook says which codes are near); set token_noise_neighbours: 0 for uniform codes")
        self._dataset = dataset
        self._neighbours: torch.Tensor | None = None
        self.init_folder: Path | None = None
        self._tokenizer = None
        init = cfg.model.init
        if init.startswith("preset:"):
            base = DiTConfig.from_name(init.split(":", 1)[1]).to_dict()
            base.update(cfg.model.overrides)
            if d.semantic_tokenizer and "semantic_vocab_size" not in cfg.model.overrides:
                base["semantic_vocab_size"] = self.tokenizer().encoder.cfg.quantize_vocab_size
            self.dit_cfg = DiTConfig.from_dict(base)
        else:
            self.init_folder = Path(init)
            if cfg.model.overrides:
                raise ConfigError("model.overrides only apply to presets (a folder's architecture is fixed)")
            self.dit_cfg = load_dit(self.init_folder).cfg
        if d.semantic_tokenizer:
            V = self.tokenizer().encoder.cfg.quantize_vocab_size
            if V > self.dit_cfg.semantic_vocab_size:
                raise ConfigError(f"the semantic tokenizer has {V} codes but the DiT only "
                                  f"{self.dit_cfg.semantic_vocab_size} token embeddings")

    def tokenizer(self):
        if self._tokenizer is None:
            from kimia.encoders.semantic import load_semantic_tokenizer

            self._tokenizer = load_semantic_tokenizer(self.cfg.data.semantic_tokenizer, device="cpu")
        return self._tokenizer

    def neighbours(self) -> torch.Tensor:
        """[V, k] ids of each code's k nearest other codebook rows (squared L2), nearest first."""
        if self._neighbours is None:
            cb = self.tokenizer().encoder.codebook.weight.detach().float()
            k = min(self.cfg.data.token_noise_neighbours, cb.shape[0] - 1)
            d2 = (cb * cb).sum(1)[:, None] + (cb * cb).sum(1)[None, :] - 2 * cb @ cb.T
            d2.fill_diagonal_(float("inf"))
            self._neighbours = d2.topk(k, dim=1, largest=False).indices
        return self._neighbours

    def corrupt(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [n] with each entry replaced by probability `data.token_noise` (draws: torch's default generator)."""
        d = self.cfg.data
        hit = torch.rand(ids.shape[0]) < d.token_noise
        if d.token_noise_neighbours > 0:
            table = self.neighbours()
            other = table[ids, torch.randint(0, table.shape[1], ids.shape)]
        else:  # the codes the tokenizer makes (the DiT may have more embedding rows)
            V = self.tokenizer().encoder.cfg.quantize_vocab_size if d.semantic_tokenizer else self.dit_cfg.semantic_vocab_size
            other = torch.randint(0, V, ids.shape)
        return torch.where(hit, other, ids)

    def dataset(self) -> Sequence:
        if self._dataset is None:
            d = self.cfg.data
            if d.synthetic > 0:
                if not d.semantic_tokenizer:
                    raise ConfigError("data.synthetic needs data.semantic_tokenizer")
                src = SyntheticVoiced(d.synthetic, seed=self.cfg.train.seed, seconds=2.0)
                self._dataset = make_pairs([src[i] for i in range(len(src))], self.tokenizer())
            elif d.manifests:
                self._dataset = self._manifest_pairs()
            else:
                raise ConfigError("data.manifests is empty and data.synthetic is 0: nothing to train on")
            short = min(ids.shape[0] for ids, _ in self._dataset)
            if short < d.min_chunk_tokens:
                raise ConfigError(f"an utterance has {short} tokens, fewer than data.min_chunk_tokens")
        return self._dataset

    def _manifest_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        d = self.cfg.data
        recs = read_audio_manifest(d.manifests, [d.audio_key])
        pairs = []
        for r in recs:
            w = kaudio.load_audio(r[d.audio_key], target_sr=MEL.sample_rate)
            if isinstance(r.get(d.ids_key), list):
                pairs.append(align(torch.tensor(r[d.ids_key]), mel_frames(w)))
            elif d.semantic_tokenizer:
                pairs.extend(make_pairs([w], self.tokenizer()))
            else:
                raise ConfigError(f"record {r.get('index')} has no {d.ids_key!r} and data.semantic_tokenizer is unset")
        logger.info("DiT data: %d utterances, %.1f s of audio", len(pairs),
                    sum(m.shape[0] for _, m in pairs) / MEL.sample_rate * MEL.hop_size)
        return pairs

    def mel_stats(self) -> tuple[float, float]:
        m = self.cfg.model
        if not m.normalize_mel:
            return 0.0, 1.0
        if m.mel_mean is not None and m.mel_std is not None:
            return m.mel_mean, m.mel_std
        allm = torch.cat([mel.flatten() for _, mel in self.dataset()])
        return float(allm.mean()), float(allm.std())

    def build_model(self, device: torch.device) -> nn.Module:
        model = FlowMatchingDiT(self.dit_cfg, self.cfg.flow)
        if self.init_folder is not None:
            # fp32 master weights whatever the folder stores (a shipped folder is fp16)
            model.dit = load_dit(self.init_folder, dtype=torch.float32).requires_grad_(True).train()
            if self.dit_cfg.normalize_mel:
                model.mel_mean.fill_(float(self.dit_cfg.mel_mean))
                model.mel_std.fill_(float(self.dit_cfg.mel_std))
        else:
            init_dit_weights(model.dit, torch.Generator().manual_seed(self.cfg.train.seed))
            mean, std = self.mel_stats()
            model.mel_mean.fill_(mean)
            model.mel_std.fill_(std)
        n = sum(p.numel() for p in model.parameters())
        logger.info("DiT: %.2f M parameters, mel mean %.3f std %.3f", n / 1e6, float(model.mel_mean),
                    float(model.mel_std))
        return model.to(device)

    def fsdp_modules(self, model: nn.Module) -> list[nn.Module]:
        return list(model.dit.blocks)

    def collate(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> DiTBatch:
        d = self.cfg.data
        shortest = min(ids.shape[0] for ids, _ in items)
        hi = min(d.max_chunk_tokens, shortest)
        lo = min(d.min_chunk_tokens, hi)
        c = int(torch.randint(lo, hi + 1, ()))
        p = 0
        if shortest > c and d.max_prefix_tokens > 0 and float(torch.rand(())) < d.prefix_prob:
            p = int(torch.randint(1, min(d.max_prefix_tokens, shortest - c) + 1, ()))
        mels, toks, pos = [], [], []
        for ids, mel in items:
            s = int(torch.randint(p, ids.shape[0] - c + 1, ()))  # chunk start (tokens)
            a, b = (s - p) * UPSAMPLE, (s + c) * UPSAMPLE
            mels.append(mel[a:b])
            seq = ids[s - p : s + c]
            if d.token_noise > 0:
                seq = self.corrupt(seq)
            toks.append(seq.repeat_interleave(UPSAMPLE))
            base = min(a, self.dit_cfg.max_positions - (b - a))
            pos.append(torch.arange(base, base + b - a))
        B = len(items)
        return DiTBatch(mel=torch.stack(mels), tokens=torch.stack(toks), positions=torch.stack(pos),
                        t=torch.rand(B), noise=torch.randn(B, c * UPSAMPLE, MEL.num_mels), prefix=p * UPSAMPLE)

    def loss(self, model: nn.Module, batch: DiTBatch, phase: str) -> LossOutput:
        out = model(batch.mel, batch.tokens, batch.positions, batch.t, batch.noise, batch.prefix)
        return LossOutput(out["loss"], tokens=batch.noise.shape[0] * batch.noise.shape[1],
                          metrics={"prefix_frames": float(batch.prefix)})

    def export(self, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
        sd = {k[len("dit."):]: v for k, v in state_dict.items() if k.startswith("dit.")}
        cfg = self.dit_cfg.to_dict()
        if self.cfg.model.normalize_mel:
            cfg.update(normalize_mel=True, mel_mean=float(state_dict["mel_mean"]), mel_std=float(state_dict["mel_std"]))
        else:
            cfg.update(normalize_mel=False, mel_mean=None, mel_std=None)
        with torch.device("meta"):
            dit = DiT(DiTConfig.from_dict(cfg))
        load_state_dict_strict(dit, sd, source="trained DiT state", assign=True)
        save_dit(dit, folder)
        logger.info("exported DiT to %s", folder)

    def config_dict(self) -> dict[str, Any]:
        return to_dict(self.cfg)


def train_dit(cfg: DiTTrainConfig, dataset: Sequence | None = None, env=None):
    """Build the recipe and trainer, train, export when the run is complete; returns (trainer, history)."""
    from kimia.train.common import run_recipe

    return run_recipe(DiTRecipe(cfg, dataset), cfg, env)


__all__ = ["DiTTrainConfig", "DiTModelSpec", "DiTDataSpec", "FlowSpec", "FlowMatchingDiT", "DiTRecipe", "DiTBatch",
           "flow_pair", "prefix_mask", "masked_dit_forward", "init_dit_weights", "align", "make_pairs", "train_dit"]
