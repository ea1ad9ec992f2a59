"""Checkpoint readers: the official release layout and kimia's native format."""

from kimia.checkpoints.common import load_safetensors, load_state_dict_strict

__all__ = ["load_safetensors", "load_state_dict_strict"]
