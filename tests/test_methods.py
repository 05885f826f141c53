"""The mathematics of ROME, MEMIT and AlphaEdit on tiny random models, target optimisation,
and exact apply / revert."""

import json

import pytest
import torch

from kedit_core.apply import DeltaApplier, load_deltas, save_deltas, temporarily_applied
from kedit_core.data import load_builtin
from kedit_core.errors import BadInputError
from kedit_core.hooks import trace
from kedit_core.methods import available_methods, get_method, make_config
from kedit_core.methods.memit import MEMIT
from kedit_core.models import load
from kedit_core.stats import StatsView, collect_second_moments, tokenize_corpus
from kedit_core.types import WeightDelta
from kedit_core.zopt import ZOptConfig, context_templates, hidden_at_subject, optimize_targets

CORPUS = ["Paris is the capital of France and a centre of art.",
          "The Colosseum is an ancient amphitheatre in the centre of Rome.",
          "Tokyo is the capital of Japan.", "Edits change facts in models."]


@pytest.fixture(scope="module")
def lm():
    return load("tiny-random-llama", device="cpu")


@pytest.fixture(scope="module")
def reqs():
    return load_builtin().requests[:3]


def stats_for(lm, layers, texts):
    sites = [lm.arch.mlp_out_site(l) for l in layers]
    toks = tokenize_corpus(lm, texts, max_length=64)
    return StatsView(collect_second_moments(lm, sites, toks)), toks


def test_registry_and_config_errors(lm):
    assert {"rome", "memit", "alphaedit"} <= set(available_methods())
    with pytest.raises(BadInputError, match="unknown method 'nope'.*alphaedit"):
        get_method("nope")
    m = get_method("MEMIT")
    with pytest.raises(BadInputError, match="field 'bogus'"):
        make_config(m.config_cls, lm, {"bogus": 1})
    with pytest.raises(BadInputError, match="out of range"):
        make_config(m.config_cls, lm, {"layers": (1, 9)})
    with pytest.raises(BadInputError, match="field 'v_lr'"):
        make_config(m.config_cls, lm, {"v_lr": "fast"})
    cfg = make_config(m.config_cls, lm, {"layers": "1,2", "v_lr": "0.1"})
    assert cfg.layers == (1, 2) and cfg.v_lr == 0.1


def test_paper_defaults_per_architecture():
    from kedit_core.methods.alphaedit import AlphaEditConfig
    from kedit_core.methods.memit import MemitConfig

    llama3 = AlphaEditConfig.ARCH_DEFAULTS[("llama", 32, 4096)]
    assert llama3["layers"] == (4, 5, 6, 7, 8) and llama3["L2"] == 10.0 and llama3["nullspace_threshold"] == 2e-2
    assert MemitConfig.ARCH_DEFAULTS[("gptj", 28, 4096)]["mom2_update_weight"] == 15_000.0


