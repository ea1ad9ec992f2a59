"""kimia: a from-scratch PyTorch implementation of Kimi-Audio and its toolkit.

Public API (imported lazily, so `import kimia` and the CLI start fast)::

    from kimia import KimiAudio, load_model
    model = KimiAudio("path/to/model")          # official release folder or kimia's native layout
    wav, text = model.generate(messages, output_type="both")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "KimiAudio": "kimia.api",
    "Budgets": "kimia.api",
    "load_model": "kimia.api",
    "available_models": "kimia.api",
    "load_model_folder": "kimia.model_folder",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from kimia.api import Budgets, KimiAudio, available_models, load_model
    from kimia.model_folder import load_model_folder


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kimia' has no attribute {name!r}")
