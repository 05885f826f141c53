from kedit_core.methods.alphaedit.method import AlphaEdit, AlphaEditConfig

__all__ = ["AlphaEdit", "AlphaEditConfig"]
