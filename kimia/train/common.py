"""Training infrastructure shared by every kimia recipe: distributed setup, precision, optimizer and schedule,
gradient accumulation, resumable checkpoints, loss/throughput logging and the `Trainer` loop.

Why one loop: the LLM, the semantic VQ tokenizer, the flow-matching DiT and the BigVGAN vocoder differ in
their model, batch and loss, not in how a step is taken, checkpointed, resumed or run under torchrun. Keeping
those mechanics here means each recipe is a few functions and every recipe inherits exact resume and
multi-process equivalence.

Distributed: launched by `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) the trainer joins a
process group (gloo on CPU, nccl on CUDA) and wraps the model in DDP, or shards it with FSDP2
`fully_shard` (`train.parallel: fsdp`; the recipe names the sub-modules to shard first). Data order is a pure
function of (seed, samples consumed): every optimizer step takes a *global* batch of
`micro_batch * grad_accum * world_size` examples from a seeded epoch permutation, and rank r, micro-step k
takes slice (k * world + r). A 2-process run therefore sees exactly the examples a 1-process run with twice
the accumulation sees, and a resumed run continues the stream where the checkpoint left it.

Checkpoints (`out_dir/checkpoints/step_XXXXXXX/`): `model.safetensors` (full, unsharded state dict; tied
tensors stored once), `trainer.pt` (optimizer, scheduler, grad scaler, step, samples consumed),
`rng_rank{r}.pt` (python / numpy / torch / cuda RNG of each rank), `config.yaml`. A checkpoint is written
into a temporary folder and renamed into place, then `latest` is replaced atomically, so a run killed at any
moment leaves the previous checkpoint intact; a restarted run with `train.resume: true` continues with the
same subsequent losses as an uninterrupted one.

How a recipe plugs in
---------------------
Subclass `Recipe` and implement:
- `build_model(device) -> nn.Module`: the trainable model on `device` in fp32 master weights (freezing and
  adapters applied; `requires_grad=False` parameters are never given to an optimizer).
- `dataset() -> Sequence`: indexable examples; `collate(items) -> batch` (any object; `move_batch` sends it
  to the device, tensors and dataclasses of tensors are handled by default).
- `loss(model, batch, phase) -> LossOutput`: forward + loss of one micro-batch (runs under autocast). `model`
  may be the DDP/FSDP wrapper: call it, do not reach into it.
- `export(state_dict, folder)`: write the native model folder from a full CPU state dict (rank 0 only).
Optional: `phases` (ordered names, one optimizer each: a GAN uses ("disc", "gen") and `phase_parameters`
to route the discriminator's and generator's parameters; each phase runs its own backward passes and
optimizer step on the same micro-batches, in order), `phase_parameters(model, phase)`,
`fsdp_modules(model)` (blocks to shard before the root), `ddp_kwargs` (e.g. find_unused_parameters).
Under DDP/FSDP the trainer sets `recipe.whole_graph = True` before the first step: every rank must then give
every trainable parameter a gradient each step (a recipe that skips a branch when a micro-batch has no target
for it must run it anyway, its loss contribution then being an exact zero).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from kimia.checkpoints.common import save_safetensors
from kimia.errors import CheckpointError, ConfigError
from kimia.train.config import OptimConfig, TrainConfig, dump_config

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ distributed
@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local_rank> if available, else cpu. Explicit names are validated."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"invalid device {name!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
        logger.info("joined process group: rank %d/%d on %s (%s)", rank, world, dev, backend)
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev)


def resolve_precision(device: torch.device, precision: str) -> torch.dtype | None:
    """Autocast dtype for `precision` on `device` (None = fp32). 'auto': bf16 on CUDA when supported."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError("fp16 mixed precision needs a CUDA device (use bf16 or fp32 on CPU)")
        return torch.float16
    raise ConfigError(f"unknown precision {precision!r}")


