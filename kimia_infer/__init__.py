"""Drop-in shim for code written against the official `kimia_infer` package (Kimi-Audio's reference API).

`from kimia_infer.api.kimia import KimiAudio` gives kimia's `KimiAudio`, whose constructor and `generate()`
take the official arguments (model_path, load_detokenizer; output_type and the text_/audio_ sampling
parameters) and return the official `(wav, text)` pair.
"""
