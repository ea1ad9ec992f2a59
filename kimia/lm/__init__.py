"""The Kimi-Audio LLM: config, layers, static KV cache and the dual-head `AudioLM`."""

from kimia.lm.cache import KVCache, KVCacheLayer
from kimia.lm.config import AudioLMConfig
from kimia.lm.model import AudioLM, LMOutput, scatter_continuous

__all__ = ["AudioLM", "AudioLMConfig", "KVCache", "KVCacheLayer", "LMOutput", "scatter_continuous"]
