"""`kimia_infer.api.kimia.KimiAudio`: the official import path, served by kimia's implementation.

Code written for the official package runs unchanged::

    from kimia_infer.api.kimia import KimiAudio
    model = KimiAudio(model_path="path/to/Kimi-Audio-7B-Instruct", load_detokenizer=True)
    wav, text = model.generate(messages, **sampling_params, output_type="text")

Differences kept small and explicit: `model_path` must be a local folder (no hub download), and the GLM-4-Voice
tokenizer, which the official code downloads from the hub, is found as a `glm-4-voice-tokenizer` folder inside
or beside the model folder or given as `semantic_tokenizer_path=`. Everything kimia adds (device, dtype,
seed, generate_stream, generate_batch) is available as well.
"""

from kimia.api import KimiAudio

__all__ = ["KimiAudio"]
