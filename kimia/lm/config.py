"""Typed configuration of the Kimi-Audio LLM (`AudioLM`).

`AudioLMConfig` carries every field of the release's `config.json` (the Qwen2 fields plus all `kimia_*`
fields, reference KIMI_AUDIO.md §3.1) so that an official config reads and writes back without loss: keys we
do not know are kept verbatim in `extra` and written out again by `to_dict`. Two fields that the release does
not spell out are added because the architecture depends on them: `attention_bias` (q/k/v biases; True for
the Qwen2 trunk of Kimi-Audio, False for Llama-family trunks) and `head_dim` (derived when absent).

Presets (`AudioLMConfig.from_name`): `tiny` (the dimensions of the `llm` reference fixture, used by tests) and
`kimi-audio-7b` (the release).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kimia.errors import ConfigError


@dataclass
class AudioLMConfig:
    """Architecture of the dual-head audio LLM. Defaults are the Kimi-Audio-7B release values."""

    # --- Qwen2 trunk ---
    vocab_size: int = 168448
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int | None = None  # derived as hidden_size // num_attention_heads when None
    hidden_act: str = "silu"
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = True
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    use_cache: bool = True
    sliding_window: int | None = 4096
    use_sliding_window: bool = False
    max_window_layers: int = 28
    bos_token_id: int | None = 151643
    eos_token_ids: list[int] | None = field(default_factory=lambda: [151644, 151645])
    pad_token_id: int | None = 152063
    torch_dtype: str | None = "bfloat16"
    # --- Kimi-Audio specific ---
    kimia_mimo_layers: int = 6
    kimia_mimo_transformer_from_layer_index: int = 21
    kimia_mimo_audiodelaytokens: int = 6
    kimia_token_offset: int = 152064
    kimia_text_output_vocab: int = 152064
    kimia_audio_output_vocab: int = 16896
    num_audio_special_tokens: int = 512
    num_base_tokens: int = 151643
    use_whisper_feature: bool = True
    kimia_adaptor_input_dim: int = 5120
    kimia_media_begin: int = 151661
    kimia_media_end: int = 151663
    # --- bookkeeping of the release file ---
    architectures: list[str] | None = field(default_factory=lambda: ["MoonshotKimiaForCausalLM"])
    model_type: str = "moonshot_kimia"
    auto_map: dict[str, str] | None = None
    transformers_version: str | None = None
    # Unknown keys of a config.json, written back unchanged by `to_dict`.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise `ConfigError` for values the model cannot be built with."""
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "max_position_embeddings", "kimia_adaptor_input_dim")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.kimia_mimo_layers < 0:
            raise ConfigError(f"kimia_mimo_layers must be >= 0, got {self.kimia_mimo_layers}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not 0 <= self.kimia_mimo_transformer_from_layer_index < self.num_hidden_layers:
            raise ConfigError(
                f"kimia_mimo_transformer_from_layer_index {self.kimia_mimo_transformer_from_layer_index} "
                f"must lie in [0, num_hidden_layers={self.num_hidden_layers})"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.rope_scaling not in (None, {}):
            raise ConfigError(f"rope_scaling {self.rope_scaling!r} is not supported (only null)")
        if self.use_sliding_window:
            raise ConfigError("use_sliding_window=true is not supported (Kimi-Audio uses full attention)")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")
        for name in ("kimia_media_begin", "kimia_media_end", "kimia_token_offset"):
            if not 0 <= int(getattr(self, name)) < self.vocab_size:
                raise ConfigError(f"{name} {getattr(self, name)} outside the vocabulary [0, {self.vocab_size})")

    # ------------------------------------------------------------------ derived
    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def num_total_layers(self) -> int:
        """Main layers plus audio-branch (mimo) layers: the layer count of a full KV cache."""
        return self.num_hidden_layers + self.kimia_mimo_layers

    # ------------------------------------------------------------------ serialisation
    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides: Any) -> AudioLMConfig:
        """Build from a config.json dict; unknown keys go to `extra`. `overrides` replace known fields."""
        if not isinstance(d, dict):
            raise ConfigError(f"LLM config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = dict(d.get("extra", {})) if isinstance(d.get("extra"), dict) else {}
        extra.update({k: v for k, v in d.items() if k not in known and k != "extra"})
        for k in overrides:
            if k not in known:
                raise ConfigError(f"unknown AudioLMConfig field {k!r}")
        kwargs.update(overrides)
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as e:
            raise ConfigError(f"invalid LLM config: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        """Every field (and the preserved unknown keys) as a JSON-ready dict, config.json style."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return json.loads(json.dumps(out))  # deep copy, JSON types only

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> AudioLMConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"LLM config file not found: {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON ({e})") from e
        return cls.from_dict(d)

    def save_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> AudioLMConfig:
        """Preset by name (`tiny`, `kimi-audio-7b`), with optional field overrides."""
        if name not in _PRESETS:
            raise ConfigError(f"unknown AudioLM preset {name!r}; available: {sorted(_PRESETS)}")
        return cls.from_dict(dict(_PRESETS[name]), **overrides)


_PRESETS: dict[str, dict[str, Any]] = {
    # Release values (KIMI_AUDIO.md §3.1); the dataclass defaults already are these.
    "kimi-audio-7b": {},
    # Dimensions of the `llm` reference fixture: shrunk vocabulary with the production structure
    # (285 "BPE" ids, 421 specials, audio ids from offset 706).
    "tiny": {
        "vocab_size": 1730,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_window_layers": 4,
        "bos_token_id": 285,
        "eos_token_ids": [286, 287],
        "pad_token_id": 705,
        "torch_dtype": "float32",
        "kimia_mimo_layers": 2,
        "kimia_mimo_transformer_from_layer_index": 1,
        "kimia_token_offset": 706,
        "kimia_text_output_vocab": 706,
        "kimia_audio_output_vocab": 1536,
        "num_base_tokens": 285,
        "kimia_adaptor_input_dim": 256,
        "kimia_media_begin": 303,
        "kimia_media_end": 305,
    },
}


def available_presets() -> list[str]:
    return sorted(_PRESETS)
