"""Corpus files: atomic JSON/jsonl/wav writes, manifests in the evaluation kit's layout, finetune conversations.

Layout of a corpus folder (all paths inside records are relative to the corpus root, so a corpus can move):

    audio/<task>/<id>_<clip>.wav      16 kHz inputs (what the model hears)
    target/<task>/<id>_<clip>.wav     24 kHz spoken answers in the one fixed output voice
    items/<id>.synth.json             clip list after synthesis (before judging)
    items/<id>.json                   final record (accepted or rejected, with the judge's verdicts)
    manifests/<task>_<split>.jsonl    evaluation-kit records: index, audio_path, question, answer, subset + task fields
    finetune/<split>.jsonl            {"task_type", "conversation": [messages]} for training
    summary.json

Every file is written to a temporary name in the same folder and renamed into place, so a killed run
leaves either the whole file or nothing; that is what makes a run resumable.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import soundfile as sf

from kimia.errors import ConfigError

EVAL_KIT_FIELDS = ("index", "audio_path", "question", "answer", "subset")


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tmp.write_text(json.dumps(obj, ensure_ascii=False, sort_keys=True, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def link_atomic(src: Path, dst: Path) -> None:
    """`dst` becomes the same file as `src` (a hard link; a copy across file systems), replacing any leftover."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(dst)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def write_wav_atomic(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM wav, written under a temporary name and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    sf.write(str(tmp), np.clip(np.asarray(audio, np.float32), -1.0, 1.0), sample_rate, subtype="PCM_16",
             format="WAV")
    os.replace(tmp, path)


