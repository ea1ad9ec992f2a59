"""Shared timing protocol of the bench scripts (reference/REFERENCE_PERF.md), so every figure they print
sits side by side with the official code's CPU anchors.

The protocol, as the reference harness applied it:
- `--threads` torch intra-op threads (default 2, as the reference) and 2 inter-op threads, fp32, batch 1;
- a machine-speed probe before and after: median GFLOP/s of a 1024^3 fp32 matmul and GB/s of a
  53248x512 fp32 matrix x vector product (the reference machine gave ~165-195 GFLOP/s, ~10-11 GB/s);
- an idle gate before every timed run: wait until the whole machine used < 0.04 CPU-s over 1 s. The
  reference waited as long as needed; here other engineers share the cores, so the wait is capped
  (`--idle-timeout`, ~20 s) and a run that started on a busy machine, or during which other processes
  used more than max(0.05 s, 2 % of its wall time) of CPU, is counted as *contended* (never rejected:
  on a shared machine that would loop forever). Every table says how many of its runs were contended;
- one warm-up run (same inputs) excluded, then median [min-max] over `--reps` timed runs.

Scripts call `add_arguments`, `setup`, `Gate`/`repeat`, `Stats`, `side_by_side` and `print_table`; the
smoke test calls each script's `main(["--quick"])` (tiny configs, one repetition, no idle wait).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures" / "reference"
CLK_TCK = os.sysconf("SC_CLK_TCK")
IDLE_CPU_S = 0.04  # the reference gate: < 0.04 CPU-s used by the whole machine over 1 s


def fixture_root() -> Path:
    """Reference fixtures: $KIMIA_REFERENCE_FIXTURES, default ../shared/fixtures/reference beside the repo."""
    return Path(os.environ.get("KIMIA_REFERENCE_FIXTURES", str(DEFAULT_FIXTURES))).resolve()


def fixture(name: str) -> Path:
    path = fixture_root() / name
    if not path.exists():
        raise SystemExit(f"reference fixture {path} not found (set KIMIA_REFERENCE_FIXTURES)")
    return path


# ------------------------------------------------------------------------------------------- arguments
def add_arguments(ap: argparse.ArgumentParser, *, reps: int = 5) -> None:
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default 2, as the reference; --quick: 1)")
    ap.add_argument("--reps", type=int, default=reps, help=f"timed runs after one warm-up (default {reps})")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny configs, 1 rep, no idle wait")
    ap.add_argument("--idle-timeout", type=float, default=20.0,
                    help="max seconds to wait for an idle machine before each run (default 20)")


def setup(args: argparse.Namespace) -> None:
    """Threads as the reference (intra-op N, inter-op 2); --quick: 1 rep, no warm-up, no idle wait and, unless
    --threads is given, 1 thread (2 OpenMP threads on a busy 2-core machine are up to ~50x slower)."""
    if args.threads is None:
        args.threads = 1 if args.quick else 2
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(2)
    except RuntimeError:  # already fixed in this process (e.g. under pytest): harmless
        pass
    if args.quick:
        args.reps = 1
        args.idle_timeout = 0.0


# ------------------------------------------------------------------------------------------- probe
@dataclass
class Probe:
    gflops: float
    gbs: float

    def __str__(self) -> str:
        return f"{self.gflops:.0f} GFLOP/s / {self.gbs:.1f} GB/s"


def probe(reps: int = 7, device: str = "cpu") -> Probe:
    """Median GFLOP/s of a 1024^3 fp32 matmul and GB/s of a 53248x512 fp32 GEMV (the reference probe)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1024, 1024, generator=g).to(device)
    m = torch.randn(53248, 512, generator=g).to(device)
    x = torch.randn(512, generator=g).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def med(fn) -> float:
        fn()
        ts = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    return Probe(2 * 1024**3 / med(lambda: a @ a) / 1e9, m.numel() * 4 / med(lambda: m @ x) / 1e9)


