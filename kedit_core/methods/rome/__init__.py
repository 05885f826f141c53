from kedit_core.methods.rome.method import ROME, RomeConfig

__all__ = ["ROME", "RomeConfig"]
