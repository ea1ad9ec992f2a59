"""Audio encoders on the input side: the continuous Whisper encoder and the GLM-4-Voice semantic tokenizer."""

from kimia.encoders.whisper import (
    ContinuousFeatureExtractor,
    WhisperEncoder,
    WhisperEncoderConfig,
    load_continuous_extractor,
    load_whisper_encoder,
)

__all__ = [
    "ContinuousFeatureExtractor",
    "WhisperEncoder",
    "WhisperEncoderConfig",
    "load_continuous_extractor",
    "load_whisper_encoder",
]

from kimia.encoders.semantic import (  # noqa: E402
    SemanticEncoder,
    SemanticTokenizer,
    SemanticTokenizerConfig,
    load_semantic_tokenizer,
)

__all__ += ["SemanticEncoder", "SemanticTokenizer", "SemanticTokenizerConfig", "load_semantic_tokenizer"]
