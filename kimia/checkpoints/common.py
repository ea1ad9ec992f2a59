"""Shared helpers for strict, memory-frugal weight loading.

All loaders in kimia go through `load_state_dict_strict`: it names every missing, unexpected or
mis-shaped key in one `CheckpointError` instead of failing on the first, and loads with `assign=True` so a
module built on the meta device takes the (possibly memory-mapped) checkpoint tensors without a copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from kimia.errors import CheckpointError

_SHA256: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, per process


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, remembered per process by (path, size, mtime): verifying the same packaged
    base at every load, or a folder's files at assembly, reads each file once."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _SHA256[key] = h.hexdigest()
    return _SHA256[key]


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write `tensors` to `path` (atomically, via a temporary file) so that equal tensors and metadata always
    give the same bytes.

    `safetensors.torch.save_file` orders the tensors deterministically but writes the `__metadata__` entries
    in hash-map order, which changes from one call to the next: a part saved again unchanged would be a new
    file (and a new blob in git history). The header is rewritten in place with the metadata keys sorted;
    its length is unchanged, so the data offsets stay valid and nothing is re-read or copied."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata=dict(metadata) if metadata is not None else None)
    with open(tmp, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None)
        ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}) | header
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= n:  # same entries, so the same length; padded like the writer pads (spaces)
            f.seek(8)
            f.write(text + b" " * (n - len(text)))
    os.replace(tmp, path)
    return path


_MAX_LISTED = 20


def _fmt_keys(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return shown + more


def load_safetensors(
    path: str | os.PathLike, *, keep: callable | None = None, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Read a safetensors file (tensors are memory-mapped until used). `keep(name)` filters keys."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        out = {}
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in f.keys():
                if keep is None or keep(name):
                    out[name] = f.get_tensor(name)
        return out
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e


def load_state_dict_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str = "checkpoint",
    ignore: Iterable[str] = (),
    dtype: torch.dtype | None = None,
    assign: bool = True,
) -> None:
    """Load `state_dict` into `module`, requiring an exact key and shape match.

    `ignore` lists substrings; checkpoint keys containing any of them are dropped first (e.g. the
    release's non-persistent `rotary_emb.inv_freq`). Floating tensors are cast to `dtype` if given.
    Raises `CheckpointError` naming every missing, unexpected and mis-shaped key.
    """
    ignore = tuple(ignore)
    sd = {k: v for k, v in state_dict.items() if not any(s in k for s in ignore)}
    expected = module.state_dict(keep_vars=True)
    missing = expected.keys() - sd.keys()
    unexpected = sd.keys() - expected.keys()
    mis_shaped = [
        f"{k} (checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)})"
        for k in expected.keys() & sd.keys()
        if tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mis_shaped:
        parts = [f"{source} does not match the model"]
        if missing:
            parts.append(f"missing keys: {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_fmt_keys(unexpected)}")
        if mis_shaped:
            parts.append(f"shape mismatches: {_fmt_keys(mis_shaped)}")
        raise CheckpointError("; ".join(parts))
    if dtype is not None:
        sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    # Buffers/params that live in the model but are not in its state_dict keys are untouched.
    module.load_state_dict(sd, strict=True, assign=assign)


def build_frozen(
    factory: Callable[[], nn.Module],
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    ignore: Iterable[str] = (),
) -> nn.Module:
    """An inference module: `factory()` built on the meta device, `state_dict` loaded strictly (assign, no copy),
    moved to `device` if given, in eval mode with gradients off."""
    with torch.device("meta"):
        model = factory()
    load_state_dict_strict(model, state_dict, source=source, ignore=ignore, dtype=dtype)
    if device is not None:
        model = model.to(device)
    return model.eval().requires_grad_(False)