# ------------------------------------------------------------------------------------------- idle gate
def _machine_busy_s() -> float:
    """CPU-seconds the whole machine has been busy (user+nice+system+irq+softirq; not idle/iowait/steal)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(p) for p in parts[:7])
    return (user + nice + system + irq + softirq) / CLK_TCK


def _own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Gate:
    """Waits for an idle machine before a timed run and measures other processes' CPU during it."""

    def __init__(self, timeout: float = 20.0, threshold: float = IDLE_CPU_S):
        self.timeout, self.threshold = timeout, threshold
        self.waits = self.busy_starts = 0
        self.waited_s = 0.0
        self._misses = 0
        self._warned = False

    def other_load(self, window: float = 1.0) -> float:
        """CPU-s used by processes other than this one over `window` seconds."""
        b0, o0 = _machine_busy_s(), _own_cpu_s()
        time.sleep(window)
        return max(0.0, (_machine_busy_s() - b0) - (_own_cpu_s() - o0))

    def wait(self) -> bool:
        """True when the machine was found idle. Capped at `timeout` s; after two misses in a row the
        machine is taken as busy and later waits are capped at 2 s until an idle window is seen."""
        if self.timeout <= 0:
            return False
        self.waits += 1
        cap = self.timeout if self._misses < 2 else min(2.0, self.timeout)
        t0 = time.perf_counter()
        load = 0.0
        while time.perf_counter() - t0 < cap:
            load = self.other_load()
            if load < self.threshold:
                self._misses = 0
                self.waited_s += time.perf_counter() - t0
                return True
        self.waited_s += time.perf_counter() - t0
        self._misses += 1
        self.busy_starts += 1
        if not self._warned:
            print(f"WARNING: machine still busy after {cap:.0f} s ({load:.2f} CPU-s/s used by other processes); "
                  "timing anyway, figures marked contended", file=sys.stderr)
            self._warned = True
        return False


@dataclass
class Run:
    """One timed run: its wall time, the metrics the timed function returned, and the contention seen."""

    wall: float
    metrics: dict[str, float]
    other_cpu: float  # CPU-s used by other processes during the run
    idle_start: bool

    @property
    def contended(self) -> bool:
        return (not self.idle_start) or self.other_cpu > max(0.05, 0.02 * self.wall)


def repeat(fn: Callable[[], dict[str, float] | None], reps: int, gate: Gate, *, warmup: bool = True) -> list[Run]:
    """One warm-up call of `fn` (not timed), then `reps` gated, timed calls. `fn` may return sub-metrics."""
    if warmup:
        fn()
    runs = []
    for _ in range(reps):
        idle = gate.wait()
        b0, o0 = _machine_busy_s(), _own_cpu_s()
        t0 = time.perf_counter()
        metrics = fn() or {}
        wall = time.perf_counter() - t0
        other = max(0.0, (_machine_busy_s() - b0) - (_own_cpu_s() - o0))
        runs.append(Run(wall, dict(metrics), other, idle))
    return runs


def contention(runs: Sequence[Run]) -> str:
    n = sum(r.contended for r in runs)
    other = sum(r.other_cpu for r in runs) / max(1e-9, sum(r.wall for r in runs))
    return f"{n}/{len(runs)} contended, others {other:.2f} CPU-s/s"


# ------------------------------------------------------------------------------------------- statistics
@dataclass
class Stats:
    median: float
    lo: float
    hi: float
    n: int = 1
    clean: "Stats | None" = None  # the same over the uncontended runs only (None when there were none)

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stats":
        values = list(values)
        return cls(statistics.median(values), min(values), max(values), len(values))

    @classmethod
    def metric(cls, runs: Sequence[Run], name: str) -> "Stats":
        def value(r: Run) -> float:
            return r.wall if name == "wall" else r.metrics[name]

        clean = [value(r) for r in runs if not r.contended]
        s = cls.of(value(r) for r in runs)
        s.clean = cls.of(clean) if clean else None
        return s

    def scaled(self, k: float) -> "Stats":
        clean = self.clean.scaled(k) if self.clean else None
        return Stats(self.median * k, self.lo * k, self.hi * k, self.n, clean)

    def inverse(self, k: float = 1.0) -> "Stats":
        """k / x (turns seconds per step into steps per second; min and max swap)."""
        clean = self.clean.inverse(k) if self.clean else None
        return Stats(k / self.median, k / self.hi, k / self.lo, self.n, clean)

    def fmt(self, digits: int = 3) -> str:
        return f"{self.median:.{digits}f} [{self.lo:.{digits}f}-{self.hi:.{digits}f}]"


