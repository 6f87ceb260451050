"""Typed errors that carry the field, file or limit at fault.

The CLI turns every `DiffrayError` into one readable line and a non-zero exit; nothing here imports
heavy libraries so any layer can raise these.
"""

from __future__ import annotations


class DiffrayError(Exception):
    """Base class: a user-facing error whose message is shown as-is (no traceback)."""

    exit_code = 1


class ConfigError(DiffrayError):
    """A config file, key, type or value is wrong. `field` is the dotted path at fault."""

    exit_code = 2

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class DatasetError(DiffrayError):
    """A dataset cannot be read or has too many bad rows."""


class ModelError(DiffrayError):
    """A base model directory is missing, incomplete or of an unknown preset."""


class TrainingError(DiffrayError):
    """Training stopped for a reason the user must act on (non-finite loss, exhausted retries)."""


class AdapterError(DiffrayError):
    """An adapter artifact is missing, malformed or does not match the base model."""
