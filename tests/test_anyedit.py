"""AnyEdit (issue 12 point 1): windows and their key positions, the sequential window targets
with the earlier windows' deltas in place, the MEMIT_ARE / AlphaEdit_ARE solves against their
formulas, K_p = the other positions without pads, one tokenisation for every step."""

import pytest
import torch
import torch.nn.functional as F

from kedit_core.hooks import add_at_pairs, trace
from kedit_core.methods import get_method, make_config
from kedit_core.methods.anyedit.method import AnyEditConfig, longform_sequence, window_keys
from kedit_core.models import load
from kedit_core.stats import StatsView, collect_second_moments, tokenize_corpus
from kedit_core.types import EditRequest
from kedit_core.zopt import ZOptConfig, optimize_window_targets, windowed

CORPUS = ["Paris is the capital of France and a centre of art.",
          "The Colosseum is an ancient amphitheatre in the centre of Rome.",
          "Tokyo is the capital of Japan.", "Edits change facts in models."] * 10
ANSWER = "The festival is held every March in the town of Quenby where residents paint doors blue"


def req(q="What happens at the Zorblat festival?", a=ANSWER, cid="z"):
    return EditRequest(case_id=cid, subject=q, prompt="{}", target_new=a, long_target=a)


@pytest.fixture(scope="module")
def lm():
    return load("tiny-random-llama", device="cpu")


@pytest.fixture(scope="module")
def lm64():
    m = load("tiny-random-llama", device="cpu")
    m.model.double()
    return m


def test_windows_cover_the_answer_and_key_on_the_token_before():
    s = windowed([1, 2, 3], list(range(10, 20)), 4)
    assert s.ids == (1, 2, 3, *range(10, 20)) and s.n_prompt == 3
    assert s.starts == (3, 7, 11) and s.ends == (7, 11, 13)          # 4 + 4 + 2 answer tokens
    assert s.keys == (2, 6, 10)                                       # the last prompt token first
    whole = windowed([1, 2, 3], list(range(10, 20)), 0)
    assert whole.starts == (3,) and whole.ends == (13,) and whole.keys == (2,)
    with pytest.raises(ValueError):
        windowed([], [1], 4)


def test_one_tokenisation_feeds_every_step(lm):
    """The sequence is prompt ids + answer ids as tokenised once; the windows partition the
    answer; the key of window 0 is the prompt's last token (what generation reads last)."""
    tok = lm.tokenizer
    cfg = make_config(AnyEditConfig, lm, {"window_size": 5})
    s = longform_sequence(lm, req(), cfg)
    p_ids = tok(req().text, add_special_tokens=True)["input_ids"]
    a_ids = tok(" " + ANSWER, add_special_tokens=False)["input_ids"]
    assert list(s.ids) == p_ids + a_ids and s.n_prompt == len(p_ids)
    assert [t for a, b in zip(s.starts, s.ends) for t in s.ids[a:b]] == a_ids
    assert all(b - a == 5 for a, b in zip(s.starts[:-1], s.ends[:-1])) and 0 < s.ends[-1] - s.starts[-1] <= 5
    assert s.keys[0] == len(p_ids) - 1
    # the unedited hidden state the optimisation starts from (its own rows) is the state at the
    # same positions of the one pass the solve reads: the two steps see the same tokens
    z, counts = optimize_window_targets(lm, [s], ZOptConfig(layer=1, steps=1, kl_factor=0.0))
    _, _, cur = window_keys(lm, [s], 1, 1)
    assert counts == [len(s.starts)]
    torch.testing.assert_close(z.init.double(), cur, atol=1e-5, rtol=1e-5)


def _window_loss(lm, s, k, deltas, layer, wd):
    """NLL of window k (per token) from a full forward pass with `deltas[j]` at key j (j <= k),
    + wd * ||delta_k|| / ||h_k||^2: the reference's loss, computed independently."""
    ids = torch.tensor([list(s.ids[:s.ends[k] - 1])])
    block = lm.model.get_submodule(lm.arch.blocks)[layer]
    with torch.no_grad(), trace({"b": block}) as t:
        lm.model(input_ids=ids)
    h = t.outputs["b"][0, s.keys[k]]
    with torch.no_grad(), add_at_pairs(block, [0] * len(deltas), [s.keys[j] for j in range(len(deltas))],
                                       torch.stack(deltas)):
        logits = lm.model(input_ids=ids).logits[0]
    lp = torch.log_softmax(logits.double(), -1)
    pos = torch.arange(s.starts[k], s.ends[k])
    nll = -lp[pos - 1, torch.tensor(s.ids)[pos]].mean()
    return float(nll + wd * deltas[k].norm() / h.norm() ** 2)


