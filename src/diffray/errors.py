"""Typed errors that carry the field, file or limit at fault.

The CLI turns every `DiffrayError` into one readable line and a non-zero exit; nothing here imports
heavy libraries so any layer can raise these.
"""

from __future__ import annotations

import re


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


class StorageError(DiffrayError):
    """A local path or URI cannot be opened, read or written."""


class ModelError(DiffrayError):
    """A base model directory is missing, incomplete or of an unknown preset."""


class TrainingError(DiffrayError):
    """Training stopped for a reason the user must act on (non-finite loss, exhausted retries)."""


class AdapterError(DiffrayError):
    """An adapter artifact is missing, malformed or does not match the base model."""


class AdapterNotFound(AdapterError):
    """No adapter with this id in the adapter registry. `adapter_id` is the id asked for."""

    def __init__(self, adapter_id: str, where: str = ""):
        self.adapter_id = adapter_id
        self.where = where
        super().__init__(f"unknown adapter {adapter_id!r}" + (f" (not in {where})" if where else ""))

    def __reduce__(self):  # keep the fields when Ray pickles the error across processes
        return (type(self), (self.adapter_id, self.where))


class RequestError(DiffrayError):
    """A serving request is invalid: the API answers `status` with a JSON error naming `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        self.param, self.status, self.kind = param, status, kind
        super().__init__(f"{param}: {message}" if param else message)
        self.message = message

    def __reduce__(self):  # keep the fields when Ray pickles the error across processes
        return (type(self), (self.message, self.param, self.status, self.kind))


def hidden_credentials(text: str) -> str:
    """`text` (a URL, or a message naming URLs) fit to print in an error: each URL's `user:password@` (basic auth
    through a proxy, a token as the user name) as `***@`."""
    text = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*:)//[^/?#]*@", r"\1//***@", text)  # a URL's own, spaces and all
    return re.sub(r"//[^/?#\s]*@", "//***@", text)
