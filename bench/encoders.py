"""Speed and memory of the two audio encoders on this machine (prints a table; never asserts).

Cases (each in its own subprocess so peak-RSS figures do not leak between cases):
  whisper-tiny      continuous Whisper encoder with the fixture dims (random weights)
  whisper-base      the packaged pretrained Whisper base (CTranslate2 weights, fp32)
  whisper-large-v3  a large-v3-shaped encoder (random weights, built on meta then to_empty + init)
  semantic-tiny     GLM-4-Voice tokenizer, fixture dims (random weights)
  semantic-glm      GLM-4-Voice-tokenizer-shaped model (1280-d, 16 layers, 16384 codes; random weights)

RTF here = audio seconds / wall seconds (higher is faster; > 1 is faster than real time). Peak memory is
the increase of the process's maximum resident set size (getrusage ru_maxrss) over the model build + runs.

    python -m bench.encoders [--threads N] [--seconds S] [--reps R] [--cases a,b,...]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CASES = ("whisper-tiny", "whisper-base", "whisper-large-v3", "semantic-tiny", "semantic-glm")
LARGE = {"whisper-large-v3", "semantic-glm"}


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _audio(seconds: float):
    import torch

    from kimia import audio as kaudio

    clip = kaudio.load_audio(kaudio.example_path())
    n = int(seconds * kaudio.SAMPLE_RATE)
    return clip.repeat(n // clip.shape[0] + 1)[:n].contiguous().to(torch.float32)


def _build(case: str):
    import torch

    from kimia.encoders.layers import init_encoder_weights
    from kimia.encoders.semantic import SemanticEncoder, SemanticTokenizer, SemanticTokenizerConfig
    from kimia.encoders.whisper import (
        ContinuousFeatureExtractor,
        WhisperEncoder,
        WhisperEncoderConfig,
        load_whisper_encoder,
    )

    g = torch.Generator().manual_seed(0)

    def random(module):
        module = module.to_empty(device="cpu")
        init_encoder_weights(module, g)
        return module.eval().requires_grad_(False)

    if case == "whisper-base":
        return ContinuousFeatureExtractor(load_whisper_encoder("base", dtype=torch.float32))
    if case.startswith("whisper-"):
        with torch.device("meta"):
            enc = WhisperEncoder(WhisperEncoderConfig.from_name(case.removeprefix("whisper-")))
        return ContinuousFeatureExtractor(random(enc))
    name = {"semantic-tiny": "tiny", "semantic-glm": "glm-4-voice"}[case]
    with torch.device("meta"):
        enc = SemanticEncoder(SemanticTokenizerConfig.from_name(name))
    return SemanticTokenizer(random(enc))


def run_case(case: str, seconds: float, reps: int, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    wav = _audio(seconds)
    rss0 = _maxrss_mb()
    t0 = time.perf_counter()
    model = _build(case)
    build_s = time.perf_counter() - t0
    with torch.inference_mode():
        model(wav)  # warm-up (also the first peak)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            out = model(wav)
            times.append(time.perf_counter() - t)
    best = min(times)
    return dict(case=case, seconds=seconds, reps=reps, threads=torch.get_num_threads(), build_s=build_s,
                wall_s=best, rtf=seconds / best, peak_mb=_maxrss_mb() - rss0, out_shape=list(out.shape))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--seconds", type=float, default=30.0, help="audio length per run (default 30 s)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (best kept; large cases use 1)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list from {', '.join(CASES)}")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_case(args.one, args.seconds, args.reps, args.threads)))
        return
    rows = []
    for case in args.cases.split(","):
        if case not in CASES:
            print(f"unknown case {case!r}; known: {', '.join(CASES)}", file=sys.stderr)
            continue
        reps = 1 if case in LARGE else args.reps
        cmd = [sys.executable, "-m", "bench.encoders", "--one", case, "--seconds", str(args.seconds),
               "--reps", str(reps)] + (["--threads", str(args.threads)] if args.threads else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{case}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"  done {case}: {row['wall_s']:.2f} s", file=sys.stderr)
    print(f"\naudio {args.seconds:g} s per run; RTF = audio s / wall s (best of reps); peak = maxrss increase")
    print(f"{'case':<18}{'threads':>8}{'reps':>6}{'build s':>9}{'wall s':>9}{'RTF':>9}{'peak MB':>9}  output")
    for r in rows:
        print(f"{r['case']:<18}{r['threads']:>8}{r['reps']:>6}{r['build_s']:>9.2f}{r['wall_s']:>9.2f}"
              f"{r['rtf']:>9.1f}{r['peak_mb']:>9.0f}  {r['out_shape']}")


if __name__ == "__main__":
    main()
