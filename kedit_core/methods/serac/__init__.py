from kedit_core.methods.serac.method import SERAC, SERACConfig  # noqa: F401
