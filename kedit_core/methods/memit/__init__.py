from kedit_core.methods.memit.method import MEMIT, MemitConfig

__all__ = ["MEMIT", "MemitConfig"]