@pytest.mark.parametrize("mode", ["suffix", "full"])
def test_earlier_windows_stay_in_place_while_a_later_one_is_optimised(lm64, mode):
    """Window 1's recorded loss is the loss of its delta WITH window 0's delta added at key 0
    (and not without it): the earlier delta is injected while the later one is optimised. In
    the suffix mode it acts through the KV-cached prefix."""
    s = windowed([5, 6, 7, 8], [20, 21, 22, 23, 24, 25, 26], 3)
    cfg = ZOptConfig(layer=1, steps=4, lr=0.5, kl_factor=0.0, weight_decay=1e-3, clamp_norm_factor=4.0,
                     early_stop_loss=-1.0)
    z, _ = optimize_window_targets(lm64, [s], cfg, mode=mode)
    d = [(z.targets[j] - z.init[j]) for j in range(3)]
    assert all(float(x.norm()) > 0 for x in d)
    with_earlier = _window_loss(lm64, s, 1, d[:2], 1, 1e-3)
    alone = _window_loss(lm64, s, 1, [torch.zeros_like(d[0]), d[1]], 1, 1e-3)
    assert z.losses[1] == pytest.approx(with_earlier, rel=1e-6)
    assert abs(with_earlier - alone) > 1e-4
    assert z.losses[2] == pytest.approx(_window_loss(lm64, s, 2, d, 1, 1e-3), rel=1e-6)


def test_windows_batched_over_requests_follow_their_own_trajectories(lm64):
    """Two sequences with different numbers of windows optimised together equal each alone
    (float64), and the cached-suffix path equals full passes."""
    a = windowed([5, 6, 7], [20, 21, 22, 23, 24, 25, 26], 3)       # 3 windows
    b = windowed([9, 10, 11, 12, 13], [30, 31, 32, 33], 3)           # 2 windows
    cfg = ZOptConfig(layer=2, steps=5, kl_factor=0.0, weight_decay=1e-3, clamp_norm_factor=4.0,
                     early_stop_loss=1e-2)
    both, counts = optimize_window_targets(lm64, [a, b], cfg)
    assert counts == [3, 2] and both.targets.shape[0] == 5
    za, _ = optimize_window_targets(lm64, [a], cfg)
    zb, _ = optimize_window_targets(lm64, [b], cfg, mode="full")
    alone = torch.cat([za.targets, zb.targets])
    move = (both.targets - both.init).norm(dim=1)
    assert float(((both.targets - alone).norm(dim=1) / move).max()) < 1e-9
    assert both.steps == za.steps + zb.steps


def _stats(lm, layers):
    sites = [lm.arch.mlp_out_site(l) for l in layers]
    return StatsView(collect_second_moments(lm, sites, tokenize_corpus(lm, CORPUS, max_length=64)))


def _independent_keys(lm, s, layer, last):
    """K, K_p and h at the keys by tracing one sequence alone (no padding possible)."""
    site = lm.arch.module(lm.model, lm.arch.mlp_out_site(layer))
    blk = lm.model.get_submodule(lm.arch.blocks)[last]
    with torch.no_grad(), trace({"k": site, "h": blk}, inputs=True) as t:
        lm.model(input_ids=torch.tensor([list(s.ids)]))
    X, H = t.inputs["k"][0].double(), t.outputs["h"][0].double()
    keys = list(s.keys)
    other = [p for p in range(len(s.ids)) if p not in keys]
    return X[keys].T, X[other].T, H[keys]


