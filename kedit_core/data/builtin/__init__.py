"""kedit's own built-in edit set: counterfactual edits about facts the default model
(SmolLM2-135M) knows, in CounterFact (ROME) format, shipped as package data. It is what the
quickstart and the core tests use; `make.py` beside this file regenerates and re-checks it."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

BUILTIN_FILE = "counterfacts.jsonl"


def builtin_path() -> Path:
    return Path(str(files(__name__).joinpath(BUILTIN_FILE)))


def load_builtin():
    from kedit_core.data.readers import read_dataset

    return read_dataset(builtin_path())
