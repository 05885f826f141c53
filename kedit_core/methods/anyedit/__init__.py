from kedit_core.methods.anyedit.method import AnyEdit, AnyEditConfig

__all__ = ["AnyEdit", "AnyEditConfig"]
