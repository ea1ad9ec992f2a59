"""`kimia eval`: run, re-score, compare, build the real-speech sets, list recipes and datasets.

    kimia eval --model PATH --data MANIFEST|DATASET|GROUP [--recipe R] [--batch N] [--work-dir DIR]
    kimia eval --compare RUN_DIR_OR_METRICS [...] [--out table.md]   (side by side; runs of one dataset are
        also paired item by item with the first: how many items better / worse, and a sign test; two --chain
        output folders: each link side by side and answer by answer)
    kimia eval --build asterisk|pocketsphinx --out DIR
    kimia eval --chain MANIFEST [...] [--model PATH] [--limit N] [--out DIR]   (kimia.eval.chain: where the
        model's spoken answers lose their words, link by link, on a corpus' reference answers)
    kimia eval --list

`add_eval_parser(subparsers)` registers the sub-command on the main `kimia` parser and `run_eval_cli(args)`
runs it (returns the exit code). Under `torchrun --nproc-per-node N -m kimia.cli eval ...` every process
takes its `RANK`'s share of the items; the last one to finish merges and scores.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from kimia.errors import ConfigError, KimiaError

logger = logging.getLogger(__name__)

__all__ = ["add_eval_parser", "run_eval_cli", "main"]


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--data", help="manifest .jsonl, dataset name or group (see --list)")
    mode.add_argument("--compare", nargs="+", metavar="RUN", help="run folders or metrics.json files to compare")
    mode.add_argument("--build", choices=["asterisk", "pocketsphinx"], help="build a real-speech manifest")
    mode.add_argument("--list", action="store_true", help="list recipes, datasets and groups")
    mode.add_argument("--chain", nargs="+", metavar="MANIFEST",
                      help="measure the speech chain (vocoder, DiT, LLM audio head) on the reference answers of "
                           "corpus manifests (spoken_qa / dialogue / speak)")
    p.add_argument("--model", help="model folder (KimiAudio; default: the shipped kimia-small) or the name handed to "
                                   "--predictor")
    p.add_argument("--model-name", help="name used in the work dir and reports (default: model folder name)")
    p.add_argument("--predictor", help="custom predictor factory 'module:callable', called with the model path")
    p.add_argument("--recipe", help="built-in recipe name or YAML path (default: the dataset's task recipe)")
    p.add_argument("--batch", type=int, default=1, help="items per predict_batch call")
    p.add_argument("--work-dir", default="eval_result", help="results go to WORK_DIR/MODEL/DATASET/")
    p.add_argument("--data-root", help="folder of named datasets (default $KIMIA_EVAL_DATA or ./eval_data)")
    p.add_argument("--limit", type=int, help="evaluate only the first N valid items of each dataset")
    p.add_argument("--min-seconds", type=float, default=0.1, help="skip shorter audio (counted)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="skip longer audio (counted)")
    p.add_argument("--device", help="torch device for the model (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--dtype", help="model dtype (e.g. bfloat16)")
    p.add_argument("--quantize", default="auto", choices=["auto", "none", "int8"],
                   help="LLM weight quantization (auto: what the model folder recommends for the device)")
    p.add_argument("--max-new-tokens", type=int, help="override the recipe's max_new_tokens")
    p.add_argument("--force-reinfer", action="store_true", help="drop stored predictions and predict again")
    p.add_argument("--skip-eval", action="store_true", help="predict only, do not score")
    p.add_argument("--reeval", action="store_true", help="score stored predictions again without inference")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--judge", action="store_true", help="score open answers with an LLM judge (off by default)")
    p.add_argument("--judge-url", help="OpenAI-compatible base URL (or $KIMIA_JUDGE_URL / $OPENAI_BASE_URL)")
    p.add_argument("--judge-model", help="judge model name (or $KIMIA_JUDGE_MODEL; default gpt-4o-mini)")
    p.add_argument("--out", help="--build: output folder; --compare: Markdown file (a .png is written beside it); "
                                 "--chain: folder for chain.json and transcripts.jsonl")
    p.add_argument("--min-words", type=int, default=0, help="--build asterisk: only prompts of at least N words")
    return p


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register `eval` on the `kimia` command's sub-parsers; the handler is stored as `func`."""
    p = subparsers.add_parser("eval", help="evaluate a model on manifests in the official kit's layout",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(p)
    p.set_defaults(func=run_eval_cli)
    return p


def _load_predictor(args):
    if args.predictor:
        mod, _, attr = args.predictor.partition(":")
        if not attr:
            raise ConfigError(f"--predictor must look like 'module:callable', got '{args.predictor}'")
        try:
            factory = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"cannot import predictor {args.predictor}: {exc}") from exc
        return factory(args.model)
    from kimia.eval.runner import KimiAudioPredictor  # no --model: the shipped default model
    device = args.device
    if device is None:
        import torch
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    return KimiAudioPredictor(args.model, device=device, dtype=args.dtype, quantize=args.quantize)


