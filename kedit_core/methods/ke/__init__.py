from kedit_core.methods.ke.method import KEConfig, KnowledgeEditor  # noqa: F401
