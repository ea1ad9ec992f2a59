"""`kimia data synth`: build a judged, balanced, resumable synthetic speech corpus.

Three phases, each parallel over a process pool and each resumable from the files it leaves:

1. **plan** (main process, deterministic; later rounds top up tasks left short by rejections): for every task, item k is drawn from `random.Random(f"{seed}:{task}:{k}")`
   and its input voice comes round-robin over the available engines, so the same seed, engines and tasks
   always give the same texts, voices and parameters; items are added until each task has `hours / n_tasks`
   of estimated input audio (tasks are balanced by duration). The split comes from the sentence
   (`texts.split_of`), never from the item number, so eval sentences are never in train.
2. **synthesise** (pool): every clip of an item is rendered (16 kHz inputs; 24 kHz spoken answers in the one
   fixed output voice) and written atomically, then `items/<id>.synth.json`.
3. **judge** (pool): whole items are packed into ~28 s windows, each window is transcribed once by Whisper base,
   and the transcript is split back to clips by word alignment against the concatenated references (Whisper
   always pays for a 30 s window, so packing makes judging several times cheaper). An item is kept when
   every speech clip passes its task rule (`judge.RULES`); rejected items are counted and their audio removed.
   The final record `items/<id>.json` marks the item done: a rerun skips it.

`reuse_from` names an earlier corpus (e.g. the one a bigger corpus grows from, same seed): every item whose
spec (texts, voices, parameters: `spec_hash`) is the same there is hard-linked in (copied across file systems)
instead of being synthesised and judged again, which gives the same files since synthesis is deterministic.

Finally the manifests (eval-kit jsonl per task and split), finetune conversations and `summary.json` are
rewritten from all final records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kimia.data import texts
from kimia.data.augment import apply_channel, plan_channel
from kimia.data.engines import ENGINE_NAMES, Voice, available_engines, get_engine, voice_from_dict
from kimia.data.judge import JUDGE_SAMPLE_RATE, RULES, decide
from kimia.data.manifest import link_atomic, read_json, write_json_atomic, write_outputs, write_wav_atomic
from kimia.data.sounds import plan_sound, recipe_id, render_sound
from kimia.errors import ConfigError, KimiaError

logger = logging.getLogger(__name__)

TASKS = ("asr", "spoken_qa", "dialogue", "style", "sound")  # the default set (`tasks` left empty)
# opt-in tasks: adding one to the default set would re-share the hours of every existing corpus config
EXTRA_TASKS = ("speak", "meaning")
ALL_TASKS = TASKS + EXTRA_TASKS
INPUT_SR = 16000
TARGET_SR = 24000
OUTPUT_VOICE_FALLBACKS = ("kokoro:jm_kumo", "piper:joe", "festival:cmu_us_slt_arctic_hts", "espeak:en-us+m3")
PACK_SECONDS = 28.0
PACK_GAP_S = 0.8
MAX_ITEMS_PER_TASK = 1_000_000
MAX_ROUNDS = 5


class SynthInterrupted(KimiaError):
    """The run stopped before finishing (the `stop_after` test hook, or a worker failure); rerun to resume."""


@dataclass
class SynthConfig:
    """Settings of one corpus build. `stop_after` simulates a kill after that many items are synthesised."""

    out: Path
    hours: float
    seed: int = 0
    jobs: int = field(default_factory=lambda: max(1, os.cpu_count() or 1))
    engines: tuple[str, ...] = ENGINE_NAMES
    tasks: tuple[str, ...] = TASKS
    judge: bool = True
    eval_fraction: float = 0.1
    output_voice: str = "kokoro:jm_kumo"
    progress: bool = True
    stop_after: int | None = None
    task_weights: dict[str, float] | None = None  # share of `hours` per task (default: equal shares)
    augment: bool = True  # train items get a seeded channel (band limit, noise, reverb); eval items stay clean
    text_sources: tuple[str, ...] = texts.DEFAULT_TEXT_SOURCES  # read-speech sentence pools (texts.TEXT_SOURCES)
    reuse_from: Path | None = None  # an earlier corpus: its items of the same spec are linked in, not remade

    def __post_init__(self):
        self.out = Path(self.out)
        if not self.hours > 0:
            raise ConfigError(f"--hours must be positive, got {self.hours}")
        bad = [t for t in self.tasks if t not in ALL_TASKS]
        if bad or not self.tasks:
            raise ConfigError(f"unknown task(s) {bad or '(none)'}; known: {', '.join(ALL_TASKS)}")
        bad = [e for e in self.engines if e not in ENGINE_NAMES]
        if bad or not self.engines:
            raise ConfigError(f"unknown engine(s) {bad or '(none)'}; known: {', '.join(ENGINE_NAMES)}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        self.jobs = max(1, int(self.jobs))
        self.text_sources = tuple(self.text_sources)
        texts.sentence_pool(self.text_sources)  # unknown or missing sources fail here, before any synthesis
        if "meaning" in self.tasks:
            texts.meaning_question(random.Random(0))  # likewise WordNet for the meaning task
        w = dict(self.task_weights or {})
        bad = [t for t in w if t not in self.tasks]
        if bad or any(not (float(v) > 0) for v in w.values()):
            raise ConfigError(f"task_weights must give positive weights for tasks of this run {list(self.tasks)}, "
                              f"got {w}")
        self.task_weights = {t: float(w.get(t, 1.0)) for t in self.tasks}
        if self.reuse_from is not None:
            self.reuse_from = Path(self.reuse_from)
            if not (self.reuse_from / "items").is_dir():
                raise ConfigError(f"reuse_from {self.reuse_from} has no items/ folder (not a kimia data synth corpus)")
            if self.reuse_from.resolve() == self.out.resolve():
                raise ConfigError(f"reuse_from {self.reuse_from} is the output folder itself")

    def task_seconds(self, task: str) -> float:
        """Planned seconds of audio for one task (input audio; a task without input audio, such as speak,
        counts its spoken answers: see `budget_clips`)."""
        w = self.task_weights or {}
        return self.hours * 3600.0 * w.get(task, 1.0) / (sum(w.values()) or 1.0)


# ------------------------------------------------------------------------------------------ plan
def resolve_output_voice(wanted: str, engines: list[str]) -> Voice:
    """The fixed output voice: `wanted` ("engine:name"; Kokoro also takes mixes "a*0.5+b*0.5") or the
    first available fallback."""
    for cand in (wanted, *OUTPUT_VOICE_FALLBACKS):
        eng, _, name = cand.partition(":")
        if eng not in engines:
            continue
        voices = {v.name: v for v in get_engine(eng).voices()}
        if name in voices:
            v = voices[name]
        elif eng == "kokoro" and all(p.split("*")[0] in voices for p in name.split("+")):
            v = Voice("kokoro", name, voices[name.split("+")[0].split("*")[0]].gender)
        else:
            continue
        if cand != wanted:
            logger.warning("output voice %s is not available; using %s", wanted, cand)
        return v
    raise ConfigError(f"no output voice available (wanted {wanted}; engines: {engines})")


def _est_seconds(text: str, speed: float = 1.0) -> float:
    return (0.4 + 0.065 * len(text)) / speed


def _voices_of(engine: str) -> list[Voice]:
    return get_engine(engine).voices()


def _input_voice(rng: random.Random, engines: list[str], k: int, *, speed: bool = False, pitch: bool = False,
                 gender: str | None = None) -> Voice:
    """Round-robin over engines that can do what is asked, then a random voice of that engine."""
    ok = []
    for e in engines:
        vs = [v for v in _voices_of(e) if (not pitch or v.pitch_control) and (gender is None or v.gender == gender)]
        if vs and (not speed or get_engine(e).supports_speed):
            ok.append(vs)
    if not ok:
        raise ConfigError(f"no installed engine has a voice with speed={speed} pitch={pitch} gender={gender}")
    return rng.choice(ok[k % len(ok)])


def _clip(name, kind, text, voice: Voice, rule, key="", speed=1.0, pitch=1.0, **extra) -> dict:
    return {"name": name, "kind": kind, "text": text, "voice": voice.to_dict(), "rule": rule, "key": key,
            "speed": round(speed, 3), "pitch": round(pitch, 3), **extra}


def _varied(rng: random.Random, voice: Voice) -> tuple[float, float]:
    sp = rng.uniform(0.85, 1.15) if get_engine(voice.engine).supports_speed else 1.0
    pi = rng.uniform(0.8, 1.25) if voice.pitch_control else 1.0
    return sp, pi


def make_item(task: str, k: int, seed: int, engines: list[str], out_voice: Voice, eval_fraction: float,
              augment: bool = True, text_sources: tuple[str, ...] = texts.DEFAULT_TEXT_SOURCES) -> dict:
    """Item k of a task: a JSON-able spec (texts, voices, parameters, clips), fully determined by its inputs.
    With `augment`, a speech item of the train split also carries the channel its input clips pass through.
    `text_sources`: the sentence pools read-speech text is drawn from (asr, style, speak, sound mixtures)."""
    rng = random.Random(f"{seed}:{task}:{k}")
    item: dict = {"id": f"{task}-{k:06d}", "task": task, "history": [], "labels": {}}
    if task == "asr":
        sent = texts.asr_sentence(rng, text_sources)
        v = _input_voice(rng, engines, k)
        sp, pi = _varied(rng, v)
        item.update(category="read", question=rng.choice(texts.ASR_INSTRUCTIONS), answer=sent, key="", split_text=sent,
                    clips=[_clip("u0", "input", sent, v, "asr", speed=sp, pitch=pi)])
    elif task == "spoken_qa":
        qa = texts.spoken_question(rng, ("arithmetic", "counting", "facts", "instructions")[k % 4])
        v = _input_voice(rng, engines, k)
        sp, pi = _varied(rng, v)
        item.update(category=qa.category, question="", answer=qa.answer, key=qa.key, split_text=qa.question,
                    clips=[_clip("u0", "input", qa.question, v, "spoken_qa", qa.qkey, sp, pi),
                           _clip("a0", "target", qa.answer, out_voice, "target", qa.key)])
    elif task == "dialogue":
        qa = texts.dialogue(rng)
        v = _input_voice(rng, engines, k)
        sp, pi = _varied(rng, v)
        (u0, a0), = qa.turns
        item.update(category=qa.category, question="", answer=qa.answer, key=qa.key, split_text=u0,
                    history=[[u0, a0]],
                    clips=[_clip("u0", "input", u0, v, "dialogue", qa.turn_keys[0], sp, pi),
                           _clip("a0", "target", a0, out_voice, "target"),
                           _clip("u1", "input", qa.question, v, "dialogue", qa.qkey, sp, pi),
                           _clip("a1", "target", qa.answer, out_voice, "target", qa.key)])
    elif task == "style":
        attr = ("gender", "speed", "pitch")[k % 3]
        question, answers = texts.STYLE_QUESTIONS[attr]
        value = rng.choice(sorted(answers))
        sent = texts.asr_sentence(rng, text_sources)
        sp, pi = 1.0, 1.0
        if attr == "gender":
            v = _input_voice(rng, engines, k, gender=value)
        elif attr == "speed":
            v = _input_voice(rng, engines, k, speed=True)
            sp = {"slow": 0.7, "normal": 1.0, "fast": 1.45}[value]
        else:
            v = _input_voice(rng, engines, k, pitch=True)
            pi = {"low": 0.45, "normal": 1.0, "high": 1.7}[value]
        item.update(category=attr, question=question, answer=answers[value], key=value, split_text=sent,
                    labels={attr: value, "gender": v.gender},
                    clips=[_clip("u0", "input", sent, v, "style", speed=sp, pitch=pi)])
    elif task == "speak":
        # read a text aloud in the output voice: the audio stream learns to say what the text stream writes.
        # Half the texts are answers of spoken questions (split by their question, like the spoken_qa task,
        # so no held-out question's answer is ever spoken in training), half are read-speech sentences.
        if k % 2 == 0:
            qa = texts.spoken_question(rng, ("arithmetic", "counting", "facts", "instructions")[(k // 2) % 4])
            category, sent, key, split_text = "answer", qa.answer, qa.key, qa.question
        else:
            sent = texts.asr_sentence(rng, text_sources)
            category, key, split_text = "sentence", "", sent
        item.update(category=category, question=rng.choice(texts.SPEAK_INSTRUCTIONS).format(text=sent), answer=sent,
                    key=key, split_text=split_text, clips=[_clip("a0", "target", sent, out_voice, "target", key)])
    elif task == "meaning":
        # a spoken question about a common word's meaning, answered in text (its WordNet definition): general
        # questions with a labelled answer (rows `kimia train distill` can also re-answer). Split by the word,
        # so an eval word is never asked about in training.
        qa = texts.meaning_question(rng)
        v = _input_voice(rng, engines, k)
        sp, pi = _varied(rng, v)
        item.update(category=qa.category, question="", answer=qa.answer, key=qa.qkey, split_text=qa.qkey,
                    clips=[_clip("u0", "input", qa.question, v, "spoken_qa", qa.qkey, sp, pi)])
    elif task == "sound":
        cat = ("classify", "caption")[k % 2]
        recipe = plan_sound(rng, with_speech=True)
        speech = None
        split_text = recipe_id(recipe)
        if recipe["kind"] == "mixture":
            sent = texts.asr_sentence(rng, text_sources)
            v = _input_voice(rng, engines, k)
            speech = _clip("speech", "input", sent, v, None)
            who = "man" if v.gender == "male" else "woman"
            recipe["caption"] = f"A {who} speaks over background {recipe['label'].split()[-1]}."
            split_text = sent
        q = "What kind of sound is this?" if cat == "classify" else "Describe the sound in one sentence."
        item.update(category=cat, question=q, answer=recipe["label"] if cat == "classify" else recipe["caption"],
                    key=recipe["label"], split_text=split_text, labels={"sound": recipe["label"]},
                    clips=[{"name": "u0", "kind": "sound", "recipe": recipe, "speech": speech, "rule": None,
                            "text": speech["text"] if speech else ""}])
    else:
        raise ConfigError(f"unknown task {task!r}")
    item["split"] = texts.split_of(item.pop("split_text"), eval_fraction)
    if augment and item["split"] == "train" and task != "sound":
        item["channel"] = plan_channel(rng)
    item["est_seconds"] = round(sum(_clip_est(c) for c in budget_clips(item)), 3)
    item["spec_hash"] = hashlib.sha1(json.dumps(item, sort_keys=True).encode()).hexdigest()[:16]
    return item


def budget_clips(item: dict) -> list[dict]:
    """The clips a task's hours are counted on: its input clips, or its spoken answers when it has none."""
    ins = [c for c in item["clips"] if c["kind"] != "target"]
    return ins or [c for c in item["clips"] if c["kind"] == "target"]


