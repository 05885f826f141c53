"""The DeepSpeed ZeRO-3 path (optional extra) at world size 1 on CPU: a partitioned model
gives the same statistics, keys, solves and weight writes as the plain model, bit for bit;
whole edits agree to float32 rounding (the backward passes of target optimisation sum in
another order); and a Ray stream whose driver and worker hold ZeRO-3 models matches the
plain stream."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

needs_deepspeed = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (pip install 'kedit[deepspeed]'; make test installs it)")


def test_shipped_deepspeed_config_is_the_default_and_bad_ones_are_refused(tmp_path, monkeypatch):
    import torch

    from kedit_core.errors import BadInputError, ModelNotAvailableError
    from kedit_core.models import load, zero3

    shipped = ROOT / "cluster_configs" / "deepspeed" / "zero3_offload_cpu.json"
    assert zero3.read_config(shipped) == zero3.default_config(torch.device("cuda"))
    assert "offload_param" not in zero3.default_config(torch.device("cpu"))["zero_optimization"]
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(BadInputError) as e:
        zero3.read_config(bad)
    assert str(bad) in str(e.value) and "zero_optimization.stage" in str(e.value)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(BadInputError, match="broken.json"):
        zero3.read_config(tmp_path / "broken.json")
    monkeypatch.setattr(zero3, "available", lambda: False)
    with pytest.raises(ModelNotAvailableError, match=r"kedit\[deepspeed\]"):
        load("tiny-random-llama", device="cpu", zero3=True)


def _env() -> dict:
    # The first process compiles DeepSpeed's CPU communication op (~60 s) into this cache.
    return dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu",
                TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                    str(Path.home() / ".cache" / "torch_extensions")))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    f = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    f.write_text("\n".join(["Paris is the capital of France.", "Rome is in Italy.",
                            "The Eiffel Tower is a tower.", "Tokyo is a large city in Japan."] * 8) + "\n")
    return f


@pytest.mark.slow
@needs_deepspeed
def test_zero3_edit_equals_plain_edit(tmp_path, corpus):
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "zero3_child.py"), str(tmp_path), str(corpus)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["partitioned"] and r["dims_equal"] and r["state_equal"]
    assert r["logits_max_diff"] == 0.0
    for method in ("memit", "alphaedit"):
        m = r[method]
        # Forward passes through gathered layers, and writes through
        # GatheredParameters(modifier_rank=0), are exact.
        assert m["stats_max_rel_diff"] == 0.0
        assert m["moments_bit_identical"] and m["applied_bit_identical"] and m["reverted_bit_identical"]
        assert m["sites"] == ["blocks.1.mlp.out", "blocks.2.mlp.out"]
        # Two sequential batches end to end: equal to float32 rounding (measured 2-3e-5).
        assert m["delta_max_rel_diff"] < 1e-3
        assert m["weights_max_rel_change_diff"] < 5e-3
        plain, zero3 = m["metrics"]["plain"], m["metrics"]["zero3"]
        for k in ("efficacy_score", "paraphrase_score", "neighborhood_score", "locality"):
            assert zero3[k] == plain[k], k
        assert m["reverted"]
    assert r["alphaedit"]["export_equal"]


def _stream(out: Path, corpus: Path, *extra: str) -> dict:
    args = ["edit", "--model", "tiny-random-llama", "--method", "alphaedit", "--data", "builtin",
            "--limit", "4", "--batch-size", "2", "--eval-every", "4", "--perplexity-texts", "4",
            "--stats-corpus", str(corpus), "--out", str(out), "--device", "cpu",
            "--set", "layers=1,2", "--set", "v_num_grad_steps=3", "--set", "mom2_n_samples=32", *extra]
    p = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
@needs_deepspeed
def test_ray_stream_with_zero3_driver_and_worker(tmp_path, corpus):
    from safetensors.torch import load_file

    plain = _stream(tmp_path / "plain", corpus, "--workers", "0")
    z = _stream(tmp_path / "zero3", corpus, "--workers", "1", "--zero3")
    assert z["config"]["zero3"] and z["n_edits"] == plain["n_edits"] == 4
    assert z["zero3"] and [r["zero3"] for r in z["replicas"]] == [True]
    assert z["replicas_in_step"]        # the ZeRO-3 worker's full state == the ZeRO-3 driver's
    assert z["model_hash"] == plain["model_hash"]
    for k in ("efficacy_score", "paraphrase_score", "neighborhood_score"):
        assert z["post"][f"all/{k}"] == plain["post"][f"all/{k}"], k
    wz = load_file(str(sorted((tmp_path / "zero3" / "checkpoints").iterdir())[-1] / "weights.safetensors"))
    wp = load_file(str(sorted((tmp_path / "plain" / "checkpoints").iterdir())[-1] / "weights.safetensors"))
    assert sorted(wz) == sorted(wp)
    for s in wp:
        assert float((wz[s] - wp[s]).abs().max()) < 1e-4 * float(wp[s].abs().max()), s
