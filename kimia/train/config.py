"""Typed training configs: nested dataclasses loaded from YAML, with `a.b.c=value` command-line overrides.

Every recipe has one top-level dataclass (e.g. `LMTrainConfig`) whose fields are dataclasses too; the shared
parts (`TrainConfig`: steps, batch, precision, parallelism, checkpointing; `OptimConfig`: AdamW + schedule)
live here so every recipe reads them the same way. `load_config(cls, path, overrides)` builds the dataclass
from a YAML file, applies overrides (values parsed as YAML scalars: `train.steps=10`, `optim.lr=3e-4`,
`freeze=[embeddings,trunk]`) and checks every value's type, raising `ConfigError` naming the field, so a
typo fails before any model is built. `dump_config` writes the resolved config next to the checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from kimia.errors import ConfigError

T = TypeVar("T")


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `min_lr_ratio * lr`."""

    lr: float = 1e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables clipping


@dataclass
class TrainConfig:
    """Loop settings shared by every recipe. The global batch is micro_batch * grad_accum * world_size."""

    out_dir: str = "runs/default"
    steps: int = 100
    micro_batch: int = 1
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    parallel: Literal["auto", "none", "ddp", "fsdp"] = "auto"  # auto: ddp when launched by torchrun
    log_every: int = 10
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2
    resume: bool = True  # continue from out_dir/checkpoints/latest when present
    max_steps_this_run: int = 0  # stop (with a checkpoint) after this many steps in this process; 0 = no limit
    group_by_length: bool = False  # sort each global batch by example length before splitting it (less padding)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert `value` to the annotated type `tp` (dataclass, list, dict, Literal, Optional, scalars)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} ({value!r})")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a (nested) dict; unknown keys and wrong types raise ConfigError naming the
    dotted field (`where` is the dotted prefix of this section)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    dotted = (lambda k: f"{where}.{k}") if where else (lambda k: k)
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown field(s) {[dotted(k) for k in unknown]}; known here: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], dotted(k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from e


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply `a.b=value` strings (value parsed as YAML) to a nested dict, in place; returns it."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse value: {e}") from e
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """Dataclass `cls` from a YAML file (optional) plus overrides. Raises ConfigError on any bad field."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"train config not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        data = loaded
    apply_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path or cls.__name__}: {e}") from None


def dump_config(cfg: Any, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


__all__ = ["OptimConfig", "TrainConfig", "load_config", "from_dict", "to_dict", "apply_overrides", "dump_config"]
