"""Editing methods, one folder each, registered by name."""

from kedit_core.methods.base import (EditConfig, EditMethod, available_methods, get_method,
                                     make_config, register)
from kedit_core.methods import alphaedit, memit, rome  # noqa: F401  (registers them)

__all__ = ["EditConfig", "EditMethod", "available_methods", "get_method", "make_config", "register"]
