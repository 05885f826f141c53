from kedit_core.methods.mend.method import MEND, MENDConfig  # noqa: F401
