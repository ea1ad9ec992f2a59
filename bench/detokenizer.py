"""Detokenizer speed on this machine: real-time factor and first-chunk latency, DiT vs vocoder.

Runs the streaming detokenizer (release chunking: 30-token chunks, 12-token look-ahead) on random
semantic ids with random weights, for the reference fixture's tiny sizes and for a ~50M-parameter DiT with
the `small` BigVGAN, at 30 and 10 ODE steps. Prints figures; never asserts.

    .venv/bin/python bench/detokenizer.py [--tokens 100] [--threads 2] [--device cpu] [--dtype float32]

RTF = compute seconds / seconds of audio produced (< 1 is faster than real time). "first chunk" is the wall
time of the first `push`, i.e. the latency before the first samples can be played.
"""

from __future__ import annotations

import argparse
import time

import torch

from kimia.detokenizer.bigvgan import BigVGAN, BigVGANConfig
from kimia.detokenizer.dit import DiT, DiTConfig
from kimia.detokenizer.stream import StreamConfig, StreamingDetokenizer


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


def _build(dit_name: str, voc_name: str, device, dtype):
    torch.manual_seed(0)
    dit = DiT(DiTConfig.from_name(dit_name)).to(device, dtype).eval()
    voc = BigVGAN(BigVGANConfig.from_name(voc_name)).to(device, dtype).eval()
    return dit, voc


def run(dit_name: str, voc_name: str, n_tokens: int, steps: int, device, dtype) -> dict:
    dit, voc = _build(dit_name, voc_name, device, dtype)
    det = StreamingDetokenizer(dit, voc, StreamConfig(ode_steps=steps), generator=torch.Generator().manual_seed(0))
    t_dit, t_voc = _Timer(dit, device), _Timer(voc, device)
    tokens = torch.randint(0, dit.cfg.semantic_vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(1))
    cfg = det.config
    samples, first = 0, None
    t0 = time.perf_counter()
    for i, start in enumerate([0, *range(cfg.first_chunk_size, n_tokens, cfg.chunk_size)]):
        end = cfg.first_chunk_size if i == 0 else start + cfg.chunk_size
        wav = det.push(tokens[start:end], is_final=end >= n_tokens)
        samples += wav.shape[-1]
        if first is None:
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    audio_s = samples / 24000
    n_params = sum(p.numel() for p in dit.parameters()), sum(p.numel() for p in voc.parameters())
    return dict(total=total, first=first, audio=audio_s, dit=t_dit.total, voc=t_voc.total, params=n_params,
                dit_calls=det.stats.dit_calls, chunks=det.stats.chunks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=100, help="semantic tokens per utterance (12.5 per second)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = leave default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--sizes", default="tiny/tiny,small/small", help="comma list of dit/vocoder preset pairs")
    ap.add_argument("--steps", default="30,10")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} tokens={args.tokens} "
          f"({args.tokens / 12.5:.1f} s of audio), chunks of 30 tokens, look-ahead 12")
    header = f"{'DiT/vocoder':<14}{'params M':>14}{'steps':>6}{'RTF':>7}{'DiT RTF':>9}{'voc RTF':>9}{'1st chunk s':>12}{'calls':>7}"
    print(header)
    print("-" * len(header))
    for pair in args.sizes.split(","):
        dit_name, voc_name = pair.split("/")
        for steps in (int(s) for s in args.steps.split(",")):
            r = run(dit_name, voc_name, args.tokens, steps, device, dtype)
            params = f"{r['params'][0] / 1e6:.1f}+{r['params'][1] / 1e6:.1f}"
            print(f"{pair:<14}{params:>14}{steps:>6}{r['total'] / r['audio']:>7.3f}{r['dit'] / r['audio']:>9.3f}"
                  f"{r['voc'] / r['audio']:>9.3f}{r['first']:>12.3f}{r['dit_calls']:>7}")


if __name__ == "__main__":
    main()
