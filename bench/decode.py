"""LLM generation speed: our static-cache, batched `Engine` next to a naive official-style loop (prints; never asserts).

Protocol of reference/REFERENCE_PERF.md §1, so the figures sit beside the official code's anchors:
configs (a) `tiny` = the dev fixture dims and (b) `100m` = the ~131 M-parameter config of §1 (random weights
drawn like the fixture generator: weights N(0,1)/sqrt(fan_in), norms 1+0.1N, biases 0.05N, embeddings 0.2N);
the exact 60-position prompt of the appendix (user text "Answer briefly." + 40 audio ids, continuous features
fixed random N(0,1) on positions 16-55); output_type "both", greedy, 128 loop iterations with the audio stop
disabled (1 prefill + 127 one-position decode steps). fp32, torch.inference_mode, `--threads` intra-op threads.

Columns: prefill = the first forward (ms, and prompt tokens/s over the batch); decode = from the start of the
2nd forward to the end of the loop (sampling and bookkeeping included), as lockstep steps/s and row-tokens/s
(= batch x steps/s). `naive` is the official loop's structure: batch 1 only (a batch of 8 = 8 runs in a row),
KV cache grown by `torch.cat` every step, one `.item()` per stream per step. Ratios = engine / naive.

First the §1 side-by-side rows (our Engine, batch 1; (a) is the dev fixture `llm/` loaded from disk, as the
reference), with the bench/common.py protocol (idle gate, probe before/after, median [min-max]); then the
engine-vs-naive rows above.

    python -m bench.decode [--threads 2] [--reps 5] [--quick] [--configs tiny,100m] [--batches 1,8] [--no-naive]
"""

from __future__ import annotations

import argparse
import statistics
import time


import torch

from bench import common
from bench.common import Metric, Stats

from kimia.engine import Engine, GenerationConfig
from kimia.lm import AudioLM, AudioLMConfig
from kimia.prompt import PromptBatch
from kimia.sampling import sample_with_params
from kimia.tokens import SpecialTokens

STEPS = 128
CONFIGS = {
    "tiny": {},
    "100m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=12, kimia_mimo_layers=4,
                 kimia_mimo_transformer_from_layer_index=8, num_attention_heads=8, num_key_value_heads=2,
                 max_window_layers=12, vocab_size=53248, num_base_tokens=48731, kimia_token_offset=49152,
                 kimia_text_output_vocab=49152, kimia_audio_output_vocab=4608, kimia_adaptor_input_dim=2048,
                 kimia_media_begin=48749, kimia_media_end=48751, pad_token_id=49151, bos_token_id=48731,
                 eos_token_ids=[48732, 48733]),
}
# Appendix of REFERENCE_PERF.md: the 40 audio ids (semantic id + offset) and the 14 text ids per config.
AUDIO_IDS = {
    "tiny": [1648, 1200, 1359, 1363, 888, 1380, 1170, 1107, 1597, 831, 1493, 1055, 1130, 1546, 799, 1644, 1615,
             1382, 1142, 900, 1122, 1582, 925, 1021, 949, 1115, 1393, 858, 947, 1365, 1026, 1650, 1058, 1644,
             1238, 1076, 960, 1539, 1495, 834],
    "100m": [50094, 49646, 49805, 49809, 52406, 50850, 52688, 50577, 51067, 50301, 50963, 52573, 51624, 49992,
             50269, 52138, 53133, 52900, 52660, 49346, 49568, 50028, 50395, 51515, 52467, 52633, 51887, 50328,
             50417, 51859, 52544, 50096, 52576, 50090, 50708, 51570, 49406, 52033, 49941, 49280],
}
TEXT_IDS = [65, 110, 115, 119, 101, 114, 32, 98, 261, 101, 102, 108, 121, 46]  # "Answer briefly."


