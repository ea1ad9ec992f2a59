"""Load the LLM of an official Kimi-Audio release folder into `kimia.lm.AudioLM`.

Release layout (reference KIMI_AUDIO.md §3.5): `config.json` with the Qwen2 + `kimia_*` fields, and either
`model.safetensors.index.json` + shards or one `model.safetensors`. Key names already match `AudioLM`'s
module names, so nothing is renamed; the per-layer `self_attn.rotary_emb.inv_freq` entries (a non-persistent
buffer in the reference, recomputed by us) are skipped.

Memory: the model is built on the meta device and tensors are read one at a time from memory-mapped shards,
converted to the requested dtype/device immediately, and handed over with `assign=True` — so the weights
exist once in their final form (plus one tensor in flight), never as two full copies.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open

from kimia.checkpoints.common import load_state_dict_strict
from kimia.errors import CheckpointError, ConfigError
from kimia.lm.config import AudioLMConfig
from kimia.lm.model import AudioLM

logger = logging.getLogger(__name__)

IGNORED_KEYS = ("rotary_emb.inv_freq",)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _dtype_from_config(config: AudioLMConfig) -> torch.dtype | None:
    name = (config.torch_dtype or "").replace("torch.", "")
    return getattr(torch, name, None) if name else None


def shard_files(folder: str | os.PathLike) -> dict[Path, list[str] | None]:
    """Shard path -> keys it holds per the index (None: read every key of a single-file checkpoint)."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from e
        shards: dict[Path, list[str]] = {}
        for key, fname in weight_map.items():
            shards.setdefault(folder / fname, []).append(key)
        missing = [str(p) for p in shards if not p.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {', '.join(sorted(missing))}")
        return dict(shards)
    single = folder / SINGLE_FILE
    if single.is_file():
        return {single: None}
    raise CheckpointError(f"{folder}: neither {INDEX_FILE} nor {SINGLE_FILE} found")


def read_lm_state_dict(
    folder: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """All LLM tensors of a release folder (ignored keys dropped), each cast/moved as it is read."""
    sd: dict[str, torch.Tensor] = {}
    for path, keys in shard_files(folder).items():
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                available = set(f.keys())
                if keys is not None:
                    absent = [k for k in keys if k not in available]
                    if absent:
                        raise CheckpointError(f"{path} lacks keys its index assigns to it: {', '.join(sorted(absent)[:20])}")
                for name in sorted(available if keys is None else keys):
                    if any(s in name for s in IGNORED_KEYS):
                        continue
                    if name in sd:
                        raise CheckpointError(f"{path}: key {name} appears in more than one shard")
                    t = f.get_tensor(name)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    sd[name] = t.to(device)
        except CheckpointError:
            raise
        except Exception as e:  # corrupt header / truncated file
            raise CheckpointError(f"cannot read safetensors shard {path}: {e}") from e
    return sd


def load_official_lm(
    folder: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[AudioLM, AudioLMConfig]:
    """Build `AudioLM` from an official release folder (config.json + safetensors shards).

    device: target device (default cpu). dtype: parameter dtype (default: the config's `torch_dtype`, else
    the stored dtype). Strict: missing, unexpected or mis-shaped keys raise CheckpointError naming them.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"LLM checkpoint folder not found: {folder}")
    try:
        config = AudioLMConfig.from_json(folder / "config.json")
    except ConfigError as e:
        raise CheckpointError(f"{folder}: bad config.json: {e}") from e
    device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype is None:
        dtype = _dtype_from_config(config)
    sd = read_lm_state_dict(folder, device=device, dtype=dtype)
    if config.tie_word_embeddings and "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    with torch.device("meta"):
        model = AudioLM(config, dtype=dtype)
    load_state_dict_strict(model, sd, source=f"LLM checkpoint {folder}", ignore=IGNORED_KEYS)
    if config.tie_word_embeddings:  # assigning the loaded tensors replaced the shared Parameter by two copies
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_buffers(device)
    model.eval()
    n = sum(p.numel() for p in model.parameters())
    logger.info("loaded AudioLM from %s: %.3fB params, %s on %s", folder, n / 1e9, dtype, device)
    return model, config
