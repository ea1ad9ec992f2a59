"""Evaluation toolkit (`kimia eval`): manifests in the official kit's layout, normalizers and metrics,
recipes, a resumable sharded runner, reports and plots, real-speech set builders and an optional LLM judge.

Submodules import their optional dependencies (whisper-normalizer, editdistance/jiwer, cn2an, matplotlib,
PyAV) lazily, so `import kimia.eval` is cheap.
"""

from kimia.eval.datasets import BadRow, EvalItem, Manifest, load_manifest, resolve_data
from kimia.eval.recipes import Recipe, load_recipe
from kimia.eval.runner import KimiAudioPredictor, Predictor, run_dataset

__all__ = ["BadRow", "EvalItem", "Manifest", "load_manifest", "resolve_data", "Recipe", "load_recipe",
           "Predictor", "KimiAudioPredictor", "run_dataset"]
