"""Recipes (prompt template + sampling parameters + output type + metric) and the task registry.

The official kit hard-codes each model's prompt construction and sampling inside its model class; here a
recipe is a small YAML file instead, so the exact settings behind a figure are stored beside it (the
runner writes the resolved recipe into every metrics JSON and the Markdown report).

Fields: `name`, `task`, `description`, `prompt` (a `str.format` template over the item's fields:
`{question}`, `{answer_options}`, `{audio_content}` (what the audio says), any `meta` key; empty = no text
message), `default_question` (used when an item's question is empty), `prompt_position` (`before` / `after`
the audio, `none` (audio alone), or `instead` (the text alone, the audio not sent: a read-not-heard control,
e.g. `{audio_content}` of spoken questions, which separates knowing an answer from hearing the question)),
`output_type` (`text` / `both`), `metric` (`wer`, `choice`, `label`, `ref_qa`, `key_qa` (the record's
`key` in the answer), `token_f1`, `judge_score`, `speech_wer` (spoken answers, see kimia.eval.speech)), `lang` (optional, for WER), `sampling` (keyword arguments of `KimiAudio.generate`).
Built-in recipes live in `kimia/eval/recipes/*.yaml`; `--recipe` also takes a path to a YAML file.
"""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from kimia.errors import ConfigError

__all__ = ["Recipe", "load_recipe", "builtin_recipes", "recipe_for_task", "TASKS", "METRICS", "PROMPT_POSITIONS", "SAMPLING_KEYS"]

METRICS = ("wer", "choice", "label", "ref_qa", "key_qa", "token_f1", "judge_score", "speech_wer")
PROMPT_POSITIONS = ("before", "after", "none", "instead")
SAMPLING_KEYS = ("audio_temperature", "audio_top_k", "text_temperature", "text_top_k",
                 "audio_repetition_penalty", "audio_repetition_window_size", "text_repetition_penalty",
                 "text_repetition_window_size", "max_new_tokens")

# task -> built-in recipe name (the task registry; a dataset's task comes from datasets.DATASETS)
TASKS: dict[str, str] = {
    "asr": "asr", "mqa": "mqa", "audio_qa": "audio_qa", "captioning": "captioning", "emotion": "emotion",
    "speaker_style": "emotion", "sound_event": "sound_event", "sound_scene": "sound_scene",
    "conversation": "conversation", "spoken_qa": "spoken_qa", "spoken_answer": "spoken_answer",
}


@dataclass(frozen=True)
class Recipe:
    """How to ask the model and how to score the answer; see the module docstring for the fields."""

    name: str
    task: str
    metric: str
    prompt: str = "{question}"
    default_question: str = ""
    prompt_position: str = "before"
    output_type: str = "text"
    lang: str | None = None
    description: str = ""
    sampling: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ConfigError(f"recipe '{self.name}': unknown metric '{self.metric}' (one of {', '.join(METRICS)})")
        if self.output_type not in ("text", "both"):
            raise ConfigError(f"recipe '{self.name}': output_type must be 'text' or 'both', got '{self.output_type}'")
        if self.prompt_position not in PROMPT_POSITIONS:
            raise ConfigError(f"recipe '{self.name}': prompt_position must be one of {'/'.join(PROMPT_POSITIONS)}")
        if self.prompt_position == "instead" and not self.prompt.strip():
            raise ConfigError(f"recipe '{self.name}': prompt_position 'instead' sends the prompt alone, so it needs one")
        unknown = set(self.sampling) - set(SAMPLING_KEYS)
        if unknown:
            raise ConfigError(f"recipe '{self.name}': unknown sampling keys {sorted(unknown)}")
        try:
            list(string.Formatter().parse(self.prompt))
        except ValueError as exc:
            raise ConfigError(f"recipe '{self.name}': bad prompt template: {exc}") from exc

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "Recipe":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: a recipe must be a mapping")
        known = {f.name for f in dataclasses.fields(cls)}
        extra = set(d) - known
        if extra:
            raise ConfigError(f"{source}: unknown recipe keys {sorted(extra)}")
        missing = {"name", "task", "metric"} - set(d)
        if missing:
            raise ConfigError(f"{source}: recipe lacks {sorted(missing)}")
        d = dict(d)
        d["prompt"] = d.get("prompt") or ""
        d["sampling"] = dict(d.get("sampling") or {})
        return cls(**d)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def with_overrides(self, **sampling) -> "Recipe":
        """A copy with some sampling values replaced (None values ignored)."""
        merged = {**self.sampling, **{k: v for k, v in sampling.items() if v is not None}}
        return dataclasses.replace(self, sampling=merged)

    def render(self, question: str, meta: dict | None = None) -> str:
        """The text instruction for one item ('' when the recipe sends the audio alone)."""
        if self.prompt_position == "none" or not self.prompt:
            return ""
        q = question if question and question.strip() else self.default_question
        values = {**(meta or {}), "question": q}
        values.setdefault("answer_options", "")
        try:
            return self.prompt.format(**values).strip()
        except (KeyError, IndexError) as exc:
            raise ConfigError(f"recipe '{self.name}': prompt field {exc} is not in the item") from exc

    def messages(self, question: str, audio_paths: list[str], meta: dict | None = None) -> list[dict]:
        """Kimi-Audio chat messages: [user text] + one user audio message per file (text first by default);
        the text alone for `instead`."""
        text = self.render(question, meta)
        if self.prompt_position == "instead":
            if not text:
                raise ConfigError(f"recipe '{self.name}' sends its prompt instead of the audio, but it is empty for "
                                  f"this item (a field it names, e.g. audio_content, is empty)")
            return [{"role": "user", "message_type": "text", "content": text}]
        audio = [{"role": "user", "message_type": "audio", "content": str(p)} for p in audio_paths]
        if not text:
            return audio
        msg = {"role": "user", "message_type": "text", "content": text}
        return [msg, *audio] if self.prompt_position == "before" else [*audio, msg]


def _recipe_dir():
    return resources.files("kimia.eval") / "recipes"


def builtin_recipes() -> list[str]:
    return sorted(p.name[:-5] for p in _recipe_dir().iterdir() if p.name.endswith(".yaml"))


def load_recipe(spec: str | Path) -> Recipe:
    """A built-in recipe by name, or a YAML file by path."""
    p = Path(spec)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ConfigError(f"recipe file {p} does not exist")
        text, source = p.read_text(encoding="utf-8"), str(p)
    else:
        res = _recipe_dir() / f"{spec}.yaml"
        if not res.is_file():
            raise ConfigError(f"unknown recipe '{spec}' (built in: {', '.join(builtin_recipes())})")
        text, source = res.read_text(encoding="utf-8"), f"recipe {spec}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    return Recipe.from_dict(data, source)


def recipe_for_task(task: str) -> Recipe:
    if task not in TASKS:
        raise ConfigError(f"unknown task '{task}' (known: {', '.join(sorted(TASKS))})")
    return load_recipe(TASKS[task])
