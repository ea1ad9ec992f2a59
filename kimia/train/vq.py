"""Semantic VQ tokenizer training recipe: a pretrained Whisper encoder cut after k layers, average-pooled x4,
an EMA codebook, trained with an ASR objective (as GLM-4-Voice's tokenizer was made, KIMI_AUDIO.md §2.1).

Model (`SemanticVQModel`):
- `encoder`: the inference `SemanticEncoder` (causal convs, block-causal attention, k layers, avg-pool x4,
  nearest-code VQ). `model.init: whisper:<name|path>` copies conv1/conv2/positions/layers[:k] from a
  Whisper encoder (the packaged `base`: 80 mels, 512 wide); the convs were trained non-causal, so the first
  steps adapt them to the causal 2-frame left context. `preset:<name>` starts from random weights.
- Vector quantizer with an EMA codebook (not an optimizer parameter): decay 0.99, Laplace-smoothed counts,
  data initialisation by k-means on the first batch, dead-code restarts every `restart_interval` updates
  (codes whose EMA count fell below `restart_threshold` take random encoder outputs of the batch), a
  straight-through estimator, commitment loss 0.25 * ||z - sg(e)||^2 scaled by `loss_scale` (GLM: 10).
- `model.freeze_encoder` keeps the encoder exactly as initialised (e.g. the packaged Whisper layers with their
  own centred convolutions, `model.causal: false`): the codebook is then an online k-means of its pooled
  features and the CTC head only measures how much of the transcript the codes still carry.
- ASR head (training only): learned positions (the quantized vectors carry none) + `head_layers` Whisper
  encoder layers over the 12.5 Hz sequence + a linear layer emitting `head_upsample` CTC frames per token
  (12.5 Hz is slower than speech characters), CTC over lower-case characters (`CHARS`, blank 0).
Under torchrun the codebook statistics are all-reduced and initialisation/restarts are decided on rank 0
and broadcast, so every rank holds the same codebook.

Data: jsonl manifests with `audio_path` (16 kHz input speech) and `text` (the transcript), or seeded synthetic
"tone alphabet" clips. Features are the exact inference front end (`SemanticTokenizer.features`: padded to a
multiple of 1280 samples, Whisper log-mel, frame mask). Export writes a `glm-4-voice-tokenizer`-layout folder
(config.json with the WhisperVQ fields + model.safetensors) that `load_semantic_tokenizer` loads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kimia import audio as kaudio
from kimia.checkpoints.common import load_state_dict_strict, save_safetensors
from kimia.encoders.layers import EncoderLayer, LayerNorm, init_encoder_weights
from kimia.encoders.semantic import HOP_LENGTH, SemanticEncoder, SemanticTokenizerConfig, block_causal_mask, nearest_code
from kimia.errors import ConfigError
from kimia.train.common import LossOutput, Recipe
from kimia.train.config import OptimConfig, TrainConfig, to_dict
from kimia.train.data import read_audio_manifest

logger = logging.getLogger(__name__)

CHARS = " abcdefghijklmnopqrstuvwxyz'0123456789"  # CTC classes 1..len; 0 is the blank


def encode_text(text: str) -> list[int]:
    """Transcript -> CTC label ids: NFKD-folded to ASCII, lower-cased, runs of spaces collapsed, other
    characters dropped."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    out: list[int] = []
    for ch in folded:
        ch = " " if ch.isspace() or ch == "-" else ch
        i = CHARS.find(ch)
        if i < 0 or (ch == " " and (not out or out[-1] == 1)):
            continue
        out.append(i + 1)
    while out and out[-1] == 1:
        out.pop()
    return out


def decode_ctc(ids: Sequence[int]) -> str:
    """Greedy CTC frame ids -> text (merge repeats, drop blanks)."""
    out, prev = [], 0
    for i in ids:
        if i != prev and i != 0:
            out.append(CHARS[i - 1])
        prev = i
    return "".join(out)