def build(name: str, device: str) -> tuple[AudioLM, SpecialTokens, PromptBatch]:
    cfg = AudioLMConfig.from_name("tiny", **CONFIGS[name])
    g = torch.Generator().manual_seed(0)
    model = AudioLM(cfg)
    with torch.no_grad():  # the fixture generator's random init
        for pname, p in model.named_parameters():
            if "embed_tokens" in pname:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif pname.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:  # RMSNorm / LayerNorm weights
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    model = model.to(device).eval()
    model.init_buffers(device)
    sp = SpecialTokens.from_base(cfg.num_base_tokens, token_offset=cfg.kimia_token_offset, audio_delay=6)
    audio = ([sp.user_msg_start] + [sp.text_blank] * 14 + [sp.media_begin] + AUDIO_IDS[name]
             + [sp.media_end, sp.speech_ctd, sp.msg_end, sp.assistant_msg_start])
    text = [sp.text_blank] + TEXT_IDS + [sp.text_blank] * 45
    assert len(audio) == len(text) == 60
    cont = torch.zeros(60, dtype=torch.bool)
    cont[16:56] = True
    feats = torch.randn(40, cfg.kimia_adaptor_input_dim, generator=g)
    prompt = PromptBatch(torch.tensor(audio), torch.tensor(text), cont, cont & False, cont & False, [feats], [(16, 40)])
    return model, sp, prompt


class _Clock:
    """Forward pre-hook timestamps: prefill = first forward, decode = 2nd forward start -> loop end."""

    def __init__(self, model: AudioLM, device: str):
        self.t: list[float] = []
        self.ends: list[float] = []
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        model.register_forward_pre_hook(lambda m, a: self._mark(self.t))
        model.register_forward_hook(lambda m, a, o: self._mark(self.ends))

    def _mark(self, where: list[float]) -> None:
        self.sync()
        where.append(time.perf_counter())


# ---------------------------------------------------------------------------------------------- naive loop
class ConcatCache:
    """The official cache behaviour: every layer's k/v grown with torch.cat at every step (batch 1)."""

    def __init__(self, layers: int, num_main: int):
        self.k: list[torch.Tensor | None] = [None] * layers
        self.v: list[torch.Tensor | None] = [None] * layers
        self.num_main, self.batch_size, self.length = num_main, 1, 0
        self._next = 0

    def check(self, positions, kv_len=None):
        self._next = self.length + positions.shape[1]

    def attention_mask(self, positions, kv_len=None):
        slots = torch.arange(self._next, device=positions.device)
        return slots[None, None, None, :] <= positions[:, None, :, None]

    def _layer(self, i):
        cache = self

        class _L:
            def update(self, k, v, positions, kv_len=None):
                cache.k[i] = k if cache.k[i] is None else torch.cat([cache.k[i], k], dim=2)
                cache.v[i] = v if cache.v[i] is None else torch.cat([cache.v[i], v], dim=2)
                if i == len(cache.k) - 1:
                    cache.length = cache._next
                return cache.k[i], cache.v[i]
        return _L()

    def main(self, i):
        return self._layer(i)

    def mimo(self, j):
        return self._layer(self.num_main + j)


@torch.inference_mode()
def naive_generate(model: AudioLM, sp: SpecialTokens, prompt: PromptBatch, config: GenerationConfig, clock_t: list):
    """Batch-1 loop shaped like the official `_generate_loop` (greedy), no stop on audio (bench protocol)."""
    audio = prompt.audio_ids[None].to(model.lm_head.weight.device)
    text = prompt.text_ids[None].to(audio.device)
    cont, mask = model.scatter_continuous(audio, prompt.features)
    cache = ConcatCache(model.config.num_total_layers, model.config.num_hidden_layers)
    pos = torch.arange(audio.shape[1], device=audio.device)[None]
    last = audio.shape[1] - 1
    prev_t, prev_a, text_done = [], [], False
    for i in range(STEPS):
        # as the official forward: logits of both heads for every prompt position at prefill
        out = model(audio, text, pos, continuous=cont, continuous_mask=mask, cache=cache)
        t = sample_with_params(out.text_logits[:, -1], config.text, None, None)
        a = sample_with_params(out.audio_logits[:, -1], config.audio, None, None)
        if text_done:
            t.fill_(sp.text_blank)
        elif t.item() == sp.text_eos:
            text_done = True
        if i < sp.audio_delay:
            a.fill_(sp.text_blank)
        prev_t.append(t.item())
        prev_a.append(a.item())
        audio, text = a[:, None], t[:, None]
        last += 1
        pos = torch.full((1, 1), last, dtype=torch.long, device=audio.device)
        cont = mask = None
    return prev_t, prev_a


