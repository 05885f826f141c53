"""Errors that kedit reports to users.

`BadInputError` is anything the user can fix (a malformed record, an unknown model, a
wrong architecture, a corrupt file): the CLI prints its one-line message and exits with
status 2. Every other exception is an internal error (status 1).
"""

from __future__ import annotations


class KeditError(Exception):
    """Base class of kedit's own errors."""


class BadInputError(KeditError, ValueError):
    """Input the user can fix. `str(err)` is one line naming file, record and field."""

    def __init__(self, message: str, *, file: str | None = None, record: int | None = None,
                 field: str | None = None):
        self.file, self.record, self.field, self.reason = file, record, field, message
        where = []
        if file is not None:
            where.append(str(file))
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f"field '{field}'")
        text = f"{': '.join([', '.join(where), message]) if where else message}"
        super().__init__(" ".join(text.split()))  # always one line


class ModelNotAvailableError(BadInputError):
    """A model spec that names nothing loadable, or a bundled model whose package is missing."""


class UnsupportedArchitectureError(BadInputError):
    """A model whose `config.architectures[0]` has no adapter."""