# ------------------------------------------------------------------------------------------ config
@dataclass
class VQModelSpec:
    init: str = "preset:tiny"  # "whisper:<base|tiny.en|path>" (pretrained) or "preset:<name>" (random)
    layers: int = 4  # Whisper layers kept before pooling/VQ (whisper init only)
    codebook_size: int = 4096
    block_size: int | None = 200  # block-causal attention block in 50 Hz frames (None: full attention)
    overrides: dict[str, Any] = field(default_factory=dict)  # SemanticTokenizerConfig overrides (presets)
    head_layers: int = 2
    head_upsample: int = 4  # CTC frames per 12.5 Hz token
    freeze_encoder: bool = False  # keep the (Whisper) encoder exact: only the codebook (EMA) and the CTC head learn
    causal: bool = True  # causal convolutions (GLM-4-Voice); False keeps Whisper's centred ones (frozen Whisper)


@dataclass
class VQSpec:
    ema_decay: float = 0.99
    commitment: float = 0.25
    loss_scale: float = 10.0
    restart_interval: int = 100  # codebook updates between dead-code restarts (0: never)
    restart_threshold: float = 1.0  # EMA count under which a code is dead
    kmeans_iters: int = 10
    eps: float = 1e-5


@dataclass
class VQDataSpec:
    manifests: list[str] = field(default_factory=list)
    audio_key: str = "audio_path"
    text_key: str = "text"
    synthetic: int = 0  # > 0: this many seeded "tone alphabet" clips instead of manifests
    max_seconds: float = 30.0


@dataclass
class VQTrainConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    model: VQModelSpec = field(default_factory=VQModelSpec)
    vq: VQSpec = field(default_factory=VQSpec)
    data: VQDataSpec = field(default_factory=VQDataSpec)
    export_dir: str | None = None  # default: <out_dir>/export


