"""Loading the detokenizer: the release's `audio_detokenizer/` folder, our native folder, and conversion.

Release layout: `config.yaml` (`model.dit.*` + top-level `normalize_mel`, `mel_mean`, `mel_std`) and a
19 GB `model.pt` pickle `{"state_dict": {"speech_model.<key>": tensor, <other training state>}}`. The pickle
is opened with `torch.load(weights_only=True, mmap=True)`: tensors stay file-backed, only the
`speech_model.` ones are kept, and the DiT (built on the meta device) takes them with `assign=True`, so the
file is never held twice in RAM. `convert_official_detokenizer` writes the native format once
(`config.json` + `model.safetensors`), which later loads memory-mapped and fast.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from kimia.checkpoints.common import build_frozen, load_safetensors
from kimia.detokenizer.dit import DiT, DiTConfig
from kimia.detokenizer.stream import StreamConfig, StreamingDetokenizer
from kimia.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

OFFICIAL_CONFIG, OFFICIAL_WEIGHTS = "config.yaml", "model.pt"
NATIVE_CONFIG, NATIVE_WEIGHTS = "config.json", "model.safetensors"
PREFIX = "speech_model."
DIT_FOLDER, VOCODER_FOLDER = "audio_detokenizer", "vocoder"


def read_official_config(path: str | os.PathLike) -> DiTConfig:
    """`audio_detokenizer/config.yaml` -> DiTConfig (raises ConfigError naming the file on bad content)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"detokenizer config not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text())
        dit = dict(doc["model"]["dit"])
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a detokenizer config with model.dit ({e})") from e
    for key in ("normalize_mel", "mel_mean", "mel_std"):
        if key in doc:
            dit[key] = doc[key]
    try:
        return DiTConfig.from_dict(dit)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def read_official_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The `speech_model.` tensors of the release pickle, prefix stripped (memory-mapped when possible)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"detokenizer weights not found: {path}")
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
            logger.warning("%s is a legacy pickle: loading it fully into memory", path)
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read detokenizer weights {path}: {e}") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise CheckpointError(f"{path}: expected a dict with a 'state_dict' entry")
    sd = {k[len(PREFIX) :]: v for k, v in obj["state_dict"].items() if k.startswith(PREFIX)}
    del obj  # drop references to the non-DiT training state
    if not sd:
        raise CheckpointError(f"{path}: no '{PREFIX}*' tensors in state_dict")
    return sd


def _format(folder: Path) -> str:
    if (folder / NATIVE_WEIGHTS).is_file():
        return "native"
    if (folder / OFFICIAL_WEIGHTS).is_file():
        return "official"
    raise CheckpointError(f"detokenizer folder {folder} holds neither {NATIVE_WEIGHTS} nor {OFFICIAL_WEIGHTS}")


def load_dit(folder: str | os.PathLike, device=None, dtype: torch.dtype | None = None) -> DiT:
    """DiT from a release `audio_detokenizer/` folder or a native folder (config.json + model.safetensors)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"detokenizer folder not found: {folder}")
    if _format(folder) == "native":
        cfg_path = folder / NATIVE_CONFIG
        if not cfg_path.is_file():
            raise CheckpointError(f"detokenizer config not found: {cfg_path}")
        try:
            cfg = DiTConfig.from_dict(json.loads(cfg_path.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise ConfigError(f"{cfg_path}: {e}") from e
        weights = folder / NATIVE_WEIGHTS
        sd = load_safetensors(weights)
    else:
        cfg = read_official_config(folder / OFFICIAL_CONFIG)
        weights = folder / OFFICIAL_WEIGHTS
        sd = read_official_weights(weights)
    model = build_frozen(lambda: DiT(cfg), sd, source=str(weights), device=device, dtype=dtype)
    n = sum(p.numel() for p in model.parameters())
    logger.info("loaded detokenizer DiT from %s (%.1f M params)", weights, n / 1e6)
    return model


def save_dit(model: DiT, folder: str | os.PathLike) -> Path:
    """Write the native format: config.json (DiTConfig) + model.safetensors."""
    from kimia.checkpoints.common import save_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    save_safetensors(sd, folder / NATIVE_WEIGHTS, metadata={"format": "pt", "component": "dit"})
    (folder / NATIVE_CONFIG).write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    return folder


def convert_official_detokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """One-time conversion of release weights to the native format in `dst`.

    `src` is either a release `audio_detokenizer/` folder (-> `dst` gets the DiT) or a model folder
    holding `audio_detokenizer/` and `vocoder/` (-> `dst/audio_detokenizer` and `dst/vocoder`, the layout
    `load_detokenizer` reads). Tensors come from the memory-mapped pickle one at a time, so peak RAM is
    about the DiT size.
    """
    src, dst = Path(src), Path(dst)
    if (src / DIT_FOLDER).is_dir():
        from kimia.detokenizer.bigvgan import load_vocoder, save_vocoder

        save_dit(load_dit(src / DIT_FOLDER), dst / DIT_FOLDER)
        if (src / VOCODER_FOLDER).is_dir():
            save_vocoder(load_vocoder(src / VOCODER_FOLDER), dst / VOCODER_FOLDER)
        return dst
    return save_dit(load_dit(src), dst)


def load_detokenizer(
    model_folder: str | os.PathLike,
    device=None,
    dtype: torch.dtype | None = None,
    config: StreamConfig | None = None,
    generator: torch.Generator | None = None,
    noise_provider=None,
    speaker_prompt: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> StreamingDetokenizer:
    """StreamingDetokenizer from a model folder holding `audio_detokenizer/` and `vocoder/` (release or native)."""
    from kimia.detokenizer.bigvgan import load_vocoder

    root = Path(model_folder)
    if not root.is_dir():
        raise CheckpointError(f"model folder not found: {root}")
    dit = load_dit(root / DIT_FOLDER, device=device, dtype=dtype)
    vocoder = load_vocoder(root / VOCODER_FOLDER, device=device, dtype=dtype)
    return StreamingDetokenizer(
        dit, vocoder, config, generator=generator, noise_provider=noise_provider, speaker_prompt=speaker_prompt
    )
