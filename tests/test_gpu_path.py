"""The GPU path's parts that a CPU can check (issue 13 point 4): `random:<config>` models of
real shapes, the float64 linear algebra on a chosen device, statistics accumulated where the
model runs, and benchmarks/bench_gpu.py end to end on a tiny config."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.conftest import ROOT

TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_hidden_layers": 10, "vocab_size": 300, "max_position_embeddings": 256,
              "bos_token_id": 256, "eos_token_id": 256, "tie_word_embeddings": False}


def _meta_model(name: str):
    """The shipped config's model on the meta device (shapes only: nothing allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kedit_core.models.random_init import parse

    path, _ = parse(f"random:{name}")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**json.loads(path.read_text())))


@pytest.mark.parametrize("name,params_b,key", [("llama3-8b", 8.03, ("llama", 32, 4096)),
                                                ("gptj-6b", 6.05, ("gptj", 28, 4096)),
                                                ("smollm2-135m", 0.135, ("llama", 30, 576))])
def test_shipped_configs_have_the_real_models_shapes_and_reference_defaults(name, params_b, key):
    from kedit_core.methods import get_method
    from kedit_core.models.arch import arch_for

    model = _meta_model(name)
    n = sum(p.numel() for p in model.parameters()) / 1e9
    assert n == pytest.approx(params_b, rel=0.01)
    arch = arch_for(model)
    d_mlp = {"llama3-8b": 14336, "gptj-6b": 16384, "smollm2-135m": 1536}[name]
    assert arch.dims(model, "blocks.0.mlp.out") == (key[2], d_mlp)
    # the per-architecture defaults of the reference hparams apply to these shapes
    for m in ("memit", "alphaedit", "rome"):
        assert key in get_method(m).config_cls.ARCH_DEFAULTS


def test_random_spec_builds_deterministic_weights_with_a_recipe_fingerprint(tmp_path):
    from kedit_core.models import load

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_LLAMA))
    a = load(f"random:{cfg}", device="cpu")
    b = load(f"random:{tmp_path}", device="cpu")           # a directory holding config.json
    assert a.arch.family == "llama" and a.n_layers == 10
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    assert a.fingerprint() == b.fingerprint()
    c = load(f"random:{cfg}", device="cpu", dtype="bf16")
    assert c.dtype == torch.bfloat16 and c.fingerprint() != a.fingerprint()
    # the global RNG is left as it was
    torch.manual_seed(123)
    x = torch.rand(3)
    torch.manual_seed(123)
    load(f"random:{cfg}", device="cpu")
    assert torch.equal(torch.rand(3), x)


def test_random_spec_errors_name_the_file(tmp_path):
    from kedit_core.errors import KeditError
    from kedit_core.models import load

    with pytest.raises(KeditError) as e:
        load("random:no-such-config", device="cpu")
    assert "no-such-config" in str(e.value) and "llama3-8b" in str(e.value)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(KeditError) as e:
        load(f"random:{bad}", device="cpu")
    assert str(bad) in str(e.value)
    small = tmp_path / "small.json"
    small.write_text(json.dumps({**TINY_LLAMA, "vocab_size": 100}))     # fewer ids than the byte tokenizer
    with pytest.raises(KeditError) as e:
        load(f"random:{small}", device="cpu")
    assert "vocab_size" in str(e.value)
    with pytest.raises(KeditError) as e:
        load(f"random:{small}@{tmp_path / 'none'}", device="cpu")
    assert "tokenizer" in str(e.value)


