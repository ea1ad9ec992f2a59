"""`kimia data ...` command line: `kimia data synth --out DIR --hours H [--seed S] [--jobs N] ...`.

`add_data_parser(subparsers)` registers the `data` command on the main parser; `run_data_cli(args)` runs it
and returns the process exit code. A killed `synth` run is resumed by running the same command again.
"""

from __future__ import annotations

import argparse
import logging
import os

from kimia.data.engines import ENGINE_NAMES

logger = logging.getLogger(__name__)


def add_data_parser(subparsers) -> argparse.ArgumentParser:
    from kimia.data.synth import ALL_TASKS, EXTRA_TASKS, TASKS
    from kimia.data.texts import DEFAULT_TEXT_SOURCES, TEXT_SOURCES

    p = subparsers.add_parser("data", help="build training/evaluation data (synthetic speech corpus)")
    sub = p.add_subparsers(dest="data_command", required=True)
    s = sub.add_parser("synth", help="synthesise a judged, balanced, resumable speech corpus",
                       description="Paired (text, audio) data from every installed speech engine, judged by "
                                   "Whisper base. Rerun the same command to resume a killed run.")
    s.add_argument("--out", required=True, help="corpus folder (created; an existing one is resumed)")
    s.add_argument("--hours", type=float, required=True, help="hours of input audio to plan, split evenly over tasks")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: all cores)")
    s.add_argument("--engines", nargs="+", default=list(ENGINE_NAMES), choices=ENGINE_NAMES, metavar="ENGINE",
                   help=f"engines to use when installed (default all: {' '.join(ENGINE_NAMES)})")
    s.add_argument("--tasks", nargs="+", default=list(TASKS), choices=ALL_TASKS, metavar="TASK",
                   help=f"tasks (default: {' '.join(TASKS)}; opt-in: {' '.join(EXTRA_TASKS)})")
    s.add_argument("--task-weight", nargs="+", default=[], metavar="TASK=W",
                   help="share of the hours per task, e.g. asr=3 spoken_qa=1.2 (unnamed tasks: 1)")
    s.add_argument("--no-augment", action="store_true", help="no channel augmentation of the train split")
    s.add_argument("--text-sources", nargs="+", default=list(DEFAULT_TEXT_SOURCES), choices=list(TEXT_SOURCES),
                   metavar="SOURCE",
                   help="sentence pools of the read speech: fortune (~4.7k sentences), wordnet (+~33k usage "
                        "examples, Debian wordnet-base)")
    s.add_argument("--reuse-from", default=None, metavar="CORPUS",
                   help="an earlier corpus (e.g. a smaller one of the same seed): items of the same spec are "
                        "hard-linked from it instead of being synthesised and judged again")
    s.add_argument("--no-judge", action="store_true", help="skip the Whisper intelligibility check")
    s.add_argument("--eval-fraction", type=float, default=0.1, help="share of sentences held out for evaluation")
    s.add_argument("--output-voice", default="kokoro:jm_kumo",
                   help="fixed voice of spoken answers, engine:voice (Kokoro also takes mixes a*0.5+b*0.5)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run_data_cli(args: argparse.Namespace) -> int:
    if args.data_command != "synth":
        raise SystemExit(f"unknown data command {args.data_command!r}")
    from kimia.data.manifest import format_summary
    from kimia.data.synth import SynthConfig, build_corpus
    from kimia.errors import ConfigError

    weights = {}
    for kv in args.task_weight:
        task, eq, w = kv.partition("=")
        try:
            weights[task] = float(w) if eq else float("nan")
        except ValueError:
            weights[task] = float("nan")
        if weights[task] != weights[task]:
            raise ConfigError(f"--task-weight wants TASK=WEIGHT, got {kv!r}")
    cfg = SynthConfig(out=args.out, hours=args.hours, seed=args.seed, jobs=args.jobs, engines=tuple(args.engines),
                      tasks=tuple(args.tasks), task_weights=weights or None, augment=not args.no_augment,
                      judge=not args.no_judge, eval_fraction=args.eval_fraction,
                      output_voice=args.output_voice, progress=not args.no_progress,
                      text_sources=tuple(args.text_sources), reuse_from=args.reuse_from)
    summary = build_corpus(cfg)
    print(format_summary(summary))
    print(f"summary written to {cfg.out / 'summary.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m kimia.data.cli synth ...`) until the main CLI wires `data` in."""
    parser = argparse.ArgumentParser(prog="kimia")
    sub = parser.add_subparsers(dest="command", required=True)
    add_data_parser(sub)
    args = parser.parse_args(["data", *(argv if argv is not None else __import__("sys").argv[1:])])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_data_cli(args)


if __name__ == "__main__":
    raise SystemExit(main())