def _clip_est(c: dict) -> float:
    if c["kind"] == "sound":
        r = c["recipe"]
        if c["speech"]:
            return _est_seconds(c["speech"]["text"], c["speech"]["speed"])
        return r.get("duration") or 1.5
    return _est_seconds(c["text"], c["speed"])


def _planned_item(cfg: SynthConfig, task: str, k: int, engines: list[str], out_voice: Voice) -> dict:
    """Item k of a task under the build settings of `cfg` (the one place plan and top-up rounds make items)."""
    return make_item(task, k, cfg.seed, engines, out_voice, cfg.eval_fraction, cfg.augment, cfg.text_sources)


def plan(cfg: SynthConfig, engines: list[str], out_voice: Voice) -> list[dict]:
    """All items of the build, in a fixed order; each task gets hours*3600/len(tasks) estimated seconds."""
    items = []
    for task in cfg.tasks:
        total, k, per_task = 0.0, 0, cfg.task_seconds(task)
        while total < per_task and k < MAX_ITEMS_PER_TASK:
            it = _planned_item(cfg, task, k, engines, out_voice)
            items.append(it)
            total += it["est_seconds"]
            k += 1
    return items


# ------------------------------------------------------------------------------------ synthesis
def _speech(c: dict, sr: int) -> np.ndarray:
    import soxr

    v = voice_from_dict(c["voice"])
    audio, native = get_engine(v.engine).synth(c["text"], v, c["speed"], c["pitch"])
    return soxr.resample(audio, native, sr).astype(np.float32) if native != sr else audio