@pytest.mark.parametrize("base", ["memit", "alphaedit"])
def test_solve_is_the_reference_formula(lm, base):
    """One edited layer (so the whole residual is its share): MEMIT base
    delta = R K^T (lambda C + K_p K_p^T + K K^T)^{-1}; AlphaEdit base
    delta^T = (P (K K^T + K_p K_p^T) + L2 I)^{-1} P K R^T, in the range of P."""
    m = get_method("anyedit")
    cfg = make_config(m.config_cls, lm, {"base": base, "layers": (1,), "window_size": 6, "v_num_grad_steps": 3,
                                         "mom2_update_weight": 50.0, "nullspace_threshold": 1e-1})
    stats = _stats(lm, cfg.layers)
    state = m.prepare(lm, cfg, stats)
    r = req()
    result, _ = m.compute(lm, [r], state)
    (delta,) = result.deltas
    s = longform_sequence(lm, r, cfg)
    K, Kp, h = _independent_keys(lm, s, 1, 1)
    R = (result.info["targets"].double() - h).T                          # (H, W)
    assert K.shape[1] == len(s.starts) > 1
    assert Kp.shape[1] == len(s.ids) - len(s.starts)
    M = K @ K.T + Kp @ Kp.T
    if base == "memit":
        C = stats[lm.arch.mlp_out_site(1)].mean().double()
        want = R @ K.T @ torch.linalg.inv(50.0 * C + M)
    else:
        P = stats.projector(lm.arch.mlp_out_site(1), 1e-1).double()
        want = torch.linalg.solve(P @ M + 10.0 * torch.eye(P.shape[0], dtype=torch.float64), P @ K @ R.T).T
        torch.testing.assert_close(delta.dense.double() @ P, delta.dense.double(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(delta.dense.double(), want, atol=1e-5, rtol=1e-3)
    assert result.info["windows"] == [len(s.starts)]


def test_preservation_term_is_optional_and_matters(lm):
    """preserve_context=false drops K_p K_p^T (the reference's plain baselines): a different
    update; with it the outputs at the other positions move less."""
    m = get_method("anyedit")
    over = {"base": "memit", "layers": (1,), "window_size": 6, "v_num_grad_steps": 3, "mom2_update_weight": 1.0}
    stats = _stats(lm, (1,))
    out = {}
    for keep in (True, False):
        cfg = make_config(m.config_cls, lm, over | {"preserve_context": keep})
        (d,) = m.compute(lm, [req()], m.prepare(lm, cfg, stats))[0].deltas
        out[keep] = d.dense.double()
    s = longform_sequence(lm, req(), make_config(m.config_cls, lm, over))
    _, Kp, _ = _independent_keys(lm, s, 1, 1)
    assert not torch.allclose(out[True], out[False])
    assert (out[True] @ Kp).norm() < (out[False] @ Kp).norm()


def test_kp_are_the_other_positions_without_pads(lm):
    """Sequences of different lengths in one padded pass: K and K_p are those of each sequence
    alone, concatenated; K_p has exactly len - #windows columns per sequence."""
    cfg = make_config(AnyEditConfig, lm, {"window_size": 4})
    s1 = longform_sequence(lm, req(), cfg)
    s2 = longform_sequence(lm, req("Why is the sky blue?", "Because air scatters blue light more", "b"), cfg)
    assert len(s1.ids) != len(s2.ids)
    K, Kp, cur = window_keys(lm, [s1, s2], 1, 2)
    parts = [_independent_keys(lm, s, 1, 2) for s in (s1, s2)]
    assert Kp.shape[1] == sum(len(s.ids) - len(s.starts) for s in (s1, s2))
    torch.testing.assert_close(K, torch.cat([p[0] for p in parts], 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(Kp, torch.cat([p[1] for p in parts], 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cur, torch.cat([p[2] for p in parts]), atol=1e-5, rtol=1e-5)


def test_config_defaults_and_errors(lm):
    from kedit_core.errors import BadInputError

    assert AnyEditConfig.ARCH_DEFAULTS[("llama", 32, 4096)]["window_size"] == 40
    assert AnyEditConfig.ARCH_DEFAULTS[("llama", 28, 3584)]["window_size"] == 50
    c = AnyEditConfig()
    assert (c.v_lr, c.v_num_grad_steps, c.v_early_stop_loss, c.v_weight_decay, c.clamp_norm_factor) == \
        (0.5, 25, 1e-2, 1e-3, 4.0)
    assert make_config(AnyEditConfig, lm, {}).layers == (0, 1)        # 4-8 of 32 scaled to 4 blocks
    with pytest.raises(BadInputError, match="field 'base'"):
        make_config(AnyEditConfig, lm, {"base": "rome"})
    with pytest.raises(BadInputError, match="chat template"):
        longform_sequence(lm, req(), make_config(AnyEditConfig, lm, {"chat": "yes"}))
    long = req(a=" ".join(["word"] * 400))
    with pytest.raises(BadInputError, match="positions"):
        longform_sequence(lm, long, make_config(AnyEditConfig, lm, {}))


@pytest.mark.slow
def test_chat_template_ids_are_what_generation_reads(smol):
    """SmolLM2-Instruct: the question as a chat turn, tokenised as generation tokenises it;
    the answer ends with the template's end-of-turn token."""
    from kedit_core.generation import chat_prompt, encode_batch

    cfg = make_config(AnyEditConfig, smol, {})
    assert cfg.window_size == 20 and cfg.layers == (4, 5, 6, 7, 8) and cfg.v_lr == 2.0
    s = longform_sequence(smol, req(), cfg)
    enc = encode_batch(smol, [chat_prompt(smol.tokenizer, req().text)])
    assert list(s.ids[:s.n_prompt]) == enc["input_ids"][0].tolist()
    assert smol.tokenizer.convert_ids_to_tokens(s.ids[-1]) == "<|im_end|>"
    assert smol.tokenizer.decode(s.ids[s.n_prompt:]) == ANSWER + "<|im_end|>"


@pytest.mark.slow
def test_anyedit_writes_a_long_answer_into_smollm2(smol):
    """Two windows of a made-up answer: after the edit the chat question makes the answer
    likely (teacher-forced over the whole answer: mean NLL below 1 nat, token accuracy above
    0.8), and reverting restores the model bit for bit. Measured on 2026-12-04 with SmolLM2's
    defaults (75 target steps, L2 1.0): mean NLL 5.42 -> 0.41, token accuracy 0.11 -> 0.94
    (with the earlier 25 steps and L2 10: 5.42 -> 3.59, 0.11 -> 0.39)."""
    from kedit_core import Editor
    from kedit_core.evaluate.scoring import score
    from kedit_core.generation import chat_prompt, greedy

    ed = Editor(smol, "anyedit", show_progress=False, base="alphaedit", window_size=10)
    q = chat_prompt(smol.tokenizer, req().text)
    before_text = greedy(smol, [q], 12)[0]
    before = score(smol, [q], [ANSWER])
    ed.edit_batch([req()])
    try:
        after = score(smol, [q], [ANSWER])
        print(f"mean NLL {before.mean_nll[0]:.3f} -> {after.mean_nll[0]:.3f}, "
              f"token acc {before.token_acc[0]:.3f} -> {after.token_acc[0]:.3f}")
        assert after.mean_nll[0] < 1.0 < before.mean_nll[0]
        assert after.token_acc[0] > 0.8 > before.token_acc[0]
    finally:
        ed.revert()
    assert greedy(smol, [q], 12)[0] == before_text


def test_window_targets_are_shared_by_the_bases_and_never_stale(lm, monkeypatch):
    """AnyEdit over MEMIT then over AlphaEdit on the same weights optimise the window targets
    once (the second reuses them, equal to a fresh optimisation); other target settings or
    other weights are a miss, and the weights restored bit for bit are a hit again."""
    import kedit_core.methods.anyedit.method as am
    from kedit_core.apply import temporarily_applied
    from kedit_core.methods.common import zopt_config

    calls = []
    real = am.optimize_window_targets
    monkeypatch.setattr(am, "optimize_window_targets", lambda *a, **k: calls.append(1) or real(*a, **k))
    lm.scratch.pop(am.MEMO_KEY, None)
    m = get_method("anyedit")
    stats = _stats(lm, (1,))
    over = {"layers": (1,), "window_size": 6, "v_num_grad_steps": 3, "mom2_update_weight": 50.0}
    cfgs = {b: make_config(m.config_cls, lm, over | {"base": b}) for b in ("memit", "alphaedit")}
    states = {b: m.prepare(lm, c, stats) for b, c in cfgs.items()}
    res = {b: m.compute(lm, [req()], states[b])[0] for b in cfgs}
    assert len(calls) == 1
    torch.testing.assert_close(res["memit"].info["targets"], res["alphaedit"].info["targets"])
    # the hit says so and carries what the targets cost when they were optimised
    assert (res["memit"].info["targets_reused"], res["alphaedit"].info["targets_reused"]) == (False, True)
    assert res["alphaedit"].info["targets_s"] == res["memit"].info["targets_s"] > 0
    assert not torch.allclose(res["memit"].deltas[0].dense, res["alphaedit"].deltas[0].dense)
    fresh, _ = real(lm, [longform_sequence(lm, req(), cfgs["memit"])], zopt_config(cfgs["memit"], 1, "block"))
    torch.testing.assert_close(res["alphaedit"].info["targets"], fresh.targets.float(), atol=1e-5, rtol=1e-4)
    other = make_config(m.config_cls, lm, over | {"base": "memit", "v_num_grad_steps": 4})
    m.compute(lm, [req()], m.prepare(lm, other, stats))
    assert len(calls) == 2
    with temporarily_applied(lm, res["memit"].deltas):
        m.compute(lm, [req()], states["memit"])
    assert len(calls) == 3
    m.compute(lm, [req()], states["alphaedit"])
    assert len(calls) == 3
    lm.scratch["zero3_engine"] = object()       # partitioned weights: no fingerprint, no memo
    try:
        m.compute(lm, [req()], states["alphaedit"])
    finally:
        del lm.scratch["zero3_engine"]
    assert len(calls) == 4
