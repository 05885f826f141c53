from kedit_core.methods.ft.method import FTConfig, FTL, FTM, FTMConfig, finetune_delta

__all__ = ["FTConfig", "FTL", "FTM", "FTMConfig", "finetune_delta"]