def _audio_rel(item: dict, c: dict) -> str:
    top = "target" if c["kind"] == "target" else "audio"
    return f"{top}/{item['task']}/{item['id']}_{c['name']}.wav"


def synth_item(item: dict, out: str) -> dict:
    """Render every clip of an item (atomic wav writes), then write and return `items/<id>.synth.json`."""
    root = Path(out)
    clips = []
    for c in item["clips"]:
        sr = TARGET_SR if c["kind"] == "target" else INPUT_SR
        if c["kind"] == "sound":
            speech = _speech(c["speech"], INPUT_SR) if c["speech"] else None
            audio = render_sound(c["recipe"], speech)
        else:
            audio = _speech(c, sr)
            if c["kind"] == "input":
                audio = apply_channel(audio, sr, item.get("channel"))
        rel = _audio_rel(item, c)
        write_wav_atomic(root / rel, audio, sr)
        clips.append({**c, "path": rel, "sample_rate": sr, "duration": round(audio.size / sr, 4)})
    rec = {**item, "clips": clips}
    write_json_atomic(root / "items" / f"{item['id']}.synth.json", rec)
    return rec


def _worker_init():
    os.environ.setdefault("KIMIA_SYNTH_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _synth_job(args):
    item, out = args
    try:
        return synth_item(item, out), None
    except KimiaError as e:  # engine failure on one text: counted, not fatal
        return item, str(e)


# ---------------------------------------------------------------------------------------- judging
_JUDGE = None


def _get_judge():
    global _JUDGE
    if _JUDGE is None:
        from kimia.data.judge import Judge

        _JUDGE = Judge("base", cpu_threads=int(os.environ.get("KIMIA_JUDGE_THREADS", "1")))
    return _JUDGE


def _load16(path: Path) -> np.ndarray:
    import soundfile as sf
    import soxr

    a, sr = sf.read(str(path), dtype="float32")
    return soxr.resample(a, sr, JUDGE_SAMPLE_RATE).astype(np.float32) if sr != JUDGE_SAMPLE_RATE else a


def split_transcript(refs: list[str], hyp: str) -> list[str]:
    """Assign the words of one transcript of several concatenated clips back to the clips.

    Levenshtein-aligns the hypothesis words with the concatenated (normalised) reference words; each hypothesis
    word goes to the clip of the reference word it is aligned with, insertions to the clip of the previous
    aligned reference word.
    """
    ref_words, owner = [], []
    for ci, r in enumerate(refs):
        w = texts.normalize_text(r).split()
        ref_words += w
        owner += [ci] * len(w)
    hyp_words = texts.normalize_text(hyp).split()
    n, m = len(ref_words), len(hyp_words)
    d = np.zeros((n + 1, m + 1), np.int32)
    d[:, 0] = np.arange(n + 1)
    d[0, :] = np.arange(m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            d[i, j] = min(d[i - 1, j] + 1, d[i, j - 1] + 1, d[i - 1, j - 1] + (ref_words[i - 1] != hyp_words[j - 1]))
    out: list[list[str]] = [[] for _ in refs]
    i, j = n, m
    assign = [0] * m
    while j > 0:
        if i > 0 and d[i, j] == d[i - 1, j - 1] + (ref_words[i - 1] != hyp_words[j - 1]):
            assign[j - 1] = owner[i - 1]
            i, j = i - 1, j - 1
        elif i > 0 and d[i, j] == d[i - 1, j] + 1:
            i -= 1
        else:  # insertion: belongs with the reference word before it (or the first clip)
            assign[j - 1] = owner[i - 1] if i > 0 else 0
            j -= 1
    for w, ci in zip(hyp_words, assign):
        out[ci].append(w)
    return [" ".join(ws) for ws in out]


def _judge_pack(args):
    """Transcribe a pack of clips as one window; returns [(item_id, clip_name, verdict dict)]."""
    entries, out = args
    judge = _get_judge()
    gap = np.zeros(int(PACK_GAP_S * JUDGE_SAMPLE_RATE), np.float32)
    audio = np.concatenate([x for e in entries for x in (_load16(Path(out) / e["path"]), gap)])
    hyp = judge.transcribe(audio)
    parts = split_transcript([e["text"] for e in entries], hyp)
    res = []
    for e, h in zip(entries, parts):
        v = decide(e["text"], h, RULES[e["rule"]], e["key"])
        if not v.ok and len(entries) > 1 and v.wer >= 0.8:
            # Whisper sometimes skips a clip inside a long window: a clip that looks unheard gets its own window
            v = decide(e["text"], judge.transcribe(_load16(Path(out) / e["path"])), RULES[e["rule"]], e["key"])
        res.append((e["item"], e["name"], {"ok": v.ok, "wer": round(v.wer, 4), "transcript": v.transcript,
                                           "reason": v.reason}))
    return res


def _packs(recs: list[dict]) -> list[list[dict]]:
    """Whole items packed greedily (plan order) into windows of at most PACK_SECONDS."""
    packs, cur, cur_s = [], [], 0.0
    for r in recs:
        entries = [{"item": r["id"], "name": c["name"], "path": c["path"], "text": c["text"], "rule": c["rule"],
                    "key": c["key"]} for c in r["clips"] if c["rule"] is not None]
        secs = sum(c["duration"] + PACK_GAP_S for c in r["clips"] if c["rule"] is not None)
        if not entries:
            continue
        if cur and cur_s + secs > PACK_SECONDS:
            packs.append(cur)
            cur, cur_s = [], 0.0
        cur += entries
        cur_s += secs
    if cur:
        packs.append(cur)
    return packs


def _finalise(root: Path, rec: dict, verdicts: dict | None, error: str = "") -> dict:
    ok = not error and (verdicts is None or all(v["ok"] for v in verdicts.values()))
    final = {**rec, "status": "accepted" if ok else "rejected", "verdicts": verdicts, "error": error}
    if not ok:
        for c in rec["clips"]:
            if "path" in c:
                (root / c["path"]).unlink(missing_ok=True)
    write_json_atomic(root / "items" / f"{rec['id']}.json", final)
    return final


# ------------------------------------------------------------------------------------------- run
def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=not enabled, dynamic_ncols=True)


def _load_existing(root: Path, item: dict, suffix: str) -> dict | None:
    path = root / "items" / f"{item['id']}{suffix}"
    if not path.is_file():
        return None
    rec = read_json(path)
    if rec.get("spec_hash") != item["spec_hash"]:
        raise ConfigError(f"{path} was made with different settings (seed, engines, tasks or output voice) than "
                          "this run; use the same settings to resume, or a new --out folder")
    return rec


def _adopt(src: Path, root: Path, item: dict, judge: bool) -> bool:
    """Link an earlier corpus's files of `item` into `root` when they were made from the same spec: the final
    record when it was judged (or not) as this run judges, else the synthesised one. The record is linked last,
    after its audio, so a kill in between leaves an unfinished item that the run redoes."""
    for suffix in (".json", ".synth.json"):
        f = src / "items" / f"{item['id']}{suffix}"
        if not f.is_file():
            continue
        rec = read_json(f)
        if rec.get("spec_hash") != item["spec_hash"]:
            return False
        if suffix == ".json" and not rec.get("error") and (rec.get("verdicts") is not None) != judge:
            continue  # judged under the other setting: take its audio, judge (or not) here
        audio = [src / c["path"] for c in rec["clips"] if c.get("path")]
        if (suffix == ".synth.json" or rec.get("status") == "accepted") and not all(p.is_file() for p in audio):
            return False  # audio missing: make the item here
        for p in audio:
            if p.is_file():  # a rejected item's audio is deleted
                link_atomic(p, root / p.relative_to(src))
        if suffix == ".json" and (src / "items" / f"{item['id']}.synth.json").is_file():
            link_atomic(src / "items" / f"{item['id']}.synth.json", root / "items" / f"{item['id']}.synth.json")
        link_atomic(f, root / "items" / f.name)
        return True
    return False


def _run_items(pool, cfg: SynthConfig, root: Path, items: list[dict], finals: dict, stats: dict) -> None:
    """Synthesise and judge the items of one round that are not finished yet (resuming from their files, or
    linking them from `cfg.reuse_from`)."""
    synthed, todo = [], []
    for it in items:
        if cfg.reuse_from is not None and not any((root / "items" / f"{it['id']}{s}").is_file()
                                                  for s in (".json", ".synth.json")):
            stats["linked"] += _adopt(cfg.reuse_from, root, it, cfg.judge)
        f = _load_existing(root, it, ".json")
        if f is not None:
            finals[it["id"]] = f
            stats["reused_final"] += 1
            continue
        s = _load_existing(root, it, ".synth.json")
        (synthed if s is not None else todo).append(s if s is not None else it)
    stats["reused_synth"] += len(synthed)
    if not todo and not synthed:
        return
    bar = _bar(len(todo), "synthesise", cfg.progress)
    for rec, err in pool.imap_unordered(_synth_job, [(it, str(root)) for it in todo]):
        bar.update(1)
        stats["synthesized_this_run"] += 1
        if err:
            stats["engine_failures"] += 1
            finals[rec["id"]] = _finalise(root, rec, None, err)
        else:
            synthed.append(rec)
        if cfg.stop_after is not None and stats["synthesized_this_run"] >= cfg.stop_after:
            pool.terminate()
            raise SynthInterrupted(f"stopped after {stats['synthesized_this_run']} items (stop_after)")
    bar.close()

    order = {it["id"]: i for i, it in enumerate(items)}
    synthed.sort(key=lambda r: order[r["id"]])
    by_id = {r["id"]: r for r in synthed}
    if not cfg.judge:
        for r in synthed:
            finals[r["id"]] = _finalise(root, r, None)
        return
    verdicts: dict[str, dict] = defaultdict(dict)
    need = {r["id"]: sum(c["rule"] is not None for c in r["clips"]) for r in synthed}
    bar = _bar(len(synthed), "judge", cfg.progress)
    for r in synthed:
        if need[r["id"]] == 0:
            finals[r["id"]] = _finalise(root, r, {})
            bar.update(1)
    for res in pool.imap_unordered(_judge_pack, [(p, str(root)) for p in _packs(synthed)]):
        for item_id, name, v in res:
            verdicts[item_id][name] = v
            if len(verdicts[item_id]) == need[item_id]:
                finals[item_id] = _finalise(root, by_id[item_id], verdicts[item_id])
                stats["judged_this_run"] += 1
                bar.update(1)
    bar.close()


def _accepted_seconds(finals: dict, task: str) -> float:
    return sum(c["duration"] for f in finals.values() if f["task"] == task and f["status"] == "accepted"
               for c in budget_clips(f))


def build_corpus(cfg: SynthConfig) -> dict:
    """Plan, synthesise, judge and write the corpus; returns the summary (also written to summary.json).

    Round 0 is `plan()`. Rejected items and estimate errors leave a task short of its share of the hours,
    so later rounds top each task up with its next items (k continues) until every task has its share of
    *accepted* audio or MAX_ROUNDS is reached; this keeps the kept corpus balanced across tasks.
    """
    t0 = time.time()
    root = cfg.out
    root.mkdir(parents=True, exist_ok=True)
    engines, missing = available_engines(cfg.engines)
    for e in missing:
        logger.warning("speech engine %s is not installed: skipped", e)
    if not engines:
        raise ConfigError(f"none of the speech engines {list(cfg.engines)} is installed "
                          "(run scripts/setup-data-system.sh)")
    out_voice = resolve_output_voice(cfg.output_voice, engines)
    items = plan(cfg, engines, out_voice)
    next_k = {t: sum(it["task"] == t for it in items) for t in cfg.tasks}
    finals: dict[str, dict] = {}
    stats = {"planned": 0, "rounds": 0, "reused_final": 0, "reused_synth": 0, "synthesized_this_run": 0,
             "judged_this_run": 0, "engine_failures": 0, "linked": 0}
    all_items: list[dict] = []
    ctx = mp.get_context("spawn")
    with ctx.Pool(cfg.jobs, initializer=_worker_init) as pool:
        for rnd in range(MAX_ROUNDS):
            if not items:
                break
            stats["rounds"] += 1
            stats["planned"] += len(items)
            all_items += items
            logger.info("round %d: %d items on engines %s; output voice %s", rnd, len(items), engines, out_voice.key)
            _run_items(pool, cfg, root, items, finals, stats)
            items = []
            for t in cfg.tasks:  # top-up: the next items of each task still short of its share
                have, budget = _accepted_seconds(finals, t), cfg.task_seconds(t)
                while have < budget and next_k[t] < MAX_ITEMS_PER_TASK:
                    it = _planned_item(cfg, t, next_k[t], engines, out_voice)
                    items.append(it)
                    have += it["est_seconds"]
                    next_k[t] += 1
    recs = [finals[it["id"]] for it in all_items if it["id"] in finals]
    return write_outputs(root, recs, cfg, engines, missing, out_voice, stats, time.time() - t0)


__all__ = ["ALL_TASKS", "EXTRA_TASKS", "TASKS", "SynthConfig", "SynthInterrupted", "budget_clips", "build_corpus",
           "make_item", "plan", "resolve_output_voice", "split_transcript", "synth_item"]
