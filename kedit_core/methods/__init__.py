"""Editing methods, one folder each, registered by name."""

from kedit_core.methods.base import (EditConfig, EditMethod, MethodConfig, MethodInfo, Stateless,
                                     available_methods, describe_methods, get_method, make_config, register)
from kedit_core.methods import alphaedit, anyedit, ft, ike, ke, mello, memit, memprompt, mend, rome, serac  # noqa: F401,E501  (registers them)

__all__ = ["EditConfig", "EditMethod", "MethodConfig", "MethodInfo", "Stateless", "available_methods",
           "describe_methods", "get_method", "make_config", "register"]
