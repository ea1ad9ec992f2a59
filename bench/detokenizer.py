"""Streaming detokenizer speed (REFERENCE_PERF.md §2) side by side with the official code, then extra rows.

Side-by-side rows, exactly the reference's configs and input: 300 semantic ids drawn uniformly from
[0, vocab) (seeded), streamed in the release schedule (first chunk 30 tokens, then 30, look-ahead 12,
upsample x4, KV cache capped at 900 frames, neural_ode_euler) at 30 and 10 ODE steps, for
  (a) the dev fixture folder `detokenizer/` (tiny DiT + tiny BigVGAN, loaded from disk);
  (b) a ~50M DiT (hidden 512, depth 8, 8 heads, mlp 4.0, vocab 16384; random weights drawn like the fixture
      generator) + a small BigVGAN (rates [5,4,4,3,2], kernels [9,8,8,5,4], 256 channels, resblocks
      [3,7,11] x [1,3,5]; snakebeta, no tanh/bias at the end; its own random init).
Figures: total, DiT and vocoder seconds and their RTF (compute s / 24.0 s of audio), first-chunk latency =
wall time from the start to the return of the first push (the first 0.72 s of audio) [DiT + vocoder].
DiT time = the DiT's forward calls (ODE evaluations + cache fills); vocoder time = its forward calls.

Extra rows after them: the `small` DiT/BigVGAN presets (what we train; DiT depth 9, vocoder rates
[8,5,4,3]) on the same input.

    python -m bench.detokenizer [--threads 2] [--reps 5] [--quick] [--configs fixture,50m] [--steps 30,10]
        [--extras small/small|none]
"""

from __future__ import annotations

import argparse
import time


import torch

from bench import common
from bench.common import Metric, Stats

TOKENS = 300
AUDIO_S = TOKENS / 12.5  # 24.0 s
# Emitted chunk sizes (samples) of the reference for 300 tokens (REFERENCE_PERF.md §2, "Work per run").
REFERENCE_CHUNKS = [17280, 34560, 80640, 34560, 80640, 34560, 80640, 34560, 80640, 97920]

# REFERENCE_PERF.md §2 "Streaming detokenizer": medians; (config, ODE steps) -> figures.
# (b) at 30 steps had two series; series 1 (5 runs) is the comparison figure, series 2 (3 runs, fresh
# process) is kept for the note: total 42.46, DiT 36.15, vocoder 6.24, first chunk 2.523 [2.349 + 0.173].
REFERENCE_S2 = {
    ("fixture", 30): dict(total=2.49, rtf=0.104, dit=0.76, dit_rtf=0.032, voc=1.70, voc_rtf=0.071, first=0.094,
                          first_dit=0.049, first_voc=0.045, dit_calls=299),
    ("fixture", 10): dict(total=1.93, rtf=0.080, dit=0.29, dit_rtf=0.012, voc=1.65, voc_rtf=0.069, first=0.072,
                          first_dit=0.019, first_voc=0.050, dit_calls=99),
    ("50m", 30): dict(total=46.83, rtf=1.951, dit=39.85, dit_rtf=1.660, voc=6.58, voc_rtf=0.274, first=3.160,
                      first_dit=2.862, first_voc=0.297, dit_calls=299),
    ("50m", 10): dict(total=18.18, rtf=0.758, dit=12.14, dit_rtf=0.506, voc=6.00, voc_rtf=0.250, first=1.007,
                      first_dit=0.830, first_voc=0.177, dit_calls=99),
}
REFERENCE_PARAMS = {"fixture": (221_264, 49_977), "50m": (47_201_360, 3_292_273)}  # vocoder: weight_g unfolded
DIT_50M = dict(semantic_vocab_size=16384, hidden_size=512, depth=8, num_heads=8, mlp_ratio=4.0)
BIGVGAN_SMALL = dict(upsample_rates=[5, 4, 4, 3, 2], upsample_kernel_sizes=[9, 8, 8, 5, 4],
                     upsample_initial_channel=256, resblock_kernel_sizes=[3, 7, 11],
                     resblock_dilation_sizes=[[1, 3, 5]] * 3, use_tanh_at_final=False, use_bias_at_final=False)


