"""Spoken answers: generate text + speech, hear the speech with an independent recognizer, score both.

A model that talks back is judged on what it *says*, not only on what it writes: `speak_batch` streams each
answer (`KimiAudio.generate_stream`, output_type "both"), records when the first audio arrived and how long the
whole reply took, writes the 24 kHz answer to `<run_dir>/audio/<index>.wav`, and transcribes it with Whisper
base (faster-whisper, the packaged CTranslate2 weights: the same judge the corpus builder uses, independent of
the model's own encoders) in a process of its own (`hear`), so that the model's timings are a user's. The
prediction stored by the runner is a JSON object
`{"text", "transcript", "audio_path", "audio_s", "first_audio_s", "gen_s"}`.

`score_spoken` (metric `speech_wer`) gives per subset: the corpus WER of the transcript against the model's
own text answer, how often the answer key (the record's `key`) is in the text and in the transcript (as said
words, `kimia.data.judge.said_contains`), the median time to first audio and the real-time factor (generation
seconds / answer seconds, summed), and per answer the median WER (`wer_median`) and the share of answers with
WER <= 50 % (`half_heard`).

The WER of speech is counted on words as they are *said* (`kimia.data.judge.said_errors`: both sides through
the corpus judge's normaliser, digits read as number words, symbols read aloud), because the recognizer chooses freely
between "five" and "5". The evaluation kit's Whisper normaliser, right for ASR figures comparable with published
ones, is not: it joins a run of number words into one number ("five, four, three" -> "543") but keeps written
digits apart ("5, 4, 3" -> "5 4 3"), so a perfectly spoken counting answer would score 100 %. That figure is
still reported, as `wer_kit`.
"""

from __future__ import annotations

import json
import statistics
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["hear", "speak_batch", "score_spoken", "parse_spoken"]

_JUDGE = None
_HEARER = None  # the process the judge runs in


def _judge():
    global _JUDGE
    if _JUDGE is None:
        from kimia.data.judge import Judge

        _JUDGE = Judge("base", cpu_threads=2)
    return _JUDGE


def _transcribe(pcm16k: Any) -> str:
    return _judge().transcribe(pcm16k)


def hear(pcm16k: Any) -> str:
    """The judge's transcript of float32 16 kHz audio, made in a separate process: once the recognizer
    (CTranslate2, with its own OpenMP runtime) has run in the model's process, every later answer there is
    slower (first audio 0.70 -> 0.97 s median on 2 cores), so the timings would not be a user's."""
    global _HEARER
    if _HEARER is None:
        import atexit
        import multiprocessing as mp

        _HEARER = mp.get_context("spawn").Pool(1)
        atexit.register(_stop_hearer)
    return _HEARER.apply(_transcribe, (pcm16k,))


def _stop_hearer() -> None:
    global _HEARER
    if _HEARER is not None:
        _HEARER.close()
        _HEARER.join()
        _HEARER = None


def item_seed(index: Any) -> int:
    """The sampling / noise seed of an eval item, from its index: the same draw in every run, and two models
    compared on the same items draw with the same seeds."""
    return zlib.crc32(str(index).encode())


def speak_batch(model: Any, items: Sequence[Any], recipe: Any, audio_dir: Path) -> list[str]:
    """One JSON prediction string per item (see the module docstring); items are answered one by one so
    that latency and real-time factor are those of a single user."""
    import soxr

    from kimia.api import AudioPiece, StreamEnd
    from kimia.audio import save_audio

    audio_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for it in items:
        messages = recipe.messages(it.question, [str(p) for p in it.audio_paths], it.prompt_fields)
        t0 = time.perf_counter()
        first, wav, text = None, None, ""
        seed = item_seed(it.index)
        for ev in model.generate_stream(messages, **{"seed": seed, **recipe.sampling, "output_type": "both"}):
            if isinstance(ev, AudioPiece) and first is None and ev.pcm.numel():
                first = time.perf_counter() - t0
            elif isinstance(ev, StreamEnd):
                wav, text = ev.wav, ev.text
        gen_s = time.perf_counter() - t0
        rec: dict[str, Any] = {"text": text, "transcript": "", "audio_path": None, "audio_s": 0.0,
                               "first_audio_s": first, "gen_s": round(gen_s, 4)}
        if wav is not None and wav.numel():
            path = audio_dir / f"{it.index}.wav"
            save_audio(path, wav[0], 24000)
            pcm = wav[0].float().numpy()
            rec.update(audio_path=str(path), audio_s=round(pcm.size / 24000, 4),
                       transcript=hear(soxr.resample(pcm, 24000, 16000)))
        out.append(json.dumps(rec, ensure_ascii=False))
    return out


