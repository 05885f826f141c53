"""kedit_core: the knowledge-editing library (models, data, statistics, methods,
evaluation). It imports no Ray and no MLflow; `pipelines` orchestrates it."""

__version__ = "0.1.0"

from kedit_core.data import load_requests  # noqa: E402
from kedit_core.editor import Editor  # noqa: E402
from kedit_core.errors import BadInputError, KeditError  # noqa: E402
from kedit_core.types import EditCase, EditDataset, EditRequest, LabeledPrompt  # noqa: E402

__all__ = ["BadInputError", "Editor", "EditCase", "EditDataset", "EditRequest", "KeditError",
           "LabeledPrompt", "__version__", "load_requests"]