class _Timer:
    """Accumulates the wall time of a module's forward calls through hooks."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.total, self._t0, self.device = 0.0, 0.0, device
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _pre(self, *_):
        self._sync()
        self._t0 = time.perf_counter()

    def _post(self, *_):
        self._sync()
        self.total += time.perf_counter() - self._t0


def build(name: str, device: torch.device, dtype: torch.dtype):
    """-> (DiT, vocoder) for 'fixture' (loaded from the fixture folder), '50m' or a 'dit/vocoder' preset pair."""
    from kimia.detokenizer import BigVGAN, BigVGANConfig, DiT, DiTConfig, load_dit, load_vocoder

    if name == "fixture":
        root = common.fixture("detokenizer")
        return load_dit(root / "audio_detokenizer", device, dtype), load_vocoder(root / "vocoder", device, dtype)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the vocoder's own init
    if name == "50m":
        dit_cfg, voc_cfg = DiTConfig(**DIT_50M), BigVGANConfig(**BIGVGAN_SMALL)
    else:
        dit_name, voc_name = name.split("/")
        dit_cfg, voc_cfg = DiTConfig.from_name(dit_name), BigVGANConfig.from_name(voc_name)
    dit = common.randomize_(DiT(dit_cfg), g).to(device, dtype).eval().requires_grad_(False)
    voc = BigVGAN(voc_cfg).to(device, dtype).eval().requires_grad_(False)
    return dit, voc


def time_config(name: str, steps: int, n_tokens: int, session: common.Session, device, dtype, reps=None) -> dict:
    from kimia.detokenizer import StreamConfig, StreamingDetokenizer

    dit, voc = build(name, device, dtype)
    t_dit, t_voc = _Timer(dit, device), _Timer(voc, device)
    tokens = torch.randint(0, dit.cfg.semantic_vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(1))
    seed = [0]
    chunks: list[int] = []

    def once() -> dict[str, float]:
        seed[0] += 1  # per-run seeded noise, as the reference
        det = StreamingDetokenizer(dit, voc, StreamConfig(ode_steps=steps), generator=torch.Generator().manual_seed(seed[0]))
        cfg = det.config
        calls0 = det.stats.dit_calls
        t_dit.total = t_voc.total = 0.0
        chunks.clear()
        first = first_dit = first_voc = 0.0
        starts = [0, *range(cfg.first_chunk_size, n_tokens, cfg.chunk_size)]
        t0 = time.perf_counter()
        for i, start in enumerate(starts):  # the `detokenize` schedule, pushed call by call
            end = cfg.first_chunk_size if i == 0 else start + cfg.chunk_size
            wav = det.push(tokens[start:end], is_final=end >= n_tokens)
            chunks.append(int(wav.shape[-1]))
            if i == 0:
                first, first_dit, first_voc = time.perf_counter() - t0, t_dit.total, t_voc.total
        total = time.perf_counter() - t0
        return dict(total=total, dit=t_dit.total, voc=t_voc.total, first=first, first_dit=first_dit,
                    first_voc=first_voc, audio=sum(chunks) / det.sample_rate, dit_calls=det.stats.dit_calls - calls0)

    runs = session.repeat(once, reps)
    params = (sum(p.numel() for p in dit.parameters()), sum(p.numel() for p in voc.parameters()))
    return dict(runs=runs, params=params, chunks=list(chunks))


def rows_for(label: str, r: dict, ref: dict) -> list[tuple[str, Metric]]:
    """Side-by-side lines of one (config, steps): (name, our metric key, reference key, per audio second)."""
    runs = r["runs"]
    audio = runs[0].metrics["audio"]
    spec = [("total (s)", "total", "total", False), ("RTF", "total", "rtf", True), ("DiT (s)", "dit", "dit", False),
            ("DiT RTF", "dit", "dit_rtf", True), ("vocoder (s)", "voc", "voc", False),
            ("vocoder RTF", "voc", "voc_rtf", True), ("first-chunk latency (s)", "first", "first", False),
            ("  of which DiT (s)", "first_dit", "first_dit", False),
            ("  of which vocoder (s)", "first_voc", "first_voc", False)]
    out = []
    for name, key, ref_key, per_audio in spec:
        s = Stats.metric(runs, key)
        out.append((label, Metric(name, s.scaled(1 / audio) if per_audio else s, ref.get(ref_key),
                                  2 if name.endswith("(s)") and not key.startswith("first") else 3)))
    return out


def step_quality(name: str, steps: list[int], n_tokens: int, device, dtype, ref_steps: int = 120) -> list[list]:
    """The quality cost of fewer ODE steps: the mel of one offline solve at each step count against a
    `ref_steps` solve of the same tokens and noise (relative L2 error, and the max abs error in mel units),
    with the DiT time of each solve. Random weights: it measures solver error, not how good the speech is."""
    from kimia.detokenizer.dit import to_timestep
    from kimia.detokenizer.solver import euler_solve, make_t_span

    dit, _ = build(name, device, dtype)
    g = torch.Generator().manual_seed(0)
    vocab = dit.cfg.semantic_vocab_size
    up = torch.randint(0, vocab, (1, n_tokens), generator=g).repeat_interleave(4, dim=1).to(device)
    T = up.shape[1]
    noise = torch.randn(1, T, dit.cfg.input_size, generator=g).to(device, dtype)
    pos = torch.arange(T, device=device)[None]

    def velocity(t, x):
        return dit(x, up, to_timestep(t, 1, device), pos, cond_rate=4)

    def solve(n: int) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            mel = euler_solve(velocity, noise, make_t_span(n).to(device), "neural_ode_euler").float()
        return mel, time.perf_counter() - t0

    ref, _ = solve(ref_steps)
    rows = []
    for n in steps:
        mel, sec = solve(n)
        err = (mel - ref).norm() / ref.norm()
        rows.append([name, n, f"{float(err):.4f}", f"{float((mel - ref).abs().max()):.3f}", f"{sec:.3f}"])
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_arguments(ap, reps=5)
    ap.add_argument("--steps", default=None, help="ODE step counts (default 30,10; --quick: 10)")
    ap.add_argument("--tokens", type=int, default=None, help=f"semantic ids per utterance (default {TOKENS}; "
                                                             "--quick: 45 = a first chunk and a final one)")
    ap.add_argument("--extras", default="default", help="extra dit/vocoder preset pairs after the reference rows "
                                                        "(default small/small; --quick: none), or none")
    ap.add_argument("--configs", default=None, help="reference rows: fixture,50m (default; --quick: fixture)")
    ap.add_argument("--large-reps", type=int, default=3, help="timed runs for the ~50M rows (default 3)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    common.setup(args)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    n_tokens = args.tokens or (45 if args.quick else TOKENS)
    steps = [int(s) for s in (args.steps or ("10" if args.quick else "30,10")).split(",")]
    session = common.Session(args)
    print(f"device {device}, dtype {args.dtype}, {n_tokens} tokens ({n_tokens / 12.5:.1f} s of audio), chunks of 30, "
          f"look-ahead 12, KV cache cap 900 frames", flush=True)
    exact = n_tokens == TOKENS and device.type == "cpu" and dtype == torch.float32
    rows, notes = [], []
    configs = (args.configs or ("fixture" if args.quick else "fixture,50m")).split(",")
    for name in configs:
        if name not in REFERENCE_PARAMS:
            raise SystemExit(f"unknown config {name!r}; known: {', '.join(REFERENCE_PARAMS)}")
        for n_steps in steps:
            reps = min(args.reps, args.large_reps) if name == "50m" else None
            r = time_config(name, n_steps, n_tokens, session, device, dtype, reps)
            ref = REFERENCE_S2.get((name, n_steps), {}) if exact else {}
            label = f"({'a' if name == 'fixture' else 'b'}) {name} {n_steps} steps"
            rows += rows_for(label, r, ref)
            sched = "" if n_tokens != TOKENS else f", chunk sizes == reference: {r['chunks'] == REFERENCE_CHUNKS}"
            rp = REFERENCE_PARAMS[name]
            notes.append(f"{label}: params DiT {r['params'][0]:,} (ref {rp[0]:,}) + vocoder {r['params'][1]:,} "
                         f"(ref {rp[1]:,} incl. unfolded weight_g), DiT calls {int(r['runs'][0].metrics['dit_calls'])}"
                         f" (ref {ref.get('dit_calls', '-')}){sched}; {common.contention(r['runs'])}")
    common.side_by_side(f"REFERENCE_PERF §2: streaming detokenizer, {n_tokens} uniform tokens"
                        + ("" if exact else " (not the reference input: no reference figures)"), rows,
                        note="\n".join(notes))
    extras = ([] if args.quick else ["small/small"]) if args.extras == "default" else \
        [e for e in args.extras.split(",") if e and e != "none"]
    extra = []
    for pair in extras:
        for n_steps in steps:
            r = time_config(pair, n_steps, n_tokens, session, device, dtype, reps=min(args.reps, args.large_reps))
            runs = r["runs"]
            audio = runs[0].metrics["audio"]
            f = {k: Stats.metric(runs, k).median for k in ("total", "dit", "voc", "first")}
            extra.append([pair, f"{r['params'][0] / 1e6:.1f}+{r['params'][1] / 1e6:.1f}", n_steps,
                          f"{f['total'] / audio:.3f}", f"{f['dit'] / audio:.3f}", f"{f['voc'] / audio:.3f}",
                          f"{f['first']:.3f}", int(runs[0].metrics["dit_calls"]), sum(x.contended for x in runs)])
    if extra:
        common.print_table("extra rows: our DiT/BigVGAN presets (same input; no reference figure)",
                           ["DiT/vocoder", "params M", "steps", "RTF", "DiT RTF", "voc RTF", "1st chunk s",
                            "DiT calls", "contended"], extra)
    q_steps = sorted({*steps, 5}, reverse=True)
    quality = [row for name in configs for row in step_quality(name, q_steps, min(n_tokens, 100), device, dtype)]
    common.print_table("quality cost of fewer ODE steps (offline solve vs a 120-step solve, same tokens and noise)",
                       ["DiT", "steps", "rel. L2 error", "max abs err", "DiT s"], quality)
    session.close()


if __name__ == "__main__":
    main()