# ---------------------------------------------------------------------------------------------- timing
def probe(device: str) -> str:
    return str(common.probe(device=device))


def time_engine(model, sp, prompt, batch, reps, device):
    eng = Engine(model, sp)
    config = GenerationConfig(output_type="both", max_new_tokens=STEPS, audio_stop=False)
    clock = _Clock(model, device)
    res = []
    for r in range(reps + 1):  # first run = warm-up
        clock.t.clear(); clock.ends.clear()
        out = eng.generate([prompt] * batch, config)
        clock.sync(); end = time.perf_counter()
        assert all(o.steps == STEPS for o in out)
        if r:
            res.append((clock.ends[0] - clock.t[0], end - clock.t[1]))
    model._forward_pre_hooks.clear(); model._forward_hooks.clear()
    return res


def time_naive(model, sp, prompt, batch, reps, device):
    config = GenerationConfig(output_type="both", max_new_tokens=STEPS, audio_stop=False)
    clock = _Clock(model, device)
    res = []
    for r in range(reps + 1):
        pre = dec = 0.0
        for _ in range(batch):  # the official loop is batch 1: a batch is rows run one after another
            clock.t.clear(); clock.ends.clear()
            naive_generate(model, sp, prompt, config, clock.t)
            clock.sync(); end = time.perf_counter()
            pre += clock.ends[0] - clock.t[0]
            dec += end - clock.t[1]
        if r:
            res.append((pre, dec))
    model._forward_pre_hooks.clear(); model._forward_hooks.clear()
    return res


def engine_vs_naive(args: argparse.Namespace, configs: list[str]) -> None:
    """Extra rows: our Engine next to the naive official-style loop, batch 1 and 8."""
    print(f"\n== engine vs naive official-style loop: device {args.device}, threads {args.threads}, fp32, {STEPS} "
          f"loop iterations, median of {args.reps} runs after 1 warm-up (not gated)")
    head = f"{'config':<6} {'B':>2} {'impl':<7} {'prefill ms':>10} {'prefill tok/s':>13} {'decode steps/s':>14} {'row-tok/s':>10}"
    print(head)
    print("-" * len(head))
    for name in configs:
        model, sp, prompt = build(name, args.device)
        n = len(prompt)
        for batch in (int(b) for b in args.batches.split(",")):
            figures = {}
            for impl, fn in (("engine", time_engine), ("naive", time_naive)):
                runs = fn(model, sp, prompt, batch, args.reps, args.device)
                pre = statistics.median(r[0] for r in runs)
                dec = statistics.median(r[1] for r in runs)
                # steps/s of one generation loop: engine rows advance together, naive runs one after another
                steps_s = (STEPS - 1) / dec * (batch if impl == "naive" else 1)
                figures[impl] = (pre, batch * n / pre, steps_s, batch * (STEPS - 1) / dec)
                print(f"{name:<6} {batch:>2} {impl:<7} {pre * 1e3:>10.2f} {figures[impl][1]:>13.0f} "
                      f"{steps_s:>14.1f} {figures[impl][3]:>10.1f}")
            e, v = figures["engine"], figures["naive"]
            print(f"{name:<6} {batch:>2} {'ratio':<7} {'':>10} {e[1] / v[1]:>12.2f}x {'':>14} {e[3] / v[3]:>9.2f}x")


# ---------------------------------------------------------------------------------------------- REFERENCE_PERF §1
# REFERENCE_PERF.md §1 "LLM generate loop", medians: (a) the dev fixture `llm/` (9 runs), (b) ~100M (5 runs).
REFERENCE_S1 = {
    "tiny": dict(params=575_744, prefill_ms=4.59, steps_s=505.7, ms_step=1.98, forward_ms=1.91, wall_s=0.260),
    "100m": dict(params=131_365_888, prefill_ms=151.95, steps_s=20.4, ms_step=49.09, forward_ms=48.50, wall_s=6.382),
}


