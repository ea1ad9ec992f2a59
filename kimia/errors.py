"""Typed errors raised by kimia.

Every user-facing failure (bad audio, bad checkpoint, bad prompt, bad config) is one of these, with a
message that names the offending input and the problem, so callers (CLI, server) can map them to clean
messages or HTTP 4xx answers instead of surfacing a traceback from deep inside a library.
"""

from __future__ import annotations


class KimiaError(Exception):
    """Base class of every error kimia raises on purpose."""


class AudioError(KimiaError, ValueError):
    """Audio that cannot be used: unreadable, unsupported, empty, too short/long, non-finite samples."""

    def __init__(self, source: str, problem: str):
        self.source = source
        self.problem = problem
        super().__init__(f"{source}: {problem}")


class CheckpointError(KimiaError, ValueError):
    """A checkpoint folder or file that does not match the model it is loaded into."""


class ConfigError(KimiaError, ValueError):
    """An invalid or inconsistent configuration."""


class PromptError(KimiaError, ValueError):
    """Messages that cannot be turned into a prompt (unknown role/type, missing file, bad transcript)."""


class BudgetError(KimiaError, ValueError):
    """A request that exceeds a configured length budget (context, new tokens, audio duration)."""
