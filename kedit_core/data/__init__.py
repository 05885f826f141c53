"""Edit data: readers for every benchmark format, validation, and the built-in edit set."""

from kedit_core.data.readers import FORMATS, detect_format, read_dataset, read_records
from kedit_core.data.builtin import builtin_path, load_builtin


def load_requests(path=None, *, limit: int | None = None, skip_invalid: bool = False,
                  zsre_convention: str = "mend"):
    """Requests from a benchmark file (any supported format), or the built-in set.
    `zsre_convention`: "mend" (alt is the new target; default) or "memit" (answers[0])."""
    ds = load_builtin() if path in (None, "builtin") else read_dataset(
        path, skip_invalid=skip_invalid, zsre_convention=zsre_convention)
    reqs = ds.requests
    return reqs[:limit] if limit is not None else reqs


__all__ = ["FORMATS", "builtin_path", "detect_format", "load_builtin", "load_requests",
           "read_dataset", "read_records"]