def reference_model(name: str, device: str) -> tuple[AudioLM, SpecialTokens, PromptBatch]:
    """(a) `tiny` = the dev fixture `llm/` loaded from disk, as the reference; (b) `100m` = `build`."""
    model, sp, prompt = build(name, device)
    if name == "tiny":
        from kimia.checkpoints.official_lm import load_official_lm

        model, _ = load_official_lm(common.fixture("llm"), device=device, dtype=torch.float32)
    return model, sp, prompt


def reference_side_by_side(session: common.Session, configs: list[str], device: str) -> None:
    """§1 figures of our Engine (batch 1, output "both", greedy, 128 iterations, audio stop off) beside the
    reference medians: prefill = first forward; decode = 2nd forward start -> loop end over 127 steps;
    model forward = mean forward time of those steps; generate() wall = the whole `Engine.generate` call."""
    rows, notes = [], []
    for name in configs:
        model, sp, prompt = reference_model(name, device)
        eng = Engine(model, sp)
        config = GenerationConfig(output_type="both", max_new_tokens=STEPS, audio_stop=False)
        clock = _Clock(model, device)

        def once() -> dict[str, float]:
            clock.t.clear(); clock.ends.clear()
            t0 = time.perf_counter()
            out = eng.generate([prompt], config)
            clock.sync(); end = time.perf_counter()
            if out[0].steps != STEPS:
                raise RuntimeError(f"{name}: {out[0].steps} loop iterations, expected {STEPS}")
            fwd = sum(e - t for t, e in zip(clock.t[1:], clock.ends[1:])) / (STEPS - 1)
            return dict(prefill=clock.ends[0] - clock.t[0], decode=end - clock.t[1], forward=fwd, wall=end - t0)

        runs = session.repeat(once)
        model._forward_pre_hooks.clear(); model._forward_hooks.clear()
        ref = REFERENCE_S1[name]
        label = f"({'a' if name == 'tiny' else 'b'}) {'dev fixture llm/' if name == 'tiny' else '~100M'}"
        decode = Stats.metric(runs, "decode")
        rows += [
            (label, Metric("prefill forward (ms)", Stats.metric(runs, "prefill").scaled(1e3), ref["prefill_ms"], 2)),
            (label, Metric("decode steps/s", decode.inverse(STEPS - 1), ref["steps_s"], 1, higher_is_better=True)),
            (label, Metric("decode ms/step (incl. sampling)", decode.scaled(1e3 / (STEPS - 1)), ref["ms_step"], 2)),
            (label, Metric("  of which model forward (ms)", Stats.metric(runs, "forward").scaled(1e3),
                           ref["forward_ms"], 2)),
            (label, Metric("generate() wall, 128 steps (s)", Stats.metric(runs, "wall"), ref["wall_s"], 3)),
        ]
        params = sum(p.numel() for p in model.parameters())
        notes.append(f"{label}: params {params:,} (reference {ref['params']:,}), prompt {len(prompt)} positions; "
                     f"{common.contention(runs)}")
    common.side_by_side("REFERENCE_PERF §1: LLM generate loop, output both, greedy, 128 iterations, batch 1", rows,
                        note="\n".join(notes) + "\n(generate() wall: ours excludes prompt building and text "
                                                 "detokenizing, which the reference includes)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_arguments(ap, reps=5)
    ap.add_argument("--configs", default=None, help="tiny,100m (default; --quick: tiny)")
    ap.add_argument("--batches", default=None, help="engine-vs-naive batch sizes (default 1,8; --quick: 1)")
    ap.add_argument("--naive-reps", type=int, default=3, help="runs of the engine-vs-naive rows (default 3)")
    ap.add_argument("--no-naive", action="store_true", help="skip the engine-vs-naive rows")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    common.setup(args)
    configs = (args.configs or ("tiny" if args.quick else "tiny,100m")).split(",")
    session = common.Session(args)
    reference_side_by_side(session, configs, args.device)
    if not args.no_naive:
        extra = argparse.Namespace(**vars(args))
        extra.reps = 1 if args.quick else args.naive_reps
        extra.batches = args.batches or ("1" if args.quick else "1,8")
        engine_vs_naive(extra, configs)
    session.close()


if __name__ == "__main__":
    main()