def test_batched_and_per_request_target_optimisation_agree(reqs):
    """In float64 (so that padding-dependent float32 rounding, which Adam's normalisation
    amplifies, does not hide the comparison) each request follows the same trajectory."""
    lm = load("tiny-random-llama", device="cpu")
    lm.model.double()
    tm = context_templates(lm)
    cfg = ZOptConfig(layer=2, steps=8, lr=0.5)
    batched = optimize_targets(lm, reqs, cfg, tm)
    for i, r in enumerate(reqs):
        single = optimize_targets(lm, [r], cfg, tm)
        assert single.steps[0] == batched.steps[i]
        move = (single.targets[0] - single.init[0]).norm()
        assert move > 0
        assert float((single.targets[0] - batched.targets[i]).norm() / move) < 1e-9
        torch.testing.assert_close(single.init[0], batched.init[i], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gpt2", "tiny-random-gptneox"])
@pytest.mark.parametrize("where", ["block", "mlp.out"])
def test_cached_suffix_replay_equals_full_passes(name, where, reqs):
    """In float64: the replay reorders float32 sums, which Adam's normalisation amplifies to
    ~1e-4 relative on some prompts; in float64 the two must agree to rounding."""
    lm = load(name, device="cpu")
    lm.model.double()
    tm = context_templates(lm)
    cfg = ZOptConfig(layer=1, where=where, steps=6)
    fast = optimize_targets(lm, reqs, cfg, tm, mode="suffix")
    full = optimize_targets(lm, reqs, cfg, tm, mode="full")
    assert fast.steps == full.steps
    rel = (fast.targets - full.targets).norm(dim=1) / (full.targets - full.init).norm(dim=1)
    assert float(rel.max()) < 1e-9


def test_early_stopped_request_is_frozen(lm, reqs):
    tm = context_templates(lm)
    easy = ZOptConfig(layer=2, steps=10, early_stop_loss=1e9)  # everything stops at step 0
    z = optimize_targets(lm, reqs, easy, tm)
    assert z.steps == [0, 0, 0]
    assert torch.equal(z.targets, z.init)


def test_memit_update_satisfies_its_normal_equations(lm, reqs):
    m = get_method("memit")
    cfg = make_config(m.config_cls, lm, {"layers": (1, 2), "v_num_grad_steps": 6,
                                         "mom2_update_weight": 50.0})
    stats, _ = stats_for(lm, cfg.layers, CORPUS * 10)
    state = m.prepare(lm, cfg, stats)
    tm = context_templates(lm)
    site = lm.arch.mlp_out_site(1)
    keys, _ = hidden_at_subject(lm, reqs, tm, inputs_of=[site])
    _, cur = hidden_at_subject(lm, reqs, ["{}"], outputs_of=["blocks.2"])
    before = {n: p.clone() for n, p in lm.model.state_dict().items()}
    result, _ = m.compute(lm, reqs, state)
    for n, p in lm.model.state_dict().items():  # compute() leaves the model unchanged
        assert torch.equal(p, before[n]), n
    K = keys[site].T.double()
    R = (result.info["targets"].double() - cur["blocks.2"].double()).T / 2  # first of 2 layers
    delta = result.deltas[0].matrix()
    res = MEMIT.normal_equation_residual(stats[site].mean(), K, R, delta, cfg.mom2_update_weight)
    assert res < 1e-5
    # and a wrong lambda does not satisfy them
    assert MEMIT.normal_equation_residual(stats[site].mean(), K, R, delta, 5 * cfg.mom2_update_weight) > 1e-3


def _preserved_ratio(lm, deltas, toks):
    """max over edited layers of ||dW K0|| / ||W K0|| on the statistics corpus's keys K0."""
    worst = 0.0
    for d in deltas:
        mod = lm.arch.module(lm.model, d.site)
        K0 = torch.cat([_keys(lm, mod, ids) for ids in toks], dim=1)
        W = lm.arch.as_out_in(mod.weight.detach()).double()
        worst = max(worst, float((d.matrix().double() @ K0).norm() / (W @ K0).norm()))
    return worst


def test_alphaedit_update_leaves_preserved_keys_unchanged(lm, reqs):
    m = get_method("alphaedit")
    cfg = make_config(m.config_cls, lm, {"layers": (1, 2), "v_num_grad_steps": 6,
                                         "nullspace_threshold": 1e-6})
    stats, toks = stats_for(lm, cfg.layers, CORPUS[:2])  # < 128 tokens: an exact null space
    state = m.prepare(lm, cfg, stats)
    result, state2 = m.compute(lm, reqs, state)
    assert all(float(d.matrix().norm()) > 0 for d in result.deltas)
    assert _preserved_ratio(lm, result.deltas, toks) < 1e-4
    # Without the projection (threshold above every eigenvalue: P = I) the same solve moves
    # the preserved keys' outputs by orders of magnitude more.
    free = make_config(m.config_cls, lm, {"layers": (1, 2), "v_num_grad_steps": 6,
                                          "nullspace_threshold": 1e9})
    unprojected, _ = m.compute(lm, reqs, m.prepare(lm, free, stats))
    assert _preserved_ratio(lm, unprojected.deltas, toks) > 100 * _preserved_ratio(lm, result.deltas, toks)
    # the sequential state accumulated K K^T of this batch and serialises
    for l in cfg.layers:
        kk = state2["KpKp"][l]
        assert float(kk.norm()) > 0 and torch.allclose(kk, kk.T)
        assert float(state["KpKp"][l].norm()) == 0  # the old state is not mutated
    from safetensors.torch import load_file, save_file

    import tempfile, os
    with tempfile.TemporaryDirectory() as d:  # the state goes through a safetensors file
        save_file(m.state_dict(state2)[0], os.path.join(d, "state.safetensors"))
        tensors = load_file(os.path.join(d, "state.safetensors"))
    again = m.load_state_dict(state, tensors, m.state_dict(state2)[1])
    assert all(torch.equal(again["KpKp"][l], state2["KpKp"][l]) for l in cfg.layers)


def _keys(lm, mod, ids):
    with trace({"m": mod}, inputs=True, outputs=False) as t:
        lm.model(input_ids=torch.tensor([ids]))
    return t.inputs["m"][0].T.double()


def test_rome_writes_the_target_value_exactly(lm, reqs):
    m = get_method("rome")
    cfg = make_config(m.config_cls, lm, {"layers": (2,), "v_num_grad_steps": 6})
    stats, _ = stats_for(lm, cfg.layers, CORPUS * 20)
    state = m.prepare(lm, cfg, stats)
    result, _ = m.compute(lm, reqs[:1], state)
    (delta,) = result.deltas
    assert delta.left.shape[1] == 1  # rank one per request
    site = lm.arch.mlp_out_site(2)
    with temporarily_applied(lm, result.deltas):
        _, out = hidden_at_subject(lm, reqs[:1], ["{}"], outputs_of=[site])
    torch.testing.assert_close(out[site][0], result.info["targets"][0], atol=1e-4, rtol=1e-4)


def test_apply_then_revert_restores_every_bit(lm, tmp_path):
    before = {n: p.clone() for n, p in lm.model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    deltas = [WeightDelta("blocks.1.mlp.out", dense=torch.randn(64, 128, generator=g) * 1e-3),
              WeightDelta("blocks.2.mlp.out", left=torch.randn(64, 2, generator=g) * 1e-2,
                          right=torch.randn(128, 2, generator=g) * 1e-2)]
    app = DeltaApplier(lm)
    app.apply(deltas)
    app.apply(deltas)  # applied twice: originals kept from before the first
    assert not torch.equal(lm.model.state_dict()["model.layers.1.mlp.down_proj.weight"],
                           before["model.layers.1.mlp.down_proj.weight"])
    cum = {d.site: d.dense for d in app.cumulative()}
    torch.testing.assert_close(cum["blocks.2.mlp.out"], 2 * deltas[1].matrix(), atol=1e-6, rtol=1e-5)
    app.revert()
    for n, p in lm.model.state_dict().items():
        assert torch.equal(p, before[n]), n
    save_deltas(tmp_path / "d", deltas, {"method": "test"})
    loaded, config = load_deltas(tmp_path / "d")
    assert config == {"method": "test"} and [d.site for d in loaded] == [d.site for d in deltas]
    assert all(torch.equal(a.matrix(), b.matrix()) for a, b in zip(loaded, deltas))
    (tmp_path / "d" / "deltas.safetensors").write_bytes(b"junk")
    with pytest.raises(BadInputError, match="does not match the sha256"):   # the pair is checked
        load_deltas(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    cfg.pop("deltas_sha256")
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))            # no checksum: parsed
    with pytest.raises(BadInputError, match="unreadable deltas"):
        load_deltas(tmp_path / "d")


def test_keys_weight_the_bare_prompt_half_as_the_reference(lm, reqs):
    """MEMIT's compute_ks averages per template type: bare "{}" 1/2, sampled prefixes 1/2."""
    tm = context_templates(lm)
    site = lm.arch.mlp_out_site(1)
    avg, _ = hidden_at_subject(lm, reqs[:1], tm, inputs_of=[site])
    each = [hidden_at_subject(lm, reqs[:1], [t] if t != "{}" else ["{}"], inputs_of=[site])[0][site][0]
            for t in tm]
    expected = 0.5 * each[0] + 0.5 * torch.stack(each[1:]).mean(0)
    torch.testing.assert_close(avg[site][0], expected, atol=1e-5, rtol=1e-5)
