"""Model access: `load(spec)` and the architecture adapters."""

from kedit_core.models.arch import ArchSpec, arch_for, register_arch, supported_architectures
from kedit_core.models.loader import (BUILTIN_MODELS, DEFAULT_MODEL, TINY_ALIASES, LoadedModel,
                                      builtin_cache_path, cache_dir, is_cached, load)

__all__ = ["ArchSpec", "BUILTIN_MODELS", "DEFAULT_MODEL", "LoadedModel", "TINY_ALIASES",
           "arch_for", "builtin_cache_path", "cache_dir", "is_cached", "load", "register_arch",
           "supported_architectures"]
