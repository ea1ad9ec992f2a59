"""The shipped small model on this CPU: what a user waits for when kimia answers a spoken question.

Per spoken question (the bundled `demo_question.flac` by default, or `--audio`), answered in text + speech
through `KimiAudio.generate_stream` exactly as `kimia demo` does:

- load: seconds from `KimiAudio()` to a ready model (incl. rebuilding the LM base from the SmolLM2 GGUF);
- first audio: seconds from the question being loaded (file read) to the first PCM chunk of the answer;
- reply: seconds for the whole spoken reply; RTF = reply seconds / answer audio seconds (< 1: faster than
  real time); answer audio seconds;
- decode steps/s: LLM loop iterations per second of the same reply (the engine alone: `Engine.generate`
  on the built prompt, no detokenizer), both heads, and text-only (ASR instruction + the same audio);
- peak memory: the process's maximum resident set size after all runs (MB).

Protocol of bench/common.py (threads, idle gate, warm-up, median [min-max], contended runs counted).

    python -m bench.shipped [--model DIR] [--audio FILE] [--threads 2] [--reps 5] [--dtype bfloat16]
        [--quantize none auto]     (each LLM quantization mode measured side by side, ratio in the last column)
"""

from __future__ import annotations

import argparse
import resource
import time
from typing import Any

import torch

from bench import common
from bench.common import Stats


def measure(model, question: str, args: argparse.Namespace, gate: common.Gate) -> dict[str, Any]:
    """Every figure of the module docstring for one loaded model (Stats per metric, run lists for the notes)."""
    from kimia.api import ASR_INSTRUCTION, AudioPiece, StreamEnd
    from kimia.audio import load_audio

    def spoken() -> dict[str, float]:
        t_start = time.perf_counter()
        wave = load_audio(question)  # "the question being loaded": the clock starts before the file is read
        first, wav = None, None
        for ev in model.generate_stream([{"role": "user", "message_type": "audio", "content": wave}],
                                        output_type="both", seed=args.seed, max_new_tokens=args.max_new_tokens):
            if isinstance(ev, AudioPiece) and first is None and ev.pcm.numel():
                first = time.perf_counter() - t_start
            elif isinstance(ev, StreamEnd):
                wav = ev.wav
        total = time.perf_counter() - t_start
        audio_s = wav.shape[-1] / 24000 if wav is not None else 0.0
        return {"first_audio": first if first is not None else total, "reply": total, "audio_s": audio_s,
                "rtf": total / audio_s if audio_s else float("inf")}

    def steps_per_s(output_type: str, messages: list[dict]) -> dict[str, float]:
        (prompt,) = model.prompt_builder.build_many([messages], output_type)
        cfg = model.generation_config(output_type, args.max_new_tokens)
        g = torch.Generator().manual_seed(args.seed)
        t = time.perf_counter()
        (res,) = model.engine.generate([prompt], cfg, generator=g)
        return {"steps_per_s": res.steps / (time.perf_counter() - t), "steps": res.steps}

    runs = common.repeat(spoken, args.reps, gate)
    audio_msg = {"role": "user", "message_type": "audio", "content": question}
    both = common.repeat(lambda: steps_per_s("both", [audio_msg]), args.reps, gate)
    text = common.repeat(lambda: steps_per_s("text", [{"role": "user", "message_type": "text",
                                                       "content": ASR_INSTRUCTION}, audio_msg]), args.reps, gate)
    out: dict[str, Any] = {name: Stats.metric(runs, name) for name in ("first_audio", "reply", "audio_s", "rtf")}
    out["steps/s (both)"] = Stats.metric(both, "steps_per_s")
    out["steps/s (text)"] = Stats.metric(text, "steps_per_s")
    out["_runs"] = {"spoken": runs, "both": both, "text": text}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_arguments(ap, reps=5)
    ap.add_argument("--model", default=None, help="model folder (default: the shipped kimia-small)")
    ap.add_argument("--audio", default=None, help="question audio (default: the bundled demo question)")
    ap.add_argument("--dtype", default=None, help="model dtype (default: the model's own choice on this device)")
    ap.add_argument("--quantize", nargs="+", default=["none", "auto"],
                    help="LLM quantization modes measured side by side (default: none auto; auto = the folder's "
                         "own setting, int8 for kimia-small on CPU)")
    ap.add_argument("--max-new-tokens", type=int, default=-1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    common.setup(args)

    from kimia.api import KimiAudio
    from kimia.audio import example_path

    question = args.audio or str(example_path("demo_question.flac"))
    gate = common.Gate(args.idle_timeout)
    print(f"probe before: {common.probe()}")
    results: dict[str, dict[str, Any]] = {}
    for mode in args.quantize:
        t0 = time.perf_counter()
        model = KimiAudio(args.model, device="cpu", dtype=args.dtype, quantize=mode)
        load_s = time.perf_counter() - t0
        label = f"{mode} ({model.parts.info.get('quantize') or 'exact'})"
        print(f"model {model.parts.paths.root} ({model.parts.dtype}, LLM {label}), loaded in {load_s:.2f} s; "
              f"question {question}")
        results[label] = {**measure(model, question, args, gate), "load": Stats.of([load_s])}
        del model
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    labels = list(results)
    names = ["first_audio", "reply", "audio_s", "rtf", "steps/s (both)", "steps/s (text)", "load"]
    rows = []
    for name in names:
        digits = 1 if name.startswith("steps") else 3
        row = [name, "s" if not name.startswith(("steps", "rtf")) else ("x" if name == "rtf" else "1/s")]
        row += [results[lb][name].fmt(digits) for lb in labels]
        if len(labels) > 1:
            a, b = results[labels[0]][name].median, results[labels[-1]][name].median
            better = (b / a if name.startswith("steps") else a / b) if a > 0 and b > 0 else float("nan")
            row.append("-" if name == "audio_s" else f"{better:.2f}x")
        rows.append(row)
    headers = ["metric", "unit", *labels] + ([f"{labels[-1]} vs {labels[0]} (>1 = faster)"] if len(labels) > 1 else [])
    notes = [f"{lb}: spoken {common.contention(r['_runs']['spoken'])}; decode both "
             f"{int(r['_runs']['both'][0].metrics['steps'])} steps, text {int(r['_runs']['text'][0].metrics['steps'])} "
             f"steps" for lb, r in results.items()]
    common.print_table(f"shipped model on this CPU ({args.threads} threads, {args.reps} runs, median [min-max])",
                       headers, rows, note="\n".join(notes))
    print(f"peak memory  {peak_mb:.0f} MB (max RSS of this process, all modes loaded one after the other)")
    print(f"probe after: {common.probe()}")


if __name__ == "__main__":
    main()
