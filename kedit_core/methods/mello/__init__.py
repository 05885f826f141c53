from kedit_core.methods.mello.method import MeLLo, MeLLoConfig, MeLLoView

__all__ = ["MeLLo", "MeLLoConfig", "MeLLoView"]