def write_jsonl_atomic(path: Path, records: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable JSON ({e})") from e


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a jsonl file; a malformed line raises ConfigError naming the file and line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError as e:
                    raise ConfigError(f"{path}:{i}: malformed jsonl record ({e})") from e
    return out


def corpus_root_of(manifest: str | os.PathLike) -> Path:
    """The corpus folder a manifest or finetune file belongs to (its grandparent)."""
    return Path(manifest).resolve().parent.parent


def _resolve(base: Path, p):
    if isinstance(p, list):
        return [_resolve(base, x) for x in p]
    return os.path.normpath(str(base / p)) if isinstance(p, str) and p and not os.path.isabs(p) else p


def _from_manifest_dir(p):
    """A corpus-root-relative path as written in manifests/ and finetune/ files: relative to that file's
    own folder (one level below the root), as the official evaluation kit resolves audio paths."""
    if isinstance(p, list):
        return [_from_manifest_dir(x) for x in p]
    return f"../{p}" if isinstance(p, str) and p and not os.path.isabs(p) else p


def read_manifest(path: str | os.PathLike, absolute: bool = True) -> list[dict]:
    """Evaluation-kit records; with `absolute`, audio paths are resolved against the manifest's folder."""
    recs = read_jsonl(path)
    if absolute:
        base = Path(path).resolve().parent
        for r in recs:
            for k in ("audio_path", "target_audio_path"):
                if k in r:
                    r[k] = _resolve(base, r[k])
    return recs


def read_conversations(path: str | os.PathLike, absolute: bool = True) -> list[dict]:
    """Finetune samples; with `absolute`, every audio content path is resolved against the file's folder."""
    recs = read_jsonl(path)
    if absolute:
        base = Path(path).resolve().parent
        for r in recs:
            for m in r["conversation"]:
                if m["message_type"] == "audio":
                    m["content"] = _resolve(base, m["content"])
                elif m["message_type"] == "audio-text":
                    m["content"] = [_resolve(base, m["content"][0]), m["content"][1]]
    return recs


def user_text(text: str) -> dict:
    return {"role": "user", "message_type": "text", "content": text}


def user_audio(path: str) -> dict:
    return {"role": "user", "message_type": "audio", "content": path}


def assistant_text(text: str) -> dict:
    return {"role": "assistant", "message_type": "text", "content": text}


def assistant_audio_text(path: str, text: str) -> dict:
    return {"role": "assistant", "message_type": "audio-text", "content": [path, text]}


# ------------------------------------------------------------------------------- records -> outputs
def _input_clips(rec: dict) -> list[dict]:
    return [c for c in rec["clips"] if c["kind"] != "target"]


def _clip_voice(c: dict) -> dict | None:
    return c["voice"] if c["kind"] != "sound" else (c["speech"]["voice"] if c.get("speech") else None)


def eval_record(rec: dict) -> dict:
    """One evaluation-kit record (index, audio_path, question, answer, subset) plus the task fields."""
    ins = _input_clips(rec)
    tg = [c for c in rec["clips"] if c["kind"] == "target"]
    voice = _clip_voice(ins[0]) if ins else None  # a speak item has no input audio: its prompt is text
    said = (ins or tg)[-1]
    wers = [v["wer"] for v in (rec.get("verdicts") or {}).values()]
    return {
        "index": rec["id"],
        "audio_path": (None if not ins else _from_manifest_dir(ins[0]["path"]) if len(ins) == 1
                       else _from_manifest_dir([c["path"] for c in ins])),
        "question": rec["question"], "answer": rec["answer"], "subset": rec["category"],
        "task": rec["task"], "category": rec["category"], "split": rec["split"], "key": rec["key"],
        "text": said["text"], "audio_content": said["text"] if ins else None,
        "voice": f"{voice['engine']}:{voice['name']}" if voice else None,
        "engine": voice["engine"] if voice else "sound" if ins else None, "gender": voice["gender"] if voice else None,
        "speed": said.get("speed", 1.0), "pitch": said.get("pitch", 1.0),
        "labels": rec.get("labels", {}), "history": rec.get("history", []),
        "duration": round(sum(c["duration"] for c in ins), 4),
        "target_audio_path": _from_manifest_dir(tg[-1]["path"]) if tg else None, "target_text": tg[-1]["text"] if tg else None,
        "target_duration": round(sum(c["duration"] for c in tg), 4),
        "judge_wer": max(wers) if wers else None,
    }


def conversation_record(rec: dict) -> dict:
    """Finetune sample {"task_type", "task", "conversation"} in Kimi-Audio's message format (`task` is the
    corpus task the sample comes from; the official finetune reader ignores unknown fields)."""
    clips = {c["name"]: c for c in rec["clips"]}
    if rec["task"] in ("spoken_qa", "dialogue"):
        conv = []
        for u, a in (("u0", "a0"), ("u1", "a1")):
            if u in clips:
                conv += [user_audio(_from_manifest_dir(clips[u]["path"])),
                         assistant_audio_text(_from_manifest_dir(clips[a]["path"]), clips[a]["text"])]
        return {"task_type": "speech2speech", "task": rec["task"], "conversation": conv}
    if rec["task"] == "speak":  # text in, the same text spoken out
        return {"task_type": "speech2speech", "task": rec["task"],
                "conversation": [user_text(rec["question"]),
                                 assistant_audio_text(_from_manifest_dir(clips["a0"]["path"]), clips["a0"]["text"])]}
    if rec["task"] == "meaning":
        return _heard_and_answered_in_text(rec, rec["task"])
    return {"task_type": "understanding", "task": rec["task"],
            "conversation": [user_text(rec["question"]), user_audio(_from_manifest_dir(clips["u0"]["path"])),
                             assistant_text(rec["answer"])]}


def conversation_records(rec: dict) -> list[dict]:
    """Every finetune sample of one item: its conversation, and for a spoken question also the same question
    answered in text only (the `ct` layout a text-mode request uses), so both output types are trained."""
    out = [conversation_record(rec)]
    if rec["task"] == "spoken_qa":
        out.append(_heard_and_answered_in_text(rec, "spoken_qa_text"))
    return out


def _heard_and_answered_in_text(rec: dict, task: str) -> dict:
    """The item's spoken question (clip u0) alone as the user turn, its answer in text."""
    u0 = next(c for c in rec["clips"] if c["name"] == "u0")
    return {"task_type": "understanding", "task": task,
            "conversation": [user_audio(_from_manifest_dir(u0["path"])), assistant_text(rec["answer"])]}


def summarize(recs: list[dict], cfg, engines: list[str], missing: list[str], out_voice, stats: dict,
              wall_s: float) -> dict:
    """Hours per task / engine / voice / split, rejection rates, and this run's counters."""
    acc = [r for r in recs if r["status"] == "accepted"]
    hours: dict = {k: {} for k in ("per_task", "per_engine", "per_voice", "per_split", "per_category",
                                   "target_per_task")}

    def add(table: dict, key: str, secs: float):
        table[key] = table.get(key, 0.0) + secs / 3600.0

    tgt = 0.0
    for r in acc:
        e = eval_record(r)
        if e["target_duration"]:
            add(hours["target_per_task"], r["task"], e["target_duration"])
        tgt += e["target_duration"] / 3600.0
        if not _input_clips(r):  # speak: no input audio (its spoken answers are in target_per_task)
            continue
        add(hours["per_task"], r["task"], e["duration"])
        add(hours["per_engine"], e["engine"], e["duration"])
        add(hours["per_voice"], e["voice"] or "sound", e["duration"])
        add(hours["per_split"], r["split"], e["duration"])
        add(hours["per_category"], f"{r['task']}/{r['category']}", e["duration"])
    for t in hours.values():
        for k in t:
            t[k] = round(t[k], 6)
    by_task: dict = {}
    by_engine: dict = {}
    for r in recs:
        ins = _input_clips(r)
        v = _clip_voice(ins[0]) if ins else r["clips"][0]["voice"]
        for table, key in ((by_task, r["task"]), (by_engine, v["engine"] if v else "sound")):
            n, bad = table.get(key, (0, 0))
            table[key] = (n + 1, bad + (r["status"] != "accepted"))
    n_rej = len(recs) - len(acc)
    return {
        "seed": cfg.seed, "hours_requested": cfg.hours, "tasks": list(cfg.tasks), "judge": cfg.judge,
        "eval_fraction": cfg.eval_fraction, "engines_used": engines, "engines_missing": missing,
        "output_voice": out_voice.key,
        "items": {"planned": stats["planned"], "finished": len(recs), "accepted": len(acc), "rejected": n_rej,
                  "accepted_per_task": {t: sum(r["task"] == t for r in acc) for t in cfg.tasks}},
        "rejection_rate": round(n_rej / max(len(recs), 1), 4),
        "rejection_rate_per_task": {k: round(b / n, 4) for k, (n, b) in sorted(by_task.items())},
        "rejection_rate_per_engine": {k: round(b / n, 4) for k, (n, b) in sorted(by_engine.items())},
        "hours": {"input": round(sum(hours["per_task"].values()), 6), "target": round(tgt, 6), **hours},
        "run": stats, "wall_seconds": round(wall_s, 1),
    }


def write_outputs(root: Path, recs: list[dict], cfg, engines, missing, out_voice, stats: dict, wall_s: float) -> dict:
    """Rewrite manifests/<task>_<split>.jsonl, finetune/<split>.jsonl and summary.json from final records."""
    acc = [r for r in recs if r["status"] == "accepted"]
    for task in cfg.tasks:
        for split in ("train", "eval"):
            write_jsonl_atomic(root / "manifests" / f"{task}_{split}.jsonl",
                               (eval_record(r) for r in acc if r["task"] == task and r["split"] == split))
    for split in ("train", "eval"):
        write_jsonl_atomic(root / "finetune" / f"{split}.jsonl",
                           (c for r in acc if r["split"] == split for c in conversation_records(r)))
    summary = summarize(recs, cfg, engines, missing, out_voice, stats, wall_s)
    write_json_atomic(root / "summary.json", summary)
    return summary


def format_summary(s: dict) -> str:
    """Human-readable summary: hours per task, engine and voice, rejection rates."""
    h = s["hours"]
    lines = [f"corpus: {s['items']['accepted']} items accepted, {s['items']['rejected']} rejected "
             f"(rejection rate {s['rejection_rate']:.1%}), {h['input'] * 60:.1f} min input audio, "
             f"{h['target'] * 60:.1f} min target audio in {s['output_voice']}; {s['wall_seconds']:.0f} s",
             f"engines used: {', '.join(s['engines_used'])}; missing: {', '.join(s['engines_missing']) or 'none'}"]
    for title, key in (("task", "per_task"), ("split", "per_split"), ("engine", "per_engine")):
        rej = s.get(f"rejection_rate_per_{title}", {})
        lines.append(f"minutes per {title}: " + ", ".join(
            f"{k} {v * 60:.2f}" + (f" (rej {rej[k]:.0%})" if k in rej else "") for k, v in sorted(h[key].items())))
    if h.get("target_per_task"):
        lines.append("minutes of spoken answers per task: " + ", ".join(
            f"{k} {v * 60:.2f}" for k, v in sorted(h["target_per_task"].items())))
    lines.append(f"voices: {len(h['per_voice'])} distinct; run: {s['run']}")
    return "\n".join(lines)


__all__ = ["EVAL_KIT_FIELDS", "conversation_record", "conversation_records", "eval_record", "format_summary", "summarize", "write_outputs", "assistant_audio_text", "assistant_text", "corpus_root_of", "read_conversations",
           "read_json", "read_jsonl", "read_manifest", "user_audio", "user_text", "write_json_atomic",
           "write_jsonl_atomic", "write_wav_atomic"]
