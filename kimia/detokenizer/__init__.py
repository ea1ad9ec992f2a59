"""The output side: flow-matching DiT, Euler solvers, streaming detokenizer and the BigVGAN vocoder."""

from kimia.detokenizer.bigvgan import BigVGAN, BigVGANConfig, load_vocoder, save_vocoder
from kimia.detokenizer.dit import DiT, DiTConfig
from kimia.detokenizer.loader import convert_official_detokenizer, load_detokenizer, load_dit, save_dit
from kimia.detokenizer.stream import StreamConfig, StreamingDetokenizer

__all__ = [
    "BigVGAN",
    "BigVGANConfig",
    "DiT",
    "DiTConfig",
    "StreamConfig",
    "StreamingDetokenizer",
    "convert_official_detokenizer",
    "load_detokenizer",
    "load_dit",
    "load_vocoder",
    "save_dit",
    "save_vocoder",
]