# ------------------------------------------------------------------------------------------ optimizer
def build_optimizer(named: Sequence[tuple[str, nn.Parameter]], cfg: OptimConfig,
                    no_decay_names: set[str] | frozenset[str] = frozenset()) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (norm weights, biases, 1-D params and `no_decay_names` are not
    decayed)."""
    decay = [p for n, p in named if p.requires_grad and p.dim() >= 2 and n not in no_decay_names]
    no_decay = [p for n, p in named if p.requires_grad and (p.dim() < 2 or n in no_decay_names)]
    if not decay and not no_decay:
        raise ConfigError("nothing to train: every parameter is frozen")
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to `min_ratio` at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, cfg.warmup_steps, cfg.min_lr_ratio))


# ------------------------------------------------------------------------------------------ data order
class GlobalBatchOrder:
    """Seeded, resumable example order: global batch of step s = samples [s*G, (s+1)*G) of the stream of
    per-epoch permutations. Rank r, micro-step k takes positions [(k*world + r)*micro, +micro) of it.

    With `lengths` (one per example) the G examples of a global batch are first sorted by length (ties by
    their stream position), so each micro-batch holds examples of similar length and pads little; which
    examples form a step, and therefore resume and multi-process equivalence, are unchanged."""

    def __init__(self, n: int, micro: int, accum: int, world: int, seed: int, lengths: Sequence[int] | None = None):
        if n <= 0:
            raise ConfigError("the training dataset is empty")
        if lengths is not None and len(lengths) != n:
            raise ConfigError(f"{len(lengths)} example lengths for {n} examples")
        self.n, self.micro, self.accum, self.world, self.seed = n, micro, accum, world, seed
        self.lengths = list(lengths) if lengths is not None else None
        self._perm_epoch, self._perm = -1, None

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    def _index(self, pos: int) -> int:
        epoch, i = divmod(pos, self.n)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        return self._perm[i]

    def micro_indices(self, step: int, k: int, rank: int) -> list[int]:
        offset = (k * self.world + rank) * self.micro
        if self.lengths is None:
            start = step * self.global_batch + offset
            return [self._index(p) for p in range(start, start + self.micro)]
        g0 = step * self.global_batch
        batch = sorted((self.lengths[i], p, i) for p, i in ((p, self._index(p)) for p in range(g0, g0 + self.global_batch)))
        return [i for _, _, i in batch[offset: offset + self.micro]]


# ------------------------------------------------------------------------------------------ recipe API
@dataclass
class LossOutput:
    """Loss of one micro-batch. `tokens`: positions processed (for tokens/s); `metrics`: extra scalars."""

    loss: torch.Tensor
    tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


class Recipe:
    """What a component's training recipe provides (see the module docstring)."""

    name: str = "recipe"
    phases: tuple[str, ...] = ("main",)
    ddp_kwargs: dict[str, Any] = {}
    no_decay: set[str] = set()  # parameter names never weight-decayed (besides 1-D ones)
    whole_graph: bool = False  # set by the trainer under DDP/FSDP: no data-dependent branch skipping

    def build_model(self, device: torch.device) -> nn.Module:
        raise NotImplementedError

    def dataset(self) -> Sequence[Any]:
        raise NotImplementedError

    def example_lengths(self) -> Sequence[int] | None:
        """Length of every dataset example (for `train.group_by_length`); None: not known."""
        return None

    def collate(self, items: list[Any]) -> Any:
        return items

    def move_batch(self, batch: Any, device: torch.device) -> Any:
        return move_to(batch, device)

    def loss(self, model: nn.Module, batch: Any, phase: str) -> LossOutput:
        raise NotImplementedError

    def phase_parameters(self, model: nn.Module, phase: str) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def fsdp_modules(self, model: nn.Module) -> list[nn.Module]:
        return []

    def export(self, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
        raise NotImplementedError

    def config_dict(self) -> dict[str, Any]:
        return {}


def move_to(x: Any, device: torch.device) -> Any:
    """Recursively move tensors (in dataclasses, dicts, lists, tuples) to `device`."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: move_to(getattr(x, f.name), device) for f in dataclasses.fields(x)})
    if isinstance(x, dict):
        return {k: move_to(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(move_to(v, device) for v in x)
    return x


# ------------------------------------------------------------------------------------------ checkpoints
def _dedupe_shared(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep one copy of tensors that share storage (tied weights); return {alias: kept name}."""
    seen: dict[tuple, str] = {}
    out, aliases = {}, {}
    for k, v in sd.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
        if v.numel() and key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        out[k] = v.detach().contiguous().cpu()
    return out, aliases


def copy_folder_files(src: Path, dst: Path, skip: Sequence[str] = ()) -> None:
    """Copy every file and subfolder of `src` into `dst` except the names in `skip` (an export carrying its
    init folder's tokenizer files, align.json, ...); existing entries are overwritten."""
    for item in Path(src).iterdir():
        if item.name not in skip:
            target = Path(dst) / item.name
            shutil.copytree(item, target, dirs_exist_ok=True) if item.is_dir() else shutil.copy2(item, target)


def save_state_dict(sd: dict[str, torch.Tensor], path: Path) -> None:
    tensors, aliases = _dedupe_shared(sd)
    save_safetensors(tensors, path, metadata={"format": "pt", "aliases": json.dumps(aliases)})


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    sd = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for alias, name in aliases.items():
        sd[alias] = sd[name]
    return sd


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    root = Path(out_dir) / "checkpoints"
    marker = root / "latest"
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    if not (path / "trainer.pt").is_file():
        raise CheckpointError(f"{marker} points at {path}, which is not a complete checkpoint")
    return path


# ------------------------------------------------------------------------------------------ trainer
def _barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


class Trainer:
    """Runs a `Recipe` for `cfg.steps` optimizer steps (see the module docstring for the contract)."""

    def __init__(self, recipe: Recipe, cfg: TrainConfig, optim: OptimConfig, *, env: DistEnv | None = None,
                 full_config: Any = None):
        self.recipe, self.cfg, self.optim_cfg = recipe, cfg, optim
        self.env = env or init_distributed(cfg.device)
        self.full_config = full_config
        self.out_dir = Path(cfg.out_dir)
        self.autocast_dtype = resolve_precision(self.env.device, cfg.precision)
        if cfg.micro_batch < 1 or cfg.grad_accum < 1 or cfg.steps < 1:
            raise ConfigError("train.micro_batch, train.grad_accum and train.steps must be >= 1")
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.raw_model = recipe.build_model(self.env.device)
        self.parallel = self._parallel_mode()
        recipe.whole_graph = self.parallel != "none"
        self.model = self._wrap(self.raw_model)
        self.optimizers = {ph: build_optimizer(recipe.phase_parameters(self.raw_model, ph), optim, recipe.no_decay)
                           for ph in recipe.phases}
        self.schedulers = {ph: build_scheduler(o, optim, cfg.steps) for ph, o in self.optimizers.items()}
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.data = recipe.dataset()
        lengths = recipe.example_lengths() if cfg.group_by_length else None
        if cfg.group_by_length and lengths is None:
            raise ConfigError(f"train.group_by_length: the {recipe.name} recipe does not know its example lengths")
        self.order = GlobalBatchOrder(len(self.data), cfg.micro_batch, cfg.grad_accum, self.env.world_size, cfg.seed,
                                      lengths)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        # per-rank stream for dropout etc., distinct across ranks, restored on resume
        torch.manual_seed(cfg.seed + 7919 * (self.env.rank + 1))
        if cfg.resume and (ckpt := latest_checkpoint(self.out_dir)) is not None:
            self.load_checkpoint(ckpt)

    # ---- setup -------------------------------------------------------------------------------------------
    def _parallel_mode(self) -> str:
        mode = self.cfg.parallel
        if mode == "auto":
            mode = "ddp" if self.env.distributed else "none"
        if mode != "none" and not self.env.distributed:
            logger.info("parallel=%s requested in a single process: running unwrapped", mode)
            mode = "none"
        return mode

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.parallel == "ddp":
            ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model, device_ids=ids, **self.recipe.ddp_kwargs)
        if self.parallel == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for m in self.recipe.fsdp_modules(model):
                fully_shard(m)
            fully_shard(model)
            return model
        return model

    # ---- one step ----------------------------------------------------------------------------------------
    def _no_sync(self, last: bool):
        if last or self.parallel == "none":
            return contextlib.nullcontext()
        if self.parallel == "ddp":
            return self.model.no_sync()
        self.model.set_requires_gradient_sync(False)  # FSDP2; re-enabled before the last micro-step
        return contextlib.nullcontext()

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.autocast_dtype)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step per phase over one global batch; returns the logged record."""
        cfg, env = self.cfg, self.env
        t0 = time.perf_counter()
        batches = [self.recipe.move_batch(self.recipe.collate([self.data[i] for i in self.order.micro_indices(
            self.step, k, env.rank)]), env.device) for k in range(cfg.grad_accum)]
        stats = torch.zeros(2 + len(self.recipe.phases), dtype=torch.float64)  # tokens, samples, loss per phase
        metrics: dict[str, float] = {}
        lrs = {}
        for p_i, phase in enumerate(self.recipe.phases):
            opt = self.optimizers[phase]
            params = [p for g in opt.param_groups for p in g["params"]]
            for k, batch in enumerate(batches):
                last = k == cfg.grad_accum - 1
                if self.parallel == "fsdp" and last:
                    self.model.set_requires_gradient_sync(True)
                with self._no_sync(last):
                    with self._autocast():
                        out = self.recipe.loss(self.model, batch, phase)
                    loss = out.loss / cfg.grad_accum
                    if not loss.requires_grad:  # nothing that trains is reached by this micro-batch (e.g. only
                        # the audio branch trains and no item has speech): zero gradients, through the graph
                        # so that DDP still reduces them
                        loss = loss + 0.0 * sum(p.sum() for p in params)
                    (self.scaler.scale(loss) if self.scaler else loss).backward()
                stats[2 + p_i] += float(out.loss.detach()) / cfg.grad_accum
                if p_i == 0:
                    stats[0] += out.tokens
                    stats[1] += cfg.micro_batch
                for name, v in out.metrics.items():
                    metrics[name] = metrics.get(name, 0.0) + float(v) / cfg.grad_accum
            for p in params:  # a branch a micro-batch skipped had zero gradient (what DDP/FSDP reduce it to):
                if p.grad is None:  # its step (weight decay, moments) must not depend on the skipping
                    p.grad = torch.zeros_like(p)
            if self.scaler:
                self.scaler.unscale_(opt)
            gnorm = None
            if self.optim_cfg.grad_clip > 0:
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, self.optim_cfg.grad_clip))
            if self.scaler:
                self.scaler.step(opt)
                self.scaler.update()
            else:
                opt.step()
            lrs[phase] = opt.param_groups[0]["lr"]
            self.schedulers[phase].step()
            self.model.zero_grad(set_to_none=True)
            if gnorm is not None:
                metrics[f"grad_norm/{phase}" if len(self.recipe.phases) > 1 else "grad_norm"] = gnorm
        if env.distributed:
            dist.all_reduce(stats)
            stats[2:] /= env.world_size
            if metrics:
                m = torch.tensor(list(metrics.values()), dtype=torch.float64)
                dist.all_reduce(m)
                metrics = dict(zip(metrics, (m / env.world_size).tolist()))
        self.step += 1
        dt = time.perf_counter() - t0
        rec: dict[str, Any] = {"step": self.step}
        for p_i, phase in enumerate(self.recipe.phases):
            rec["loss" if len(self.recipe.phases) == 1 else f"loss/{phase}"] = float(stats[2 + p_i])
        rec.update(metrics)
        rec.update({"lr": lrs[self.recipe.phases[0]], "tokens": int(stats[0]), "tokens_per_s": float(stats[0]) / dt,
                    "samples_per_s": float(stats[1]) / dt, "step_s": dt})
        return rec

    # ---- loop --------------------------------------------------------------------------------------------
    def fit(self) -> list[dict[str, Any]]:
        """Train until `train.steps` (or `max_steps_this_run` more steps); checkpoint at the end."""
        cfg = self.cfg
        if self.env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if self.full_config is not None:
                dump_config(self.full_config, self.out_dir / "config.yaml")
        stop = cfg.steps if cfg.max_steps_this_run <= 0 else min(cfg.steps, self.step + cfg.max_steps_this_run)
        self.raw_model.train()
        log_path = self.out_dir / "log.jsonl"
        while self.step < stop:
            rec = self.train_step()
            self.history.append(rec)
            if self.env.is_main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if cfg.log_every > 0 and (self.step % cfg.log_every == 0 or self.step == stop):
                    loss_txt = " ".join(f"{k}={v:.4f}" for k, v in rec.items() if k.startswith("loss"))
                    logger.info("step %d/%d %s lr=%.3g %.0f tok/s", self.step, cfg.steps, loss_txt, rec["lr"],
                                rec["tokens_per_s"])
            if cfg.save_every > 0 and self.step % cfg.save_every == 0 and self.step < stop:
                self.save_checkpoint()
        self.save_checkpoint()
        return self.history

    # ---- state -------------------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded model state on CPU (every rank must call it under FSDP; meaningful on rank 0)."""
        if self.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu() for k, v in self.raw_model.state_dict().items()}

    def _optim_states(self) -> dict[str, Any]:
        if self.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return {ph: get_optimizer_state_dict(self.model, o, options=opts) for ph, o in self.optimizers.items()}
        return {ph: o.state_dict() for ph, o in self.optimizers.items()}

    def save_checkpoint(self) -> Path:
        """Atomically write out_dir/checkpoints/step_XXXXXXX and point `latest` at it."""
        env = self.env
        root = self.out_dir / "checkpoints"
        name = f"step_{self.step:07d}"
        final, tmp = root / name, root / (name + ".tmp")
        sd, optim = self.full_state_dict(), self._optim_states()
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier(env)
        torch.save(rng_state(), tmp / f"rng_rank{env.rank}.pt")
        if env.is_main:
            save_state_dict(sd, tmp / "model.safetensors")
            torch.save({"step": self.step, "samples": self.step * self.order.global_batch, "world_size": env.world_size,
                        "optimizers": optim, "schedulers": {ph: s.state_dict() for ph, s in self.schedulers.items()},
                        "scaler": self.scaler.state_dict() if self.scaler else None}, tmp / "trainer.pt")
            if self.full_config is not None:
                dump_config(self.full_config, tmp / "config.yaml")
        _barrier(env)
        if env.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _atomic_write_text(root / "latest", name + "\n")
            self._prune(root)
            logger.info("checkpoint %s", final)
        _barrier(env)
        return final

    def _prune(self, root: Path) -> None:
        if self.cfg.keep_last <= 0:
            return
        done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[: -self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        path = Path(path)
        state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
        sd = load_state_dict_file(path / "model.safetensors")
        if self.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, sd, options=opts)
            for ph, o in self.optimizers.items():
                set_optimizer_state_dict(self.model, o, state["optimizers"][ph], options=opts)
        else:
            missing, unexpected = self.raw_model.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise CheckpointError(f"{path}: checkpoint does not match the model (missing {missing[:5]}, "
                                      f"unexpected {unexpected[:5]})")
            for ph, o in self.optimizers.items():
                o.load_state_dict(state["optimizers"][ph])
        for ph, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][ph])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        if state.get("world_size") != self.env.world_size:
            logger.warning("resuming a %s-process checkpoint with %d processes: data order continues by sample count",
                           state.get("world_size"), self.env.world_size)
        rng_file = path / f"rng_rank{self.env.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
        logger.info("resumed from %s at step %d", path, self.step)

    def export(self, folder: str | os.PathLike) -> Path | None:
        """Write the recipe's native model folder (rank 0); returns the folder on rank 0, else None."""
        sd = self.full_state_dict()
        folder = Path(folder)
        if self.env.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            self.recipe.export(sd, folder)
        _barrier(self.env)
        return folder if self.env.is_main else None


def run_recipe(recipe: Recipe, cfg: Any, env: DistEnv | None = None) -> tuple[Trainer, list[dict[str, Any]]]:
    """Train `recipe` with `cfg.train` / `cfg.optim`; once the run has reached its last step, export the native
    folder to `cfg.export_dir` (default `<train.out_dir>/export`). Returns (trainer, history)."""
    trainer = Trainer(recipe, cfg.train, cfg.optim, env=env, full_config=cfg)
    history = trainer.fit()
    if trainer.step >= cfg.train.steps:
        trainer.export(Path(cfg.export_dir or Path(cfg.train.out_dir) / "export"))
    return trainer, history


__all__ = [
    "run_recipe",
    "DistEnv", "init_distributed", "resolve_device", "resolve_precision", "build_optimizer", "build_scheduler",
    "lr_factor", "GlobalBatchOrder", "LossOutput", "Recipe", "Trainer", "move_to", "latest_checkpoint",
    "save_state_dict", "load_state_dict_file", "rng_state", "set_rng_state",
]