def parse_spoken(prediction: str) -> dict[str, Any]:
    """The JSON object of a spoken-answer prediction (an unreadable one counts as silence)."""
    try:
        rec = json.loads(prediction)
        if isinstance(rec, dict):
            return rec
    except (TypeError, ValueError):
        pass
    return {"text": str(prediction or ""), "transcript": "", "audio_s": 0.0, "first_audio_s": None, "gen_s": 0.0}


@dataclass(frozen=True)
class _Scored:
    """One spoken answer, scored."""

    prediction: dict[str, Any]
    key: str
    errors: int  # said-words edit distance, transcript vs text
    words: int  # said words of the text
    kit: tuple[int, int]  # (errors, words) under the evaluation kit's normaliser


def score_spoken(records_by_subset: dict[str, list[dict]]) -> tuple[dict, list[dict]]:
    """(performance per subset + overall, per-item details) for spoken-answer predictions. The answer key
    (the record's `key`, else its `answer`) is looked for in the text and in the transcript as said words
    (`said_contains`), like the WER."""
    from kimia.data.judge import said_contains, said_errors
    from kimia.eval import metrics as M

    perf: dict[str, dict] = {}
    details: list[dict] = []
    pooled: list[_Scored] = []
    for sub, recs in sorted(records_by_subset.items()):
        rows = []
        for r in recs:
            p = parse_spoken(r["prediction"])
            text, heard = p.get("text", ""), p.get("transcript", "")
            err, n, ref, hyp = said_errors(text, heard)
            key = str(r.get("key") or r.get("answer") or "")
            rows.append(_Scored(p, key, err, n, M.utterance_wer(text, heard, "en")[:2]))
            details.append({"index": r["index"], "subset": sub, "errors": err, "ref_len": n, "ref": " ".join(ref),
                            "hyp": " ".join(hyp), "key": key, "key_in_text": said_contains(key, text),
                            "key_in_speech": said_contains(key, heard),
                            "first_audio_s": p.get("first_audio_s"), "audio_s": p.get("audio_s")})
        perf[sub] = _summary(rows)
        pooled += rows
    perf["overall"] = _summary(pooled)
    return perf, details


def _summary(rows: list[_Scored]) -> dict[str, Any]:
    from kimia.data.judge import said_contains

    err = sum(r.errors for r in rows)
    words = sum(r.words for r in rows)
    kit_err, kit_words = sum(r.kit[0] for r in rows), sum(r.kit[1] for r in rows)
    preds = [r.prediction for r in rows]
    first = [p["first_audio_s"] for p in preds if p.get("first_audio_s") is not None]
    audio = sum(float(p.get("audio_s") or 0.0) for p in preds)
    gen = sum(float(p.get("gen_s") or 0.0) for p in preds)
    n = max(len(rows), 1)
    # per answer: the judge bounds a recognizer loop ("8, 8, 8, ...") by the answer's length (token_budget), yet
    # one garbled answer still moves a pooled WER of 30 answers by several points; the median answer and the
    # share of answers heard at least half right are steadier
    per = [r.errors / r.words for r in rows if r.words]
    return {
        "wer": round(100.0 * err / words, 2) if words else None, "errors": err, "ref_words": words,
        "wer_kit": round(100.0 * kit_err / kit_words, 2) if kit_words else None,
        "wer_median": round(100.0 * statistics.median(per), 2) if per else None,
        "half_heard": round(100.0 * sum(x <= 0.5 for x in per) / len(per), 2) if per else None,
        "utterances": len(rows), "silent": sum(1 for p in preds if not p.get("audio_s")),
        "key_in_text": round(100.0 * sum(said_contains(r.key, r.prediction.get("text", "")) for r in rows) / n, 2),
        "key_in_speech": round(100.0 * sum(said_contains(r.key, r.prediction.get("transcript", "")) for r in rows) / n, 2),
        "first_audio_s_median": round(statistics.median(first), 3) if first else None,
        "rtf": round(gen / audio, 3) if audio else None,
    }
