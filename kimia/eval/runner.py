"""The evaluation runner: batched, resumable, sharded inference over a manifest, then scoring and reports.

Inference goes through a `Predictor` (`predict_batch(items, recipe) -> list[str]`), so the runner works
with any engine; `KimiAudioPredictor` wraps `kimia.api.KimiAudio` (imported lazily).

Layout of a run, `<work_dir>/<model>/<dataset>/`:
- `recipe.yaml`                      the recipe the predictions were made with (checked on resume)
- `model.json`                       the fingerprint of the model folder that made them (checked on resume,
                                     when the predictor has one: a folder rebuilt in place is not mixed in)
- `shard_<rank>_of_<world>.jsonl`    predictions of one process, appended and flushed after every batch
- `shard_<rank>_of_<world>.done`     written when that process finished its share
- `predictions.jsonl`                merged: the original records + `prediction`, `real_prompt`, `duration`
- `bad_rows.jsonl`, `metrics.json`, `report.md`, `plots/*.png`   (see kimia.eval.report)

Resuming: every shard file in the folder (whatever world size wrote it) is read first and the indices it
holds are not predicted again; a line cut short by a kill is ignored. Sharding: items `[rank::world]`,
rank and world size from torchrun's `RANK`/`WORLD_SIZE` unless given. The last process to finish merges
the shards and scores.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

from kimia.errors import ConfigError, KimiaError
from kimia.eval.datasets import EvalItem, Manifest
from kimia.eval.recipes import Recipe

logger = logging.getLogger(__name__)

__all__ = ["Predictor", "KimiAudioPredictor", "RunResult", "dist_env", "run_dataset", "merge_shards",
           "folder_fingerprint"]

_WHOLE_FILE = 4 << 20  # files up to this size are hashed whole
_SAMPLE = 1 << 20      # bigger ones by three samples of this size (start, middle, end) and their size


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """A content fingerprint of a model folder that costs milliseconds even for a 7B release: every file's
    relative path and size, small files (configs, deltas) whole, big weight files by three samples.
    Retraining rewrites every weight, so a rebuilt folder gets a new fingerprint; copying or touching a
    folder (new mtimes) keeps it."""
    root = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        size = path.stat().st_size
        h.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        with path.open("rb") as fh:
            if size <= _WHOLE_FILE:
                h.update(fh.read())
            else:
                for offset in (0, size // 2, size - _SAMPLE):
                    fh.seek(offset)
                    h.update(fh.read(_SAMPLE))
    return h.hexdigest()[:16]


@runtime_checkable
class Predictor(Protocol):
    """Anything that answers a batch of items under a recipe, one string per item, in order."""

    def predict_batch(self, items: Sequence[EvalItem], recipe: Recipe) -> list[str]: ...


class KimiAudioPredictor:
    """`Predictor` over `kimia.api.KimiAudio`: the recipe's messages, output type and sampling, text out.

    `fingerprint` is the model folder's (`folder_fingerprint`): the runner stores it beside the predictions
    and refuses to resume a run folder whose predictions another model made.

    `generate_batch` is used for batches when the model offers it, else `generate` item by item. The model
    loads without its detokenizer until a recipe asks for spoken answers (`output_type: both`, scored by
    `kimia.eval.speech`); their audio goes to `<run_dir>/audio/` (the runner calls `set_run_dir`).
    """

    def __init__(self, model_path: str | None, *, device: str | None = None, dtype: str | None = None, **kwargs):
        self._path, self._kwargs = model_path, {"device": device, "dtype": dtype, **kwargs}
        self._model, self._with_detokenizer = None, False
        self.run_dir: Path | None = None
        self.name = Path(model_path).name if model_path else "kimia-small"
        self.fingerprint = folder_fingerprint(self._get(False).parts.paths.root)  # the folder it loaded

    def _get(self, detokenizer: bool):
        if self._model is not None and (self._with_detokenizer or not detokenizer):
            return self._model
        from kimia.api import KimiAudio  # lazy: the eval package must import without the model stack

        wanted = {**self._kwargs, "load_detokenizer": detokenizer}
        try:
            params = inspect.signature(KimiAudio).parameters
            accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
            wanted = {k: v for k, v in wanted.items() if v is not None and (accepts_any or k in params)}
        except (TypeError, ValueError):
            wanted = {}
        self._model, self._with_detokenizer = KimiAudio(self._path, **wanted), detokenizer
        return self._model

    @property
    def model(self):
        return self._model

    def set_run_dir(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def predict_batch(self, items: Sequence[EvalItem], recipe: Recipe) -> list[str]:
        if recipe.output_type == "both":
            from kimia.eval.speech import speak_batch

            return speak_batch(self._get(True), items, recipe, (self.run_dir or Path("eval_result")) / "audio")
        model = self._get(False)
        chats = [recipe.messages(it.question, [str(p) for p in it.audio_paths], it.prompt_fields) for it in items]
        kwargs = {"output_type": recipe.output_type, **recipe.sampling}
        if len(chats) > 1 and hasattr(model, "generate_batch"):
            outs = model.generate_batch(chats, **kwargs)
        else:
            outs = [model.generate(c, **kwargs) for c in chats]
        return [o[1] if isinstance(o, tuple) else str(o) for o in outs]


def dist_env() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment, (0, 1) outside it."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError as exc:
        raise ConfigError(f"RANK/WORLD_SIZE must be integers: {exc}") from exc


@dataclass
class RunResult:
    """What one process did: how many items it predicted now, reused from before, and failed."""

    run_dir: Path
    predicted: int = 0
    reused: int = 0
    failed: list[dict] = field(default_factory=list)
    merged: bool = False
    seconds: float = 0.0


def _read_shard(path: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # the last line of a killed run may be cut short
                continue
            if isinstance(rec, dict) and "index" in rec and "prediction" in rec:
                out[str(rec["index"])] = rec
    return out


def finished_predictions(run_dir: Path) -> dict[str, dict]:
    """Every prediction already stored in any shard file of the run folder, by index."""
    done: dict[str, dict] = {}
    for shard in sorted(run_dir.glob("shard_*_of_*.jsonl")):
        done.update(_read_shard(shard))
    return done


def _check_made_with(stored: Path, text: str, force: bool, what: str) -> None:
    """`stored` records what made the run folder's predictions (a recipe, a model fingerprint): resuming under
    something else (compared parsed, so formatting does not count) is refused; the record is (re)written."""
    import yaml  # YAML is a superset of the JSON records too

    if stored.is_file() and not force:
        try:
            before = yaml.safe_load(stored.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            before = None
        if before != yaml.safe_load(text):
            raise ConfigError(f"{stored.parent} holds predictions made with another {what}; "
                              "use a different --work-dir or --force-reinfer")
    _atomic_write(stored, text)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _progress(total: int, enabled: bool, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a core dependency
        return None
    return tqdm(total=total, desc=desc, unit="item", disable=not enabled, dynamic_ncols=True)


def _predict_safely(predictor: Predictor, batch: list[EvalItem], recipe: Recipe) -> list[str | Exception]:
    """A batch; on a kimia error retry item by item so one bad item cannot sink its neighbours."""
    try:
        preds = predictor.predict_batch(batch, recipe)
        if len(preds) != len(batch):
            raise ConfigError(f"predictor returned {len(preds)} answers for {len(batch)} items")
        return list(preds)
    except KimiaError as exc:
        if len(batch) == 1:
            return [exc]
    out: list[str | Exception] = []
    for it in batch:
        try:
            out.append(predictor.predict_batch([it], recipe)[0])
        except KimiaError as exc:
            out.append(exc)
    return out


def run_dataset(manifest: Manifest, predictor: Predictor, recipe: Recipe, run_dir: str | Path, *,
                batch_size: int = 1, rank: int | None = None, world_size: int | None = None,
                limit: int | None = None, progress: bool = True, force: bool = False,
                merge: bool = True) -> RunResult:
    """Predict this process's share of `manifest` into `run_dir`, skipping finished items; merge at the end.

    Returns a `RunResult`; `merge_shards` (called here by the last process to finish) writes the merged
    predictions, and `kimia.eval.report.score_run` the metrics and reports.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    env_rank, env_world = dist_env()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    if not (0 <= rank < world_size):
        raise ConfigError(f"rank {rank} is outside world size {world_size}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    shard = run_dir / f"shard_{rank}_of_{world_size}.jsonl"
    if force:  # each process drops its own shard; rank 0 also those of other world sizes
        shard.unlink(missing_ok=True)
        if rank == 0:
            for old in run_dir.glob("shard_*_of_*.jsonl"):
                if not old.name.endswith(f"_of_{world_size}.jsonl"):
                    old.unlink(missing_ok=True)
    if rank == 0:
        _check_made_with(run_dir / "recipe.yaml", recipe.to_yaml(), force, "recipe")
        fingerprint = getattr(predictor, "fingerprint", None)
        if fingerprint is not None:  # a rebuilt model folder is not mixed into its old predictions
            _check_made_with(run_dir / "model.json", json.dumps({"fingerprint": fingerprint}) + "\n", force,
                             f"model (this one's fingerprint: {fingerprint})")
    if hasattr(predictor, "set_run_dir"):
        predictor.set_run_dir(run_dir)

    items = manifest.items[:limit] if limit is not None else manifest.items
    mine = items[rank::world_size]
    done = {} if force else finished_predictions(run_dir)
    todo = [it for it in mine if it.index not in done]
    result = RunResult(run_dir=run_dir, reused=len(mine) - len(todo))
    (run_dir / f"shard_{rank}_of_{world_size}.done").unlink(missing_ok=True)
    if result.reused:
        logger.info("%s: %d of %d items already predicted, %d to go", manifest.name, result.reused, len(mine),
                    len(todo))
    t0 = time.perf_counter()
    bar = _progress(len(todo), progress and rank == 0, f"{manifest.name}[{rank}/{world_size}]")
    try:
        with shard.open("a", encoding="utf-8") as fh:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                answers = _predict_safely(predictor, batch, recipe)
                for it, ans in zip(batch, answers):
                    prompt = recipe.render(it.question, it.prompt_fields)
                    row = {"index": it.index, "real_prompt": prompt, "duration": it.duration}
                    if isinstance(ans, Exception):
                        row.update(prediction=None, error=f"{type(ans).__name__}: {ans}")
                        result.failed.append({"index": it.index, "reason": row["error"]})
                    else:
                        row["prediction"] = "" if ans is None else str(ans)
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
                result.predicted += len(batch)
                if bar is not None:
                    bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    result.seconds = time.perf_counter() - t0
    (run_dir / f"shard_{rank}_of_{world_size}.done").write_text("ok\n", encoding="utf-8")
    if merge and all((run_dir / f"shard_{r}_of_{world_size}.done").is_file() for r in range(world_size)):
        merge_shards(manifest, run_dir, limit=limit)
        result.merged = True
    return result


def merge_shards(manifest: Manifest, run_dir: str | Path, *, limit: int | None = None) -> Path:
    """Write `predictions.jsonl` (manifest order, original record + prediction) and `bad_rows.jsonl`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{manifest.name}: no stored predictions to score in {run_dir} (run without --reeval first, "
                          "or point --work-dir / --model-name at the earlier run)")
    done = finished_predictions(run_dir)
    items = manifest.items[:limit] if limit is not None else manifest.items
    lines, bad = [], [b.to_dict() for b in manifest.bad]
    missing = 0
    for it in items:
        rec = done.get(it.index)
        if rec is None:
            missing += 1
            continue
        if rec.get("prediction") is None:
            bad.append({"line": None, "index": it.index, "reason": f"prediction failed: {rec.get('error')}",
                        "skipped": False})
            continue
        out = {**it.record, "prediction": rec["prediction"], "real_prompt": rec.get("real_prompt", ""),
               "duration": rec.get("duration", it.duration)}
        lines.append(json.dumps(out, ensure_ascii=False))
    if missing:
        logger.warning("%s: %d items have no prediction yet (an unfinished shard?)", manifest.name, missing)
    path = run_dir / "predictions.jsonl"
    _atomic_write(path, "".join(line + "\n" for line in lines))
    _atomic_write(run_dir / "bad_rows.jsonl", "".join(json.dumps(b, ensure_ascii=False) + "\n" for b in bad))
    return path
