"""Evaluation manifests in the official kit's jsonl layout, with row validation and a dataset registry.

One json object per line: `index`, `audio_path` (a string or a list of strings), `question`, `answer`,
`subset`, optionally `audio_content`, `meta` (and any other field, kept untouched so the kit's published
files run unchanged). Relative audio paths resolve against the manifest's folder.

A bad row never stops a run: it becomes a `BadRow` with a reason (unparsable json, missing field, missing
audio file, unreadable audio, empty answer), is logged and counted in the metrics. Audio outside the kit's
length window (0.1 s to 60 s) is skipped and counted separately, as the kit does.

Named datasets and groups: `--data NAME` looks for `NAME.jsonl` (or `NAME/NAME.jsonl`) under the data
root (`--data-root`, `$KIMIA_EVAL_DATA`, default `./eval_data`); `--data GROUP` expands a group of the
registry below to every member found there.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kimia.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["EvalItem", "BadRow", "Manifest", "load_manifest", "audio_duration", "resolve_data",
           "DATASETS", "GROUPS", "MIN_SECONDS", "MAX_SECONDS"]

MIN_SECONDS = 0.1
MAX_SECONDS = 60.0

# name -> (task, language); the task picks the default recipe and the metric.
DATASETS: dict[str, tuple[str, str | None]] = {
    "librispeech": ("asr", "en"), "fleurs-en": ("asr", "en"), "fleurs-zh": ("asr", "zh"),
    "aishell-1": ("asr", "zh"), "aishell-2": ("asr", "zh"), "wenetspeech": ("asr", "zh"),
    "asterisk-en": ("asr", "en"), "pocketsphinx-en": ("asr", "en"),
    "mmau-test-mini": ("mqa", None), "openbookqa": ("mqa", "en"), "mmsu": ("mqa", "en"),
    "meld": ("emotion", "en"), "vocalsound": ("sound_event", None), "nonspeech7k": ("sound_event", None),
    "tut2017": ("sound_scene", None), "cochlscene": ("sound_scene", None),
    "clothoaqa": ("audio_qa", "en"), "sd-qa": ("audio_qa", "en"), "openaudiobench": ("audio_qa", None),
    "clotho": ("captioning", "en"), "audiocaps": ("captioning", "en"),
    "alpacaeval_full": ("conversation", "en"), "commoneval": ("conversation", "en"),
}
GROUPS: dict[str, list[str]] = {
    "asr": ["librispeech", "fleurs-en", "fleurs-zh", "aishell-1", "aishell-2", "wenetspeech"],
    "real-speech": ["asterisk-en", "pocketsphinx-en"],
    "mqa": ["mmau-test-mini", "openbookqa", "mmsu", "meld", "nonspeech7k", "tut2017", "vocalsound", "cochlscene"],
    "audio-event": ["nonspeech7k", "tut2017", "vocalsound", "cochlscene"],
    "refqa": ["clothoaqa", "sd-qa", "openaudiobench"],
    "open-qa": ["alpacaeval_full", "commoneval"],
}
GROUPS["all"] = sorted({n for g in GROUPS.values() for n in g})


@dataclass
class EvalItem:
    """One valid row: resolved audio paths, the fields the runner needs, and the raw record to echo back."""

    index: str
    audio_paths: list[Path]
    question: str
    answer: str
    subset: str
    meta: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    duration: float | None = None  # seconds, summed over the item's audio files, filled by validation

    @property
    def prompt_fields(self) -> dict[str, Any]:
        """The values a recipe's prompt may name besides `{question}`: the record's `audio_content` (what its
        audio says, '' when the manifest does not give it) and every `meta` key."""
        return {"audio_content": str(self.record.get("audio_content") or ""), **self.meta}


@dataclass
class BadRow:
    """A row that cannot be evaluated, with its line number (1-based) and the reason."""

    line: int
    index: str | None
    reason: str
    skipped: bool = False  # True for a valid row outside the length window (counted, not an error)

    def to_dict(self) -> dict:
        return {"line": self.line, "index": self.index, "reason": self.reason, "skipped": self.skipped}


@dataclass
class Manifest:
    """A parsed manifest: its name, the valid items (file order) and the rejected rows."""

    name: str
    path: Path
    items: list[EvalItem]
    bad: list[BadRow]

    @property
    def errors(self) -> list[BadRow]:
        return [b for b in self.bad if not b.skipped]

    @property
    def skipped(self) -> list[BadRow]:
        return [b for b in self.bad if b.skipped]


def audio_duration(path: Path) -> float:
    """Duration in seconds from the file header (soundfile), else by decoding (kimia.audio / PyAV)."""
    import soundfile as sf
    try:
        info = sf.info(str(path))
        if info.samplerate > 0 and info.frames > 0:
            return info.frames / info.samplerate
    except Exception:  # not a soundfile format (or a corrupt header): decode it
        pass
    from kimia.audio import SAMPLE_RATE, load_audio
    wav = load_audio(path, min_seconds=0.0)
    return wav.shape[-1] / SAMPLE_RATE


def _item_from_record(rec: dict, base: Path, lineno: int) -> EvalItem | BadRow:
    index = rec.get("index")
    index = str(index) if index is not None else None
    for key in ("index", "audio_path", "answer"):
        if key not in rec:
            return BadRow(lineno, index, f"missing field '{key}'")
    answer = rec["answer"]
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        return BadRow(lineno, index, "empty answer")
    raw_paths = rec["audio_path"]
    raw_paths = [raw_paths] if isinstance(raw_paths, str) else raw_paths
    if not isinstance(raw_paths, list) or not raw_paths or not all(isinstance(p, str) and p for p in raw_paths):
        return BadRow(lineno, index, "audio_path must be a non-empty string or list of strings")
    paths = [p if p.is_absolute() else base / p for p in (Path(os.path.expanduser(r)) for r in raw_paths)]
    meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
    return EvalItem(index=index, audio_paths=paths, question=str(rec.get("question") or ""),
                    answer=answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False),
                    subset=str(rec.get("subset") or "default"), meta=meta, record=rec)


def _check_audio(item: EvalItem, lineno: int, min_s: float, max_s: float) -> BadRow | None:
    total = 0.0
    for p in item.audio_paths:
        if not p.is_file():
            return BadRow(lineno, item.index, f"missing audio file {p}")
        try:
            d = audio_duration(p)
        except Exception as exc:  # any decoder failure is a bad row, never a crash
            return BadRow(lineno, item.index, f"unreadable audio {p}: {exc}")
        if not (min_s <= d <= max_s):
            return BadRow(lineno, item.index, f"audio {p.name} lasts {d:.2f} s, outside [{min_s}, {max_s}] s",
                          skipped=True)
        total += d
    item.duration = total
    return None


def load_manifest(path: str | os.PathLike, *, check_audio: bool = True, min_seconds: float = MIN_SECONDS,
                  max_seconds: float = MAX_SECONDS, name: str | None = None) -> Manifest:
    """Parse a jsonl manifest; every problem becomes a `BadRow` (logged), only a missing file raises."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"evaluation manifest {path} does not exist")
    base = path.parent
    items: list[EvalItem] = []
    bad: list[BadRow] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                bad.append(BadRow(lineno, None, f"not valid json: {exc.msg}"))
                continue
            if not isinstance(rec, dict):
                bad.append(BadRow(lineno, None, "row is not a json object"))
                continue
            got = _item_from_record(rec, base, lineno)
            if isinstance(got, EvalItem) and got.index in seen:
                got = BadRow(lineno, got.index, "duplicate index")
            if isinstance(got, EvalItem) and check_audio:
                got = _check_audio(got, lineno, min_seconds, max_seconds) or got
            if isinstance(got, BadRow):
                bad.append(got)
                continue
            seen.add(got.index)
            items.append(got)
    for b in bad:
        (logger.info if b.skipped else logger.warning)("%s line %d (index %s): %s", path.name, b.line, b.index,
                                                       b.reason)
    return Manifest(name=name or path.stem, path=path, items=items, bad=bad)


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    return Path(explicit or os.environ.get("KIMIA_EVAL_DATA") or "eval_data")


def resolve_data(spec: str, root: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """`--data` value -> [(dataset name, manifest path)]: a jsonl path, a dataset name or a group."""
    p = Path(spec)
    if p.suffix == ".jsonl" or p.is_file():
        if not p.is_file():
            raise ConfigError(f"evaluation manifest {p} does not exist")
        return [(p.stem, p)]
    base = data_root(root)

    def find(name: str) -> Path | None:
        for cand in (base / f"{name}.jsonl", base / name / f"{name}.jsonl"):
            if cand.is_file():
                return cand
        return None

    if spec in GROUPS:
        found = [(n, f) for n in GROUPS[spec] if (f := find(n)) is not None]
        if not found:
            raise ConfigError(f"group '{spec}': none of {GROUPS[spec]} found under {base}")
        return found
    f = find(spec)
    if f is None:
        raise ConfigError(f"dataset '{spec}' not found: no {spec}.jsonl under {base} "
                          f"(known groups: {', '.join(sorted(GROUPS))})")
    return [(spec, f)]
