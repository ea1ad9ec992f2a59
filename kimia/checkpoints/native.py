"""kimia's native checkpoint format: one folder per component with `config.json` + `model.safetensors`.

For the LLM the native key names are the release's key names (AudioLM mirrors them), so a native LLM folder
is simply a single-file release folder without the `rotary_emb.inv_freq` entries, and it loads through the
same strict loader (`kimia.checkpoints.official_lm.load_official_lm`). `convert_official_lm` turns a sharded
release folder into a native one (optionally re-cast, e.g. to bfloat16).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from kimia.checkpoints.common import save_safetensors
from kimia.checkpoints.official_lm import load_official_lm
from kimia.errors import CheckpointError
from kimia.lm.config import AudioLMConfig
from kimia.lm.model import AudioLM

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_native_lm(model: AudioLM, folder: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
    """Write `config.json` (the full AudioLMConfig) and `model.safetensors` (weights, optionally cast)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # restored from the embedding on load
    tensors = {}
    for k, v in sd.items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous().cpu()
    stored = dtype or next(iter(tensors.values())).dtype
    config = AudioLMConfig.from_dict(model.config.to_dict(), torch_dtype=str(stored).replace("torch.", ""))
    config.save_json(folder / CONFIG_FILE)
    save_safetensors(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt", "kimia_component": "lm"})
    logger.info("saved AudioLM (%d tensors, %s) to %s", len(tensors), stored, folder)
    return folder


def load_native_lm(
    folder: str | os.PathLike, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> tuple[AudioLM, AudioLMConfig]:
    """Load a native LLM folder (strict; same loader as the release layout)."""
    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{folder}: native LLM folder needs {WEIGHTS_FILE}")
    return load_official_lm(folder, device=device, dtype=dtype)


def convert_official_lm(
    src: str | os.PathLike, dst: str | os.PathLike, *, dtype: torch.dtype | None = None
) -> Path:
    """Release folder (sharded) -> native folder. Reads tensors straight into `dtype` (one copy in RAM)."""
    model, _ = load_official_lm(src, device="cpu", dtype=dtype)
    return save_native_lm(model, dst)