# ------------------------------------------------------------------------------------------ model
def _dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SemanticVQModel(nn.Module):
    """SemanticEncoder + EMA vector quantizer + CTC head; `forward` returns the losses of one batch."""

    def __init__(self, cfg: SemanticTokenizerConfig, vq: VQSpec, head_layers: int, head_upsample: int):
        super().__init__()
        if cfg.pooling_position != cfg.quantize_position:
            raise ConfigError("the VQ recipe pools right before the quantizer (pooling_position == quantize_position)")
        self.cfg, self.vq, self.upsample = cfg, vq, head_upsample
        self.encoder = SemanticEncoder(cfg)
        self.encoder.codebook.weight.requires_grad_(False)  # EMA-updated, never by the optimizer
        V, D = cfg.quantize_vocab_size, cfg.d_model
        self.register_buffer("ema_count", torch.zeros(V))
        self.register_buffer("ema_weight", torch.zeros(V, D))
        self.register_buffer("vq_updates", torch.zeros((), dtype=torch.long))
        tokens = -(-cfg.max_source_positions // cfg.pooling_kernel_size)
        self.head_positions = nn.Embedding(tokens, D)
        self.head = nn.ModuleList(EncoderLayer(D, cfg.n_heads, cfg.ffn_dim) for _ in range(head_layers))
        self.head_norm = LayerNorm(D)
        self.head_out = nn.Linear(D, head_upsample * (len(CHARS) + 1))

    # ---- quantizer ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _broadcast(self, *tensors: torch.Tensor) -> None:
        if _dist():
            for t in tensors:
                dist.broadcast(t, 0)

    @torch.no_grad()
    def init_codebook(self, z: torch.Tensor) -> None:
        """Data init: k-means (Lloyd, `kmeans_iters`) of the batch vectors z [N, D] (rank 0, broadcast)."""
        V = self.cfg.quantize_vocab_size
        idx = torch.randint(0, z.shape[0], (V,), device=z.device)
        c = z[idx] + 1e-3 * z.std() * torch.randn(V, z.shape[1], device=z.device)
        for _ in range(self.vq.kmeans_iters):
            a = nearest_code(z, c)
            n = torch.bincount(a, minlength=V).float()
            s = torch.zeros_like(c).index_add_(0, a, z)
            hit = n > 0
            c[hit] = s[hit] / n[hit, None]
        self._broadcast(c)
        self.encoder.codebook.weight.copy_(c)
        self.ema_weight.copy_(c)
        self.ema_count.fill_(1.0)

    @torch.no_grad()
    def ema_update(self, z: torch.Tensor, ids: torch.Tensor) -> None:
        """One EMA step with the batch vectors z [N, D] and their codes ids [N] (all ranks' statistics)."""
        V, d = self.cfg.quantize_vocab_size, self.vq.ema_decay
        n = torch.bincount(ids, minlength=V).float()
        s = torch.zeros_like(self.ema_weight).index_add_(0, ids, z)
        if _dist():
            dist.all_reduce(n)
            dist.all_reduce(s)
        self.ema_count.mul_(d).add_(n, alpha=1 - d)
        self.ema_weight.mul_(d).add_(s, alpha=1 - d)
        total = self.ema_count.sum()
        count = (self.ema_count + self.vq.eps) / (total + V * self.vq.eps) * total  # Laplace smoothing
        self.encoder.codebook.weight.copy_(self.ema_weight / count[:, None])
        self.vq_updates += 1
        every = self.vq.restart_interval
        if every > 0 and int(self.vq_updates) % every == 0:
            self.restart_dead(z)

    @torch.no_grad()
    def restart_dead(self, z: torch.Tensor) -> int:
        """Codes with EMA count < restart_threshold take random batch vectors (rank 0's batch). Returns count."""
        dead = (self.ema_count < self.vq.restart_threshold).float()
        self._broadcast(dead)
        mask = dead.bool()
        k = int(mask.sum())
        if k:
            new = z[torch.randint(0, z.shape[0], (k,), device=z.device)]
            full = torch.zeros_like(self.ema_weight)
            full[mask] = new
            self._broadcast(full)
            self.encoder.codebook.weight[mask] = full[mask]
            self.ema_weight[mask] = full[mask]
            self.ema_count[mask] = 1.0
            logger.info("VQ: restarted %d dead codes", k)
        return k

    # ---- forward -----------------------------------------------------------------------------------------
    def forward(self, mel: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, label_lengths: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        """mel [B, n_mels, F], mask [B, F], labels [B, L] (CTC ids, 0-padded), label_lengths [B].

        Returns {"loss", "ctc", "commit", "perplexity", "used"}: loss = ctc + loss_scale * commitment * commit.
        """
        frozen = not any(p.requires_grad for p in self.encoder.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            out = self.encoder(mel, mask)
        z, valid = out.pooled.float(), out.mask  # [B, T, D], [B, T]
        zv = z[valid]
        codebook = self.encoder.codebook.weight
        if self.training and float(self.ema_count.sum()) == 0.0:
            self.init_codebook(zv.detach())
        ids = nearest_code(z.detach(), codebook)
        q = codebook[ids].float()
        if self.training:
            self.ema_update(zv.detach(), ids[valid])
        commit = F.mse_loss(zv, q[valid].detach())
        h = z + (q - z).detach()  # straight-through
        T = h.shape[1]
        h = h.to(self.head_out.weight.dtype) + self.head_positions.weight[:T].to(self.head_out.weight.dtype)
        attn = block_causal_mask(valid, None)
        for layer in self.head:
            h = layer(h, attn)
        logits = self.head_out(self.head_norm(h)).float()  # [B, T, up * C]
        B, C = logits.shape[0], len(CHARS) + 1
        logp = logits.view(B, T * self.upsample, C).log_softmax(-1)
        in_len = valid.sum(1) * self.upsample
        ctc = F.ctc_loss(logp.transpose(0, 1), labels, in_len, label_lengths, blank=0, reduction="mean",
                         zero_infinity=True)
        with torch.no_grad():
            p = torch.bincount(ids[valid], minlength=codebook.shape[0]).float()
            p = p / p.sum().clamp_min(1)
            ppl = torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())
        loss = ctc + self.vq.loss_scale * self.vq.commitment * commit
        return {"loss": loss, "ctc": ctc, "commit": commit, "perplexity": ppl, "used": (p > 0).sum().float(),
                "logp": logp.detach(), "in_len": in_len}


# ------------------------------------------------------------------------------------------ data
def tone_alphabet_clip(text: str, sr: int = kaudio.SAMPLE_RATE, char_seconds: float = 0.12) -> torch.Tensor:
    """A learnable stand-in for speech: each character a tone of its own pitch, spaces silent (tests, smoke)."""
    parts = []
    n = int(char_seconds * sr)
    t = torch.arange(n) / sr
    ramp = torch.minimum(torch.ones(n), torch.minimum(t, t.flip(0)) / 0.01)
    for ch in text:
        i = CHARS.find(ch)
        f = 0.0 if i <= 0 else 200.0 * 2 ** (i / 8)
        parts.append(0.4 * torch.sin(2 * math.pi * f * t) * ramp if f else torch.zeros(n))
    parts.append(torch.zeros(n))
    return torch.cat(parts).float()


class SyntheticToneASR(Sequence):
    """Seeded (waveform, text) pairs of `tone_alphabet_clip` over random short words."""

    def __init__(self, n: int, seed: int = 0, alphabet: str = "abcdefgh"):
        self.n, self.seed, self.alphabet = n, seed, alphabet

    def __len__(self) -> int:
        return self.n

    def text(self, i: int) -> str:
        g = torch.Generator().manual_seed(self.seed * 7919 + i)
        words = []
        for _ in range(int(torch.randint(1, 3, (), generator=g))):
            k = int(torch.randint(2, 5, (), generator=g))
            words.append("".join(self.alphabet[int(j)] for j in torch.randint(0, len(self.alphabet), (k,), generator=g)))
        return " ".join(words)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        t = self.text(i)
        return tone_alphabet_clip(t), t


class ManifestASR(Sequence):
    """(16 kHz waveform, transcript) of manifest records (audio read on access)."""

    def __init__(self, records: list[dict[str, Any]], audio_key: str, text_key: str, max_seconds: float):
        self.items = [(r[audio_key], r[text_key]) for r in records]
        self.max_seconds = max_seconds

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        path, text = self.items[i]
        return kaudio.load_audio(path, max_seconds=self.max_seconds), text


@dataclass
class VQBatch:
    mel: torch.Tensor  # [B, n_mels, F]
    mask: torch.Tensor  # [B, F] bool
    labels: torch.Tensor  # [B, L] long (0-padded)
    label_lengths: torch.Tensor  # [B] long


def semantic_features(waves: Sequence[torch.Tensor], cfg: SemanticTokenizerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The inference front end (`SemanticTokenizer.features`) on CPU: pad to the longest rounded up to a
    multiple of `samples_per_token`, Whisper log-mel, frame mask [B, F]."""
    m = cfg.samples_per_token
    n = -(-max(w.shape[0] for w in waves) // m) * m
    batch = torch.zeros(len(waves), n)
    smask = torch.zeros(len(waves), n, dtype=torch.bool)
    for i, w in enumerate(waves):
        batch[i, : w.shape[0]] = w
        smask[i, : w.shape[0]] = True
    return kaudio.log_mel_spectrogram(batch, n_mels=cfg.num_mel_bins), smask[:, ::HOP_LENGTH]


# ------------------------------------------------------------------------------------------ recipe
def encoder_config(spec: VQModelSpec) -> tuple[SemanticTokenizerConfig, str | None]:
    """(tokenizer config, Whisper source or None) of `model.init`."""
    kind, _, name = spec.init.partition(":")
    if kind == "preset":
        d = SemanticTokenizerConfig.from_name(name).to_dict()
        d.update(quantize_vocab_size=spec.codebook_size, quantize_causal_block_size=spec.block_size,
                 encoder_causal_convolution=spec.causal)
        d.update(spec.overrides)
        return SemanticTokenizerConfig(**d), None
    if kind == "whisper":
        from kimia.encoders.whisper import PACKAGED_NAMES, PRESETS

        if name in PACKAGED_NAMES:
            w = PRESETS[name]
        else:
            p = Path(name)
            cfg_path = p / "config.json"
            if not cfg_path.is_file():
                raise ConfigError(f"model.init {spec.init!r}: no Whisper config.json in {p}")
            from kimia.encoders.whisper import WhisperEncoderConfig

            w = WhisperEncoderConfig.from_hf_config(json.loads(cfg_path.read_text())).to_dict()
        if not 0 < spec.layers <= w["n_layers"]:
            raise ConfigError(f"model.layers must be in 1..{w['n_layers']} for {spec.init!r}, got {spec.layers}")
        if spec.overrides:
            raise ConfigError("model.overrides only apply to presets (Whisper fixes the encoder shape)")
        cfg = SemanticTokenizerConfig(
            d_model=w["d_model"], n_heads=w["n_heads"], ffn_dim=w["ffn_dim"], num_mel_bins=w["n_mels"],
            max_source_positions=w.get("max_source_positions", 1500), encoder_layers=spec.layers,
            quantize_position=spec.layers, pooling_position=spec.layers, quantize_vocab_size=spec.codebook_size,
            quantize_causal_block_size=spec.block_size, encoder_causal_convolution=spec.causal)
        return cfg, name
    raise ConfigError(f"model.init must be 'preset:<name>' or 'whisper:<name|path>', got {spec.init!r}")


def hf_config(cfg: SemanticTokenizerConfig, vq: VQSpec) -> dict[str, Any]:
    """WhisperVQConfig-style config.json of an exported tokenizer."""
    return {
        "architectures": ["WhisperVQEncoder"], "model_type": "whisper", "activation_function": "gelu",
        "d_model": cfg.d_model, "encoder_attention_heads": cfg.n_heads, "encoder_ffn_dim": cfg.ffn_dim,
        "num_mel_bins": cfg.num_mel_bins, "max_source_positions": cfg.max_source_positions,
        "encoder_layers": cfg.quantize_position, "quantize_position": cfg.quantize_position,
        "pooling_position": cfg.pooling_position, "pooling_kernel_size": cfg.pooling_kernel_size,
        "pooling_type": cfg.pooling_type, "quantize_vocab_size": cfg.quantize_vocab_size,
        "quantize_causal_block_size": cfg.quantize_causal_block_size,
        "encoder_causal_convolution": cfg.encoder_causal_convolution,
        "encoder_causal_attention": cfg.encoder_causal_attention, "quantize_encoder_only": True,
        "quantize_causal_encoder": False, "scale_embedding": False, "quantize_ema_decay": vq.ema_decay,
        "quantize_commit_coefficient": vq.commitment, "quantize_loss_scale": vq.loss_scale,
        "quantize_restart_interval": vq.restart_interval,
    }


class VQRecipe(Recipe):
    name = "vq"

    def __init__(self, cfg: VQTrainConfig, dataset: Sequence | None = None):
        self.cfg = cfg
        self.enc_cfg, self.whisper = encoder_config(cfg.model)
        self._dataset = dataset

    def build_model(self, device: torch.device) -> nn.Module:
        m = self.cfg.model
        model = SemanticVQModel(self.enc_cfg, self.cfg.vq, m.head_layers, m.head_upsample)
        init_encoder_weights(model, torch.Generator().manual_seed(self.cfg.train.seed))
        if self.whisper is not None:
            from kimia.encoders.whisper import load_whisper_encoder

            k = self.enc_cfg.quantize_position
            w = load_whisper_encoder(self.whisper).state_dict()
            sd = {n: v.clone() for n, v in w.items()
                  if not n.startswith(("layers.", "layer_norm.")) or n.startswith("layers.") and int(n.split(".")[1]) < k}
            sd["codebook.weight"] = model.encoder.codebook.weight.detach().clone()  # replaced by the data init
            load_state_dict_strict(model.encoder, sd, source=f"Whisper {self.whisper!r}")
            model.encoder.codebook.weight.requires_grad_(False)
            logger.info("VQ encoder initialised from Whisper %r (first %d layers)", self.whisper,
                        self.enc_cfg.quantize_position)
        if m.freeze_encoder:
            model.encoder.requires_grad_(False)
            logger.info("VQ encoder frozen: the codebook is an online k-means of its pooled features")
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("VQ tokenizer: %.2f M trainable parameters, codebook %d", n / 1e6, self.enc_cfg.quantize_vocab_size)
        return model.to(device)

    def fsdp_modules(self, model: nn.Module) -> list[nn.Module]:
        return [*model.encoder.layers, *model.head]

    def dataset(self) -> Sequence:
        if self._dataset is None:
            d = self.cfg.data
            if d.synthetic > 0:
                self._dataset = SyntheticToneASR(d.synthetic, seed=self.cfg.train.seed)
            elif d.manifests:
                recs = read_audio_manifest(d.manifests, [d.audio_key, d.text_key])
                self._dataset = ManifestASR(recs, d.audio_key, d.text_key, d.max_seconds)
            else:
                raise ConfigError("data.manifests is empty and data.synthetic is 0: nothing to train on")
        return self._dataset

    def collate(self, items: list[tuple[torch.Tensor, str]]) -> VQBatch:
        mel, mask = semantic_features([w for w, _ in items], self.enc_cfg)
        labels = [encode_text(t) or [1] for _, t in items]
        lab = torch.zeros(len(items), max(len(x) for x in labels), dtype=torch.long)
        for i, x in enumerate(labels):
            lab[i, : len(x)] = torch.tensor(x)
        return VQBatch(mel, mask, lab, torch.tensor([len(x) for x in labels]))

    def loss(self, model: nn.Module, batch: VQBatch, phase: str) -> LossOutput:
        out = model(batch.mel, batch.mask, batch.labels, batch.label_lengths)
        metrics = {k: float(out[k].detach()) for k in ("ctc", "commit", "perplexity", "used")}
        return LossOutput(out["loss"], tokens=int(batch.mask.sum()) // (2 * self.enc_cfg.pooling_kernel_size),
                          metrics=metrics)

    def export(self, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
        sd = {k[len("encoder."):]: v.contiguous() for k, v in state_dict.items() if k.startswith("encoder.")}
        with torch.device("meta"):
            enc = SemanticEncoder(self.enc_cfg)
        load_state_dict_strict(enc, sd, source="trained VQ state", assign=True)  # strict check of the names
        folder.mkdir(parents=True, exist_ok=True)
        save_safetensors(sd, folder / "model.safetensors", metadata={"format": "pt", "component": "semantic_tokenizer"})
        (folder / "config.json").write_text(json.dumps(hf_config(self.enc_cfg, self.cfg.vq), indent=2) + "\n")
        logger.info("exported semantic tokenizer to %s", folder)

    def config_dict(self) -> dict[str, Any]:
        return to_dict(self.cfg)


def train_vq(cfg: VQTrainConfig, dataset: Sequence | None = None, env=None):
    """Build the recipe and trainer, train, export when the run is complete; returns (trainer, history)."""
    from kimia.train.common import run_recipe

    return run_recipe(VQRecipe(cfg, dataset), cfg, env)


__all__ = ["VQTrainConfig", "VQModelSpec", "VQSpec", "VQDataSpec", "SemanticVQModel", "VQRecipe", "VQBatch",
           "CHARS", "encode_text", "decode_ctc", "tone_alphabet_clip", "SyntheticToneASR", "ManifestASR",
           "semantic_features", "encoder_config", "hf_config", "train_vq"]
