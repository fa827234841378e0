"""Errors sinkguard raises on bad input.

Every user-facing failure is a :class:`SinkguardError`; the CLI prints its message (no
traceback) and exits with status 2. Each subclass names one kind of problem.
"""

from __future__ import annotations


class SinkguardError(Exception):
    """Base class: a problem the user can fix, with a message that says how."""


class ModelLoadError(SinkguardError):
    """A model path is missing, corrupt, or of an unsupported architecture."""


class InputError(SinkguardError):
    """Prompts or other inputs are unusable (empty, too long, not UTF-8, malformed JSONL)."""


class ConfigError(SinkguardError):
    """A configuration value is invalid; the message names the field."""


class ProfileError(SinkguardError):
    """A sink profile is unreadable, of an unsupported version, or belongs to another model."""


class ServerError(SinkguardError):
    """A server sinkguard started exited or never became ready."""