def test_solves_on_a_named_device_equal_the_default(monkeypatch):
    from kedit_core.linalg import linalg_device, nullspace_projector, solve, solve_spd
    from kedit_core.methods.alphaedit.method import alphaedit_solve
    from kedit_core.methods.memit.method import memit_solve

    g = torch.Generator().manual_seed(0)
    d, n, h = 24, 6, 8
    X = torch.randn(200, d, generator=g, dtype=torch.float64)
    C = X.T @ X / 200
    K = torch.randn(d, n, generator=g, dtype=torch.float64)
    R = torch.randn(h, n, generator=g, dtype=torch.float64)
    cpu = torch.device("cpu")
    assert torch.equal(solve_spd(C, K, device=cpu), solve_spd(C, K))
    assert torch.equal(solve(C + K @ K.T, K, device=cpu), solve(C + K @ K.T, K))
    P, r = nullspace_projector(C, 0.5, device=cpu)
    assert torch.equal(P, nullspace_projector(C, 0.5)[0]) and 0 < r < d
    delta = memit_solve(C, 3.0, K @ K.T, K @ R.T, device=cpu)
    assert torch.equal(delta, memit_solve(C, 3.0, K @ K.T, K @ R.T))
    # still MEMIT's normal equation: delta (lam C + K K^T) = R K^T
    assert torch.allclose(delta @ (3.0 * C + K @ K.T), R @ K.T, atol=1e-9)
    ad = alphaedit_solve(P, K @ K.T, K @ R.T, 1.0, device=cpu)
    assert torch.equal(ad, alphaedit_solve(P, K @ K.T, K @ R.T, 1.0))
    assert torch.allclose(ad @ P, ad, atol=1e-9)          # rows in the range of P

    class FakeLM:
        device = torch.device("cpu")
    assert linalg_device(FakeLM()) == cpu
    FakeLM.device = torch.device("cuda", 0)               # a GPU model: its GPU, unless told not to
    assert linalg_device(FakeLM()) == torch.device("cuda", 0)
    monkeypatch.setenv("KEDIT_LINALG_DEVICE", "cpu")
    assert linalg_device(FakeLM()) == cpu


def test_gram_of_half_precision_keys_is_their_exact_float32_product():
    from kedit_core.stats.moments import SecondMoment, gram

    g = torch.Generator().manual_seed(0)
    k = torch.randn(50, 16, generator=g).to(torch.bfloat16)
    ref = k.double().T @ k.double()                       # exact: bf16 products fit float64
    assert torch.allclose(gram(k).double(), ref, rtol=1e-6, atol=1e-5)
    assert gram(k).dtype == torch.float32
    m = SecondMoment.zeros(16)
    m.update(k)
    m.update(k)
    assert m.count == 100 and m.sum.dtype == torch.float64 and torch.allclose(m.sum, 2 * ref, rtol=1e-6, atol=1e-5)


def test_second_moments_come_back_on_the_cpu_and_equal_a_direct_sum(tmp_path):
    from kedit_core.batching import pad_id
    from kedit_core.hooks import trace
    from kedit_core.models import load
    from kedit_core.stats.moments import collect_second_moments

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_LLAMA))
    lm = load(f"random:{cfg}", device="cpu")
    site = lm.arch.mlp_out_site(2)
    toks = [[5, 6, 7, 8, 9], [10, 11, 12]]
    mom = collect_second_moments(lm, [site], toks)[site]
    assert mom.sum.device.type == "cpu" and mom.count == 8
    keys = []
    with trace({"s": lm.arch.module(lm.model, site)}, inputs=True, outputs=False,
               on_input=lambda s, x: keys.append(x.reshape(-1, x.shape[-1]))):
        for t in toks:
            lm.model(input_ids=torch.tensor([t]))
    K = torch.cat(keys).double()
    assert pad_id(lm.tokenizer) is not None
    assert torch.allclose(mom.sum, K.T @ K, rtol=1e-5, atol=1e-6)


def test_bench_gpu_runs_end_to_end_on_a_tiny_config(tmp_path):
    import os
    import subprocess

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_LLAMA))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--model", f"random:{cfg}", "--dtype", "fp32",
                        "--device", "cpu", "--smoke", "--out", str(out), "--tag", "t"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})    # tiny ops: threads only contend
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(next(out.glob("gpu_*_t.json")).read_text())
    stages = [row["stage"] for row in res["rows"]]
    assert stages == ["statistics", "memit batch 4", "alphaedit batch 4", "memit batch 8"]
    stats = res["rows"][0]
    assert stats["tokens"] == 8 * 16 and stats["tokens_per_s"] > 0 and stats["accum_precision"] == "fp32"
    assert 0 < stats["accum_fraction_of_peak"] and stats["accum_peak_tflops"] == res["matmul_peak_tflops"]["fp32"]
    for row in res["rows"][1:]:
        # the parts add up to the whole, and the target optimisation ran its 2 steps (1 Adam step)
        parts = row["targets_s_per_edit"] + row["keys_s_per_edit"] + row["solve_s_per_edit"]
        assert parts == pytest.approx(row["s_per_edit"]) and row["targets_s_per_edit"] > 0
        assert row["z_steps_mean"] == 1 and row["layers"] == [4, 5, 6, 7, 8]
    big = res["rows"][-1]
    assert big["chunks"] == 2 and big["full_size"] == 8 and big["predicted_full_s"] == pytest.approx(big["seconds"])
    md = next(out.glob("gpu_*_t.md")).read_text()
    assert "| memit batch 8 |" in md and "matmul peak measured here" in md
