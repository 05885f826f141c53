"""One small adapter file per architecture family; importing this package registers them."""

from kedit_core.models.arch.base import (ArchSpec, arch_for, register_arch,
                                         supported_architectures)
from kedit_core.models.arch import gemma3, gpt2, gptj, gptneox, llama  # noqa: F401  (registers)

__all__ = ["ArchSpec", "arch_for", "register_arch", "supported_architectures"]
