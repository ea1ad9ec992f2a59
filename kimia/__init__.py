"""kimia: a from-scratch PyTorch implementation of Kimi-Audio and its toolkit."""

__version__ = "0.1.0"