@dataclass
class Metric:
    """One side-by-side line: our figure, the reference median, and which direction is better."""

    name: str
    ours: Stats
    reference: float | None
    digits: int = 3
    higher_is_better: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def speedup(self, ours: Stats | None = None) -> float | None:
        """> 1: we are faster than the reference (reference time / our time, or our rate / theirs)."""
        ours = self.ours if ours is None else ours
        if self.reference is None or ours.median <= 0:
            return None
        r = ours.median / self.reference
        return r if self.higher_is_better else 1.0 / r


def side_by_side(title: str, rows: Sequence[tuple[str, Metric]], note: str = "") -> str:
    """Table: config | metric | ours median [min-max] | reference median | x faster than the reference, then
    the same over the uncontended runs only (median (n), ratio) when any run was uncontended."""
    table = []
    for config, m in rows:
        ref = "-" if m.reference is None else f"{m.reference:.{m.digits}f}"
        sp, clean = m.speedup(), m.ours.clean
        csp = m.speedup(clean) if clean else None
        table.append([config, m.name, m.ours.fmt(m.digits), ref, "-" if sp is None else f"{sp:.2f}x",
                      f"{clean.median:.{m.digits}f} ({clean.n})" if clean else "-",
                      "-" if csp is None else f"{csp:.2f}x"])
    return print_table(title, ["config", "metric", "ours median [min-max]", "reference median",
                               "ours vs ref (>1 = faster)", "uncontended only (n)", "vs ref"], table, note=note)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], note: str = "") -> str:
    """Print (and return) a plain-text table with right-aligned columns after the first two."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    out = [f"\n== {title}", line(cells[0]), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    out += [line(r) for r in cells[1:]]
    if note:
        out.append(note)
    text = "\n".join(out)
    print(text, flush=True)
    return text


# ------------------------------------------------------------------------------------------- random weights
@torch.no_grad()
def randomize_(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """The reference fixture generator's random init: matrices N(0,1)/sqrt(fan_in), 1-D norm weights
    1+0.1N, biases 0.05N, embeddings 0.2N (parameters in `named_parameters` order)."""
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    for name, p in module.named_parameters():
        if id(p) in embeddings:
            p.copy_(0.2 * torch.randn(p.shape, generator=generator))
        elif name.endswith("bias"):
            p.copy_(0.05 * torch.randn(p.shape, generator=generator))
        elif p.dim() == 1:
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
        else:
            p.copy_(torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5)
    return module


# ------------------------------------------------------------------------------------------- environment
def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def describe(args: argparse.Namespace) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = (f"torch {torch.__version__}, {cpu_model()} x{os.cpu_count()}, intra-op threads "
            f"{torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()}, fp32, "
            f"{'QUICK smoke run (no warm-up), ' if args.quick else ''}median [min-max] of {args.reps} run(s)"
            f"{'' if args.quick else ' after 1 warm-up'}, "
            f"load average {load:.1f}")
    print(text, flush=True)
    return text


class Session:
    """Probe before, gate, probe after: the frame every script's main runs inside."""

    def __init__(self, args: argparse.Namespace, *, announce: bool = True):
        self.args = args
        self.gate = Gate(args.idle_timeout)
        self.runs: list[Run] = []
        self.before = None
        if not announce:  # a child process of a script: the parent prints the frame
            return
        describe(args)
        self.before = probe(reps=1 if args.quick else 7)
        print(f"probe before: {self.before}  (reference machine ~165-195 GFLOP/s / ~10-11 GB/s)", flush=True)

    def repeat(self, fn: Callable[[], dict[str, float] | None], reps: int | None = None) -> list[Run]:
        runs = repeat(fn, self.args.reps if reps is None else reps, self.gate, warmup=not self.args.quick)
        self.runs += runs
        return runs

    def close(self) -> str:
        after = probe(reps=1 if self.args.quick else 7)
        n = sum(r.contended for r in self.runs)
        text = (f"probe after: {after}; {n}/{len(self.runs)} timed runs contended "
                f"({contention(self.runs) if self.runs else 'none'}; gate waited {self.gate.waited_s:.0f} s, "
                f"{self.gate.busy_starts}/{self.gate.waits} waits ended busy)")
        print(text, flush=True)
        return text
