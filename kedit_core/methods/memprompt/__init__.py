from kedit_core.methods.memprompt.method import SEP, MemPrompt, MemPromptConfig

__all__ = ["MemPrompt", "MemPromptConfig", "SEP"]
