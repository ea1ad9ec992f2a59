"""GLM-4-Voice semantic tokenizer: 16 kHz waveform -> discrete ids at 12.5 Hz (codebook of 16384).

Kimi-Audio's audio input stream is made of these ids (KIMI_AUDIO.md §2.1). The model is a Whisper-large-v3
shaped encoder with three changes: causal convolutions (left pad 2, no right pad), block-causal attention
(a 50 Hz frame sees its own 200-frame block and everything before it, never padding), and only the first
`quantize_position` layers, after which time is average-pooled by 4 and each vector is replaced by the
index of its nearest codebook row (squared L2). Audio is cut into 30 s segments that are tokenized
independently; segments (of one or many files) are batched, padded to the longest rounded up to 1280
samples, and ids at padded positions are dropped.

`load_semantic_tokenizer` reads the `THUDM/glm-4-voice-tokenizer` folder layout (config.json +
model.safetensors with flat keys). Training-only tensors (`ema_count`, `ema_weight`), the post-VQ position
table `embed_positions2` and layers past `quantize_position` are ignored by name; every other key is strict.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kimia import audio as kaudio
from kimia.checkpoints.common import build_frozen, load_safetensors
from kimia.encoders.layers import EncoderLayer
from kimia.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

SEGMENT_SAMPLES = 480000  # 30 s at 16 kHz
HOP_LENGTH = 160


@dataclass
class SemanticTokenizerConfig:
    d_model: int = 1280
    n_heads: int = 20
    ffn_dim: int = 5120
    num_mel_bins: int = 128
    max_source_positions: int = 1500
    encoder_layers: int = 32  # in the checkpoint's config; only the first `quantize_position` are built
    quantize_position: int = 16
    pooling_position: int = 16
    pooling_kernel_size: int = 4
    pooling_type: str = "avg"
    quantize_vocab_size: int = 16384
    quantize_causal_block_size: int | None = 200
    encoder_causal_convolution: bool = True
    encoder_causal_attention: bool = False

    def __post_init__(self) -> None:
        if self.pooling_type not in ("avg", "max"):
            raise ConfigError(f"semantic tokenizer: pooling_type {self.pooling_type!r} not supported (avg, max)")
        if not 0 < self.pooling_position <= self.quantize_position:
            raise ConfigError(
                f"semantic tokenizer: need 0 < pooling_position ({self.pooling_position}) <= quantize_position "
                f"({self.quantize_position})"
            )
        if self.d_model % self.n_heads:
            raise ConfigError(f"semantic tokenizer: d_model {self.d_model} not divisible by heads {self.n_heads}")

    @property
    def samples_per_token(self) -> int:
        """Waveform samples per output id: hop 160 x conv stride 2 x pooling kernel (1280)."""
        return HOP_LENGTH * 2 * self.pooling_kernel_size

    @classmethod
    def from_name(cls, name: str) -> "SemanticTokenizerConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown semantic tokenizer preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "SemanticTokenizerConfig":
        """From a WhisperVQConfig dict (`config.json` of glm-4-voice-tokenizer)."""
        unsupported = {
            "quantize_causal_encoder": False, "quantize_encoder_only": True, "scale_embedding": False,
        }
        for k, ok in unsupported.items():
            if k in cfg and bool(cfg[k]) != ok:
                raise ConfigError(f"semantic tokenizer config: {k}={cfg[k]!r} is not supported (expected {ok})")
        if cfg.get("activation_function", "gelu") != "gelu":
            raise ConfigError(f"semantic tokenizer config: activation {cfg['activation_function']!r} not supported")
        if cfg.get("quantize_vocab_size") is None or cfg.get("pooling_kernel_size") is None:
            raise ConfigError("semantic tokenizer config needs quantize_vocab_size and pooling_kernel_size")
        try:
            return cls(
                d_model=int(cfg["d_model"]),
                n_heads=int(cfg["encoder_attention_heads"]),
                ffn_dim=int(cfg["encoder_ffn_dim"]),
                num_mel_bins=int(cfg.get("num_mel_bins", 128)),
                max_source_positions=int(cfg.get("max_source_positions", 1500)),
                encoder_layers=int(cfg.get("encoder_layers", cfg["quantize_position"])),
                quantize_position=int(cfg["quantize_position"]),
                pooling_position=int(cfg.get("pooling_position") or cfg["quantize_position"]),
                pooling_kernel_size=int(cfg["pooling_kernel_size"]),
                pooling_type=str(cfg.get("pooling_type") or "avg"),
                quantize_vocab_size=int(cfg["quantize_vocab_size"]),
                quantize_causal_block_size=cfg.get("quantize_causal_block_size"),
                encoder_causal_convolution=bool(cfg.get("encoder_causal_convolution", True)),
                encoder_causal_attention=bool(cfg.get("encoder_causal_attention", False)),
            )
        except KeyError as e:
            raise ConfigError(f"semantic tokenizer config lacks field {e.args[0]!r}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=64, n_heads=4, ffn_dim=128, encoder_layers=4, quantize_position=2, pooling_position=2,
                 quantize_vocab_size=4096),
    "glm-4-voice": dict(),
}


@dataclass
class SemanticEncoderOutput:
    ids: torch.Tensor  # [B, T4] int64 codebook ids (padded positions included)
    pooled: torch.Tensor  # [B, T4, D] pooled hidden states that entered the VQ
    mask: torch.Tensor  # [B, T4] bool, True where the position holds real audio


def block_causal_mask(key_mask: torch.Tensor, block: int | None, causal: bool = False) -> torch.Tensor:
    """key_mask [B, T] bool -> attention mask [B, 1, T, T] (True = may attend).

    Query i sees key j when j <= i or both lie in the same `block`-frame block (block None: all keys;
    `causal`: only j <= i), and key j is real audio.
    """
    T = key_mask.shape[1]
    idx = torch.arange(T, device=key_mask.device)
    if causal:
        allowed = idx[None, :] <= idx[:, None]
    elif block is None:
        allowed = torch.ones(T, T, dtype=torch.bool, device=key_mask.device)
    else:
        allowed = (idx[None, :] <= idx[:, None]) | (idx[None, :] // block == idx[:, None] // block)
    return (allowed[None] & key_mask[:, None, :].bool())[:, None]


def nearest_code(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """x [..., D], codebook [V, D] -> ids [...] of the nearest row by squared L2 (|x|^2 + |c|^2 - 2 x.c)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    cb = codebook.float()
    dist = torch.addmm((cb * cb).sum(1)[None, :] + (flat * flat).sum(1, keepdim=True), flat, cb.t(), beta=1.0, alpha=-2.0)
    return dist.argmin(dim=1).reshape(x.shape[:-1])


