"""Synthetic corpus tools: `kimia data synth` (engines, texts, sounds, judge, manifests).

Submodules import their heavy dependencies (onnxruntime, faster-whisper) lazily, so importing the package
is cheap.
"""
