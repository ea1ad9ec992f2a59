"""Where a spoken answer loses its words: the speech chain of a model folder measured link by link.

A model that talks back is heard through four links: the LLM's audio head writes semantic codes, the DiT turns
codes into a mel, the vocoder turns the mel into a waveform. `kimia eval --chain MANIFEST` takes reference
answers (rows with `target_audio_path` and `target_text`, as a `kimia data synth` corpus writes for its
spoken_qa / dialogue / speak tasks) and measures what each link keeps:

- `original`:  the recording itself, heard by the judge (the ceiling: the judge's own errors on that voice);
- `vocoder`:   the recording's 24 kHz mel through the folder's vocoder (copy synthesis);
- `dit`:       the recording's semantic codes (the folder's tokenizer) through the DiT and the vocoder, the DiT's
               noise seeded from the row's index (the same draw in every run and for every model compared);
- `lm`:        teacher-forced, the LLM's audio head on the answer's codes given the conversation so far (the
               question, audio or text, and the answer's own text): accuracy of its most likely code and the
               mean cross-entropy, the quantities its training minimised. Rows with an earlier history
               (dialogue's second turn) are heard but not teacher-forced.
- `lm_free`:   free-running, the model answers the same question itself (greedy text and audio); where its text
               is the reference text (as said words), its codes are compared with the recording's: the code
               edit rate (Levenshtein distance / reference codes). The output voice is one deterministic TTS
               voice, so the same words have one right code sequence; this is what the DiT is given.

The judge is Whisper base (`kimia.eval.speech`, the same one that scores the model's own spoken answers); each
heard link gets the WER against the reference text, counted as `kimia.data.judge.said_errors` counts the
model's own speech (words as said: digits read as number words), and the share of answers whose key words the
judge heard. A link whose WER jumps above the one before it is where the words go.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kimia.errors import ConfigError

__all__ = ["HEARD_LINKS", "chain_rows", "compare_chains", "format_chain", "free_running", "measure_chain",
           "teacher_forced", "write_chain"]

HEARD_LINKS = ("original", "vocoder", "dit")


def chain_rows(manifests: Sequence[str | Path], limit: int = 0) -> list[dict[str, Any]]:
    """Rows of corpus manifests that carry a reference answer (target audio + its text), in file order."""
    from kimia.data.manifest import read_manifest

    rows: list[dict[str, Any]] = []
    for path in manifests:
        if not Path(path).is_file():
            raise ConfigError(f"chain manifest {path} does not exist")
        recs = read_manifest(path)  # a malformed line is a ConfigError naming it
        for r in recs:
            if not isinstance(r, dict):
                raise ConfigError(f"chain manifest {path}: a row is not a json object")
            tgt, text = r.get("target_audio_path"), r.get("target_text")
            if not tgt or not text:
                continue
            audio = r.get("audio_path") or []
            rows.append({"index": str(r.get("index")), "target": str(tgt), "text": str(text),
                         "key": str(r.get("key") or ""), "question": str(r.get("question") or ""),
                         "audio": [str(a) for a in ([audio] if isinstance(audio, str) else audio)],
                         "history": r.get("history") or []})
    if not rows:
        raise ConfigError(f"no row with target_audio_path and target_text in {[str(p) for p in manifests]}: the chain "
                          "needs reference answers (the spoken_qa / dialogue / speak manifests of a kimia corpus)")
    return rows[:limit] if limit > 0 else rows


def _question(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The user turn of a row (text question, audio, or both) as messages."""
    msgs: list[dict[str, Any]] = []
    if row["audio"]:
        if row["question"]:
            msgs.append({"role": "user", "message_type": "text", "content": row["question"]})
        msgs += [{"role": "user", "message_type": "audio", "content": a} for a in row["audio"]]
    else:
        msgs.append({"role": "user", "message_type": "text", "content": row["question"]})
    return msgs


def teacher_forced(model: Any, row: dict[str, Any]) -> tuple[float, int, int] | None:
    """(summed cross-entropy, correct codes, codes) of the LLM's audio head on the answer of one row, or None
    for a row with history. The prompt is built as training builds it (the answer as `audio-text`, speech
    targets on), so these are the training loss' terms."""
    from kimia.train.data import collate_lm

    if row["history"]:
        return None
    msgs = _question(row)
    msgs.append({"role": "assistant", "message_type": "audio-text", "content": [row["target"], row["text"]]})
    pb = model.prompt_builder.build(msgs, output_type="both", add_assistant_start=False, speech_targets=True)
    c = model.parts.lm.config
    b = collate_lm([pb], pad_id=c.pad_token_id, media_begin=c.kimia_media_begin, media_end=c.kimia_media_end,
                   adaptor_dim=c.kimia_adaptor_input_dim)
    mask = b.audio_loss_mask[0] & (b.audio_labels[0] >= c.kimia_token_offset)  # codes, not the blank filler
    if not bool(mask.any()):
        return None
    dev = model.device
    cont = b.continuous.to(dev, model.dtype) if b.continuous is not None else None
    cmask = b.continuous_mask.to(dev) if b.continuous_mask is not None else None
    with torch.no_grad():
        out = model.parts.lm(b.audio_ids.to(dev), b.text_ids.to(dev), b.positions.to(dev), continuous=cont,
                             continuous_mask=cmask)
    logits = out.audio_logits[0][mask.to(dev)].float()
    labels = b.audio_labels[0][mask].to(dev)
    ce = float(F.cross_entropy(logits, labels, reduction="sum"))
    return ce, int((logits.argmax(-1) == labels).sum()), int(mask.sum())


