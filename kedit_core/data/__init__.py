"""Edit data: readers for every benchmark format, validation, and the built-in edit set."""

from kedit_core.data.readers import FORMATS, detect_format, read_dataset, read_records
from kedit_core.data.builtin import builtin_path, load_builtin


def load_requests(path=None, *, limit: int | None = None, skip_invalid: bool = False, strict: bool = False,
                  zsre_convention: str = "mend"):
    """Requests from a benchmark file (any supported format), or the built-in set. `strict`
    refuses duplicate case ids (by default they are a logged warning); `zsre_convention`:
    "mend" (alt is the new target; default) or "memit" (answers[0])."""
    if limit is not None and limit < 0:
        from kedit_core.errors import BadInputError

        raise BadInputError(f"must be 0 or more, got {limit}", field="limit")
    ds = (load_builtin() if path in (None, "builtin")
          else read_dataset(path, skip_invalid=skip_invalid, strict=strict, zsre_convention=zsre_convention))
    reqs = ds.requests
    return reqs[:limit] if limit is not None else reqs


__all__ = ["FORMATS", "builtin_path", "detect_format", "load_builtin", "load_requests",
           "read_dataset", "read_records"]