def _recipe_for(args, dataset: str):
    from kimia.eval.datasets import DATASETS
    from kimia.eval.recipes import load_recipe, recipe_for_task
    if args.recipe:
        recipe = load_recipe(args.recipe)
    elif dataset in DATASETS:
        recipe = recipe_for_task(DATASETS[dataset][0])
    else:
        logger.info("dataset %s is not in the registry: using the asr recipe (pass --recipe to change)", dataset)
        recipe = load_recipe("asr")
    return recipe.with_overrides(max_new_tokens=args.max_new_tokens)


def _run(args) -> int:
    from kimia.eval.datasets import load_manifest, resolve_data
    from kimia.eval.report import score_run
    from kimia.eval.runner import dist_env, merge_shards, run_dataset

    datasets = resolve_data(args.data, args.data_root)
    model_name = args.model_name or (Path(args.model).name if args.model else None) or "kimia-small"
    predictor = None if args.reeval else _load_predictor(args)
    judge = None
    if args.judge:
        from kimia.eval.judge import Judge
        judge = Judge(args.judge_url, model=args.judge_model, cache=Path(args.work_dir) / "judge_cache.jsonl")
    rank, world = dist_env()
    for name, path in datasets:
        recipe = _recipe_for(args, name)
        manifest = load_manifest(path, name=name, min_seconds=args.min_seconds, max_seconds=args.max_seconds)
        run_dir = Path(args.work_dir) / model_name / name
        if args.reeval:
            merge_shards(manifest, run_dir, limit=args.limit)
            merged = rank == 0
        else:
            res = run_dataset(manifest, predictor, recipe, run_dir, batch_size=args.batch, limit=args.limit,
                              progress=not args.no_progress, force=args.force_reinfer)
            merged = res.merged
            print(f"{name}: predicted {res.predicted}, reused {res.reused}, failed {len(res.failed)} "
                  f"in {res.seconds:.1f} s -> {run_dir}")
        if merged and not args.skip_eval:
            result = score_run(run_dir, dataset=name, model=model_name, recipe=recipe, judge=judge,
                               plots=not args.no_plots)
            overall = result["performance"].get("overall", {})
            print(f"{name}: {recipe.metric} {overall}  (bad {result['counts']['bad']}, "
                  f"skipped {result['counts']['skipped']}) -> {run_dir / 'report.md'}")
    return 0


def _chain(args) -> int:
    from kimia.api import KimiAudio
    from kimia.eval.chain import chain_rows, format_chain, measure_chain, write_chain

    rows = chain_rows(args.chain, limit=args.limit or 0)  # bad manifests fail before the model loads
    model = KimiAudio(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    transcripts: list[dict] = []
    result = measure_chain(model, rows, transcripts=transcripts)
    print(format_chain(result, args.model_name or args.model or "kimia-small"))
    if args.out:
        print(f"-> {write_chain(result, transcripts, args.out)}")
    return 0


def run_eval_cli(args: argparse.Namespace) -> int:
    """Run `kimia eval` with parsed arguments; kimia errors become a message and exit code 2."""
    try:
        if args.list:
            from kimia.eval.datasets import DATASETS, GROUPS
            from kimia.eval.recipes import TASKS, builtin_recipes
            print("recipes:", ", ".join(builtin_recipes()))
            print("tasks:", ", ".join(f"{t}->{r}" for t, r in sorted(TASKS.items())))
            print("datasets:", ", ".join(f"{d} ({t})" for d, (t, _) in sorted(DATASETS.items())))
            print("groups:", ", ".join(f"{g}: {' '.join(m)}" for g, m in sorted(GROUPS.items())))
            return 0
        if args.build:
            from kimia.eval.builders import BUILDERS
            if not args.out:
                raise ConfigError("--build needs --out DIR")
            kw = {"min_words": args.min_words, "name": f"asterisk-en-{args.min_words}w"} \
                if args.build == "asterisk" and args.min_words else {}
            print(BUILDERS[args.build](args.out, **kw))
            return 0
        if args.chain:
            return _chain(args)
        if args.compare:
            if any((Path(r) / "chain.json").is_file() for r in args.compare):  # two `--chain` runs
                from kimia.eval.chain import compare_chains

                if len(args.compare) != 2:
                    raise ConfigError(f"--compare of speech chain runs takes two folders (baseline, new), got "
                                      f"{len(args.compare)}")
                md = compare_chains(*args.compare)
                if args.out:
                    Path(args.out).write_text(md, encoding="utf-8")
                print(md, end="")
                return 0
            from kimia.eval.report import compare_runs
            png = Path(args.out).with_suffix(".png") if args.out else None
            print(compare_runs(args.compare, args.out, png), end="")
            return 0
        return _run(args)
    except KimiaError as exc:
        print(f"kimia eval: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m kimia.eval.cli ...`) until the main CLI wires `add_eval_parser`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = _configure(argparse.ArgumentParser(prog="kimia eval", description=__doc__,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    return run_eval_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
