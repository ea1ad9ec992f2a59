"""Checkpoint readers: the official release layout and kimia's native format."""

from kimia.checkpoints.common import build_frozen, load_safetensors, load_state_dict_strict

__all__ = ["build_frozen", "load_safetensors", "load_state_dict_strict"]