def free_running(model: Any, row: dict[str, Any], ref_ids: Sequence[int], max_new_tokens: int | None = None
                 ) -> tuple[int, int] | None:
    """(code edit distance, reference codes) of the model's own greedy answer to a row's question against the
    recording's codes `ref_ids`, or None when its text is not the reference text (as said words) or the row
    has history. `max_new_tokens` default: twice the reference codes + 32 (text and delayed audio share the
    steps)."""
    from kimia.api import StreamEnd
    from kimia.data.judge import said_errors
    from kimia.eval.metrics import edit_distance

    if row["history"]:
        return None
    end = None
    budget = max_new_tokens if max_new_tokens is not None else 2 * len(ref_ids) + 32
    for ev in model.generate_stream(_question(row), output_type="both", max_new_tokens=budget, seed=0,
                                    audio_temperature=0.0, text_temperature=0.0):
        if isinstance(ev, StreamEnd):
            end = ev
    if end is None or said_errors(row["text"], end.text)[0] != 0:
        return None
    ref = [int(x) for x in ref_ids]
    return edit_distance([str(x) for x in ref], [str(int(x)) for x in end.audio_ids]), len(ref)


def measure_chain(model: Any, rows: Sequence[dict[str, Any]], judge: Any = None,
                  transcripts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every link of the module docstring over `rows` for one loaded `KimiAudio` (with its detokenizer).
    `judge` transcribes 16 kHz float audio (default: the Whisper base judge). Per-row transcripts are
    appended to `transcripts` when given."""
    import soxr

    from kimia.audio import load_audio
    from kimia.detokenizer.mel import SAMPLE_RATE as MEL_RATE, mel_frames
    from kimia.data.judge import said_errors
    from kimia.data.texts import normalize_text

    if model.detokenizer is None:
        raise ConfigError("the speech chain needs the model's detokenizer (load_detokenizer=True)")
    from kimia.eval.speech import _judge, item_seed

    if judge is None:
        judge = _judge()
    d = model.detokenizer
    vdtype = next(d.vocoder.parameters()).dtype

    def hear(wav: torch.Tensor) -> str:
        pcm = wav.reshape(-1).float().cpu().numpy()
        return judge.transcribe(soxr.resample(pcm, MEL_RATE, 16000)) if pcm.size else ""

    errors: dict[str, list[tuple[int, int]]] = {k: [] for k in HEARD_LINKS}
    keys: dict[str, list[bool]] = {k: [] for k in HEARD_LINKS}
    ce = correct = codes = forced = 0
    free_err = free_codes = free_rows = asked = 0
    for row in rows:
        w24 = load_audio(row["target"], target_sr=MEL_RATE, name=f"target of {row['index']}")
        w16 = load_audio(w24, MEL_RATE, target_sr=16000, name=f"target of {row['index']}")  # one file read
        with torch.no_grad():
            voc = d.vocoder(mel_frames(w24).T[None].to(model.device, vdtype))
            ids = model.parts.semantic_tokenizer.tokenize(w16).reshape(-1).long()
        dit = model.detokenize_audio(ids, seed=item_seed(row["index"]))  # every model, every run: the same noise
        heard = {"original": hear(w24), "vocoder": hear(voc), "dit": hear(dit)}
        key = f" {normalize_text(row['key'])} " if row["key"] else ""
        for k, h in heard.items():
            errors[k].append(said_errors(row["text"], h)[:2])
            if key:
                keys[k].append(key in f" {normalize_text(h)} ")
        tf = teacher_forced(model, row)
        if tf is not None:
            ce, correct, codes, forced = ce + tf[0], correct + tf[1], codes + tf[2], forced + 1
        fr = free_running(model, row, ids.tolist())
        asked += not row["history"]
        if fr is not None:
            free_err, free_codes, free_rows = free_err + fr[0], free_codes + fr[1], free_rows + 1
        if transcripts is not None:
            transcripts.append({"index": row["index"], "text": row["text"], **heard,
                                "lm_accuracy": None if tf is None else round(tf[1] / tf[2], 4),
                                "lm_free_edit_rate": None if fr is None else round(fr[0] / max(fr[1], 1), 4)})
    out: dict[str, Any] = {"rows": len(rows)}
    for k in HEARD_LINKS:
        e, n = sum(x[0] for x in errors[k]), sum(x[1] for x in errors[k])
        out[k] = {"wer": round(100.0 * e / max(n, 1), 2), "errors": e, "words": n,
                  "keys_heard": round(100.0 * sum(keys[k]) / len(keys[k]), 1) if keys[k] else None}
    out["lm"] = {"rows": forced, "codes": codes,
                 "accuracy": round(100.0 * correct / codes, 2) if codes else None,
                 "cross_entropy": round(ce / codes, 4) if codes else None,
                 "perplexity": round(math.exp(ce / codes), 2) if codes else None}
    out["lm_free"] = {"asked": asked, "rows": free_rows, "codes": free_codes,
                      "edit_rate": round(100.0 * free_err / free_codes, 2) if free_codes else None}
    return out


def format_chain(result: dict[str, Any], title: str = "") -> str:
    """The chain as a small text table."""
    lines = [f"speech chain{f' of {title}' if title else ''} ({result['rows']} answers)",
             f"{'link':<10} {'WER %':>7} {'errors/words':>13} {'keys heard %':>13}"]
    for k in HEARD_LINKS:
        r = result[k]
        kh = "-" if r["keys_heard"] is None else f"{r['keys_heard']:.1f}"
        lines.append(f"{k:<10} {r['wer']:>7.2f} {r['errors']:>6}/{r['words']:<6} {kh:>13}")
    lm = result["lm"]
    if lm["codes"]:
        lines.append(f"lm (teacher-forced, {lm['rows']} answers, {lm['codes']} codes): accuracy {lm['accuracy']:.2f} %, "
                     f"cross-entropy {lm['cross_entropy']:.3f} (perplexity {lm['perplexity']:.1f})")
    else:
        lines.append("lm (teacher-forced): no row without history")
    fr = result.get("lm_free") or {}
    if fr.get("codes"):
        lines.append(f"lm (free-running, greedy; {fr['rows']} of {fr['asked']} answers say the reference text, "
                     f"{fr['codes']} codes): code edit rate {fr['edit_rate']:.2f} %")
    elif fr:
        lines.append(f"lm (free-running, greedy): none of {fr['asked']} answers says the reference text")
    return "\n".join(lines)


def write_chain(result: dict[str, Any], transcripts: list[dict[str, Any]], out: str | Path) -> Path:
    """result.json + transcripts.jsonl under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "chain.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    with open(out / "transcripts.jsonl", "w", encoding="utf-8") as f:
        for t in transcripts:
            f.write(json.dumps(t, ensure_ascii=False) + "\n")
    return out / "chain.json"


def compare_chains(base: str | Path, new: str | Path) -> str:
    """Markdown: two `write_chain` folders run on the same answers (e.g. a candidate and the shipped model),
    each link's figures side by side, then item by item on the answers both measured: for each heard link the
    answers the new chain says with fewer / more errors, for the LM its teacher-forced code accuracy and its
    free-running code edit rate, each with a two-sided sign test (ties left out)."""
    from kimia.data.judge import said_errors
    from kimia.eval.report import sign_test

    runs, rows = [], []
    for d in (Path(base), Path(new)):
        if not (d / "chain.json").is_file() or not (d / "transcripts.jsonl").is_file():
            raise ConfigError(f"{d} is not a speech chain run (chain.json + transcripts.jsonl)")
        runs.append(json.loads((d / "chain.json").read_text()))
        rows.append({str(t["index"]): t for t in map(json.loads, (d / "transcripts.jsonl").read_text().splitlines())})
    old, cur = runs
    md = ["| figure | baseline | new |", "|---|---|---|"]
    for k in HEARD_LINKS:
        md += [f"| {k} WER | {old[k]['wer']} | {cur[k]['wer']} |", f"| {k} keys heard % | {old[k]['keys_heard']} | "
               f"{cur[k]['keys_heard']} |"]
    md += [f"| lm code accuracy % | {old['lm']['accuracy']} | {cur['lm']['accuracy']} |",
           f"| lm free-running code edit rate % ({old['lm_free']['rows']} / {cur['lm_free']['rows']} answers) | "
           f"{old['lm_free']['edit_rate']} | {cur['lm_free']['edit_rate']} |"]
    both = [i for i in rows[1] if i in rows[0]]
    # per answer: (value in the baseline, value in the new chain, lower is better)
    per: dict[str, list[tuple[float, float]]] = {}
    for i in both:
        a, b = rows[0][i], rows[1][i]
        for k in HEARD_LINKS:
            per.setdefault(f"{k} errors", []).append((said_errors(a["text"], a[k])[0], said_errors(b["text"], b[k])[0]))
        for key, name, sign in (("lm_accuracy", "lm code accuracy", -1.0),
                                ("lm_free_edit_rate", "lm free edit rate", 1.0)):
            if a.get(key) is not None and b.get(key) is not None:
                per.setdefault(name, []).append((sign * a[key], sign * b[key]))
    md += ["", f"Item by item on the {len(both)} answers both chains measured (p: two-sided sign test, ties left out):",
           "", "| figure | answers | better | worse | same | p |", "|---|---|---|---|---|---|"]
    for name, pairs in per.items():
        better, worse = sum(b < a for a, b in pairs), sum(b > a for a, b in pairs)
        md.append(f"| {name} | {len(pairs)} | {better} | {worse} | {len(pairs) - better - worse} | "
                  f"{sign_test(better, worse):.3g} |")
    return "\n".join(md) + "\n"