class SemanticEncoder(nn.Module):
    """WhisperVQEncoder up to the quantizer: causal convs, block-causal layers, pooling, nearest code."""

    def __init__(self, cfg: SemanticTokenizerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=0 if cfg.encoder_causal_convolution else 1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=0 if cfg.encoder_causal_convolution else 1)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        self.layers = nn.ModuleList(EncoderLayer(d, cfg.n_heads, cfg.ffn_dim) for _ in range(cfg.quantize_position))
        self.codebook = nn.Embedding(cfg.quantize_vocab_size, d)

    def _conv(self, conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.encoder_causal_convolution:
            x = F.pad(x, (conv.kernel_size[0] - 1, 0))
        return F.gelu(conv(x))

    def forward(self, mel: torch.Tensor, mask: torch.Tensor) -> SemanticEncoderOutput:
        """mel [B, n_mels, F] (F even, F/2 <= max_source_positions), mask [B, F] (1 = real frame).

        Returns ids/pooled/mask at F / (2 * pooling_kernel_size) positions (rounded up).
        """
        cfg = self.cfg
        if mel.ndim != 3 or mel.shape[1] != cfg.num_mel_bins or mask.shape != (mel.shape[0], mel.shape[2]):
            raise ConfigError(f"semantic encoder expects mel [B, {cfg.num_mel_bins}, F] and mask [B, F]; got "
                              f"{tuple(mel.shape)} and {tuple(mask.shape)}")
        x = self._conv(self.conv1, mel.to(self.conv1.weight.dtype))
        x = self._conv(self.conv2, x).transpose(1, 2)  # [B, T, D] at 50 Hz
        T = x.shape[1]
        if T > cfg.max_source_positions:
            raise ConfigError(f"semantic encoder: {T} frames exceed max_source_positions {cfg.max_source_positions}")
        x = x + self.embed_positions.weight[:T].to(x.dtype)
        key_mask = mask[:, ::2].bool()
        block = cfg.quantize_causal_block_size
        attn = block_causal_mask(key_mask, block, cfg.encoder_causal_attention)
        for i, layer in enumerate(self.layers):
            x = layer(x, attn)
            if i + 1 == cfg.pooling_position:
                k = cfg.pooling_kernel_size
                h = x.transpose(1, 2)
                if h.shape[-1] % k:
                    h = F.pad(h, (0, k - h.shape[-1] % k))
                h = F.avg_pool1d(h, k) if cfg.pooling_type == "avg" else F.max_pool1d(h, k)
                x = h.transpose(1, 2)
                key_mask = key_mask[:, ::k]
                attn = block_causal_mask(key_mask, None if block is None else block // k, cfg.encoder_causal_attention)
        return SemanticEncoderOutput(ids=nearest_code(x, self.codebook.weight), pooled=x, mask=key_mask)


# ---------------------------------------------------------------------------------------------------------
# waveform -> ids


def _as_waveform(audio: Any, what: str) -> torch.Tensor:
    if isinstance(audio, (str, os.PathLike, bytes, bytearray)):
        return kaudio.load_audio(audio)
    return kaudio.load_audio(audio, sr=kaudio.SAMPLE_RATE, name=what)


class SemanticTokenizer:
    """16 kHz waveforms (tensors, arrays, or paths) -> semantic ids [1, N] at 12.5 Hz (raw codebook ids).

    Like the reference, a segment whose length is less than 200 samples below a multiple of 1280 can get a
    different last id alone than inside a batch with a longer segment: its last STFT window then
    reflect-pads real samples instead of reading zero padding.
    """

    def __init__(self, encoder: SemanticEncoder, *, batch_size: int = 128):
        self.encoder = encoder
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return self.encoder.conv1.weight.device

    def features(self, segments: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Segments -> (log-mel [B, n_mels, F], frame mask [B, F]) padded to the longest, rounded up to a
        multiple of `samples_per_token` samples (like WhisperFeatureExtractor with padding="longest")."""
        m = self.encoder.cfg.samples_per_token
        longest = max(s.shape[0] for s in segments)
        n = -(-longest // m) * m
        batch = torch.zeros(len(segments), n)
        sample_mask = torch.zeros(len(segments), n, dtype=torch.bool)
        for i, s in enumerate(segments):
            batch[i, : s.shape[0]] = s
            sample_mask[i, : s.shape[0]] = True
        mel = kaudio.log_mel_spectrogram(batch.to(self.device), n_mels=self.encoder.cfg.num_mel_bins)
        return mel, sample_mask[:, ::HOP_LENGTH].to(self.device)

    @torch.no_grad()
    def encode_segments(self, segments: Sequence[torch.Tensor]) -> SemanticEncoderOutput:
        """One padded batch of <= 30 s segments through the encoder."""
        mel, mask = self.features(segments)
        return self.encoder(mel, mask)

    @torch.no_grad()
    def tokenize(self, audio: Any) -> torch.Tensor | list[torch.Tensor]:
        """A waveform/path -> LongTensor [1, N]; a list of them -> a list of [1, N] (segments of all files
        are batched together, up to `batch_size` segments per forward)."""
        single = not isinstance(audio, (list, tuple))
        items = [audio] if single else list(audio)
        segs: list[torch.Tensor] = []
        owner: list[int] = []
        for i, a in enumerate(items):
            wav = _as_waveform(a, f"audio #{i}")
            for s in range(0, wav.shape[0], SEGMENT_SAMPLES):
                segs.append(wav[s : s + SEGMENT_SAMPLES])
                owner.append(i)
        ids: list[list[torch.Tensor]] = [[] for _ in items]
        for start in range(0, len(segs), self.batch_size):
            out = self.encode_segments(segs[start : start + self.batch_size])
            for j in range(out.ids.shape[0]):
                ids[owner[start + j]].append(out.ids[j][out.mask[j]])
        result = [torch.cat(x).long().unsqueeze(0).cpu() for x in ids]
        return result[0] if single else result

    __call__ = tokenize


# ---------------------------------------------------------------------------------------------------------
# loading

_IGNORED = ("ema_count", "ema_weight", "embed_positions2.")


def build_semantic_encoder(cfg: SemanticTokenizerConfig, sd: dict[str, torch.Tensor], source: str,
                           device=None, dtype=None) -> SemanticEncoder:
    """Meta-device build + strict assign-load of flat WhisperVQEncoder keys."""
    keep = {}
    for k, v in sd.items():
        if k.startswith("layers.") and int(k.split(".")[1]) >= cfg.quantize_position:
            continue  # layers after the quantizer are never run
        if k.startswith(_IGNORED):
            continue
        keep[k] = v
    return build_frozen(lambda: SemanticEncoder(cfg), keep, source=source, device=device, dtype=dtype)


def load_semantic_tokenizer(folder: str | os.PathLike, device: str | torch.device | None = None,
                            batch_size: int = 128) -> SemanticTokenizer:
    """Load a glm-4-voice-tokenizer folder (config.json + model.safetensors). Runs in fp32, as the reference."""
    p = Path(folder)
    cfg_path, weights = p / "config.json", p / "model.safetensors"
    if not cfg_path.is_file():
        raise CheckpointError(f"{p}: no config.json (expected a glm-4-voice-tokenizer folder)")
    try:
        cfg = SemanticTokenizerConfig.from_hf_config(json.loads(cfg_path.read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON: {e}") from None
    sd = load_safetensors(weights)
    enc = build_semantic_encoder(cfg, sd, f"semantic tokenizer checkpoint {weights}", device, torch.float32)
    return SemanticTokenizer(enc, batch_size=batch_size)
