"""KnowledgeEditor on tiny models: the update's shape and structure (eta (alpha * grad + beta)
with rank-1 alpha and beta, eta in (0, max_scale)), the Lagrangian constraint (the multiplier
rises while KL exceeds the margin and never goes below 0; the margin anneals), a training
step that moves the editor, and an artifact that drives `Editor` on its base model only."""

import pytest
import torch

from kedit_core.errors import BadInputError
from kedit_core.methods.ke.method import ConditionedWeight, KEConfig, build_net, sites_for
from kedit_core.models import load


def test_update_is_eta_alpha_grad_plus_beta_with_rank_one_factors():
    torch.manual_seed(0)
    w = ConditionedWeight(5, 3, condition_dim=8, hidden=4, max_scale=0.5)
    c = torch.randn(8)
    g = torch.randn(5, 3)
    d0 = w(c, torch.zeros(5, 3))                      # eta * beta
    d1 = w(c, g)
    alpha_g = d1 - d0                                 # eta * alpha * g
    a_c, a_r, b_c, b_r, e = w.mlp(c).split([3, 5, 3, 5, 1])
    eta = 0.5 * torch.sigmoid(e)
    assert 0 < float(eta) < 0.5
    alpha = torch.outer(a_r.softmax(-1), a_c)
    beta = torch.outer(b_r.softmax(-1), b_c)
    torch.testing.assert_close(d0, eta * beta)
    torch.testing.assert_close(alpha_g, eta * alpha * g, atol=1e-6, rtol=1e-5)
    assert torch.linalg.matrix_rank(alpha).item() == 1 and torch.linalg.matrix_rank(beta).item() == 1
    assert d1.shape == (5, 3)


def test_lagrangian_constraint_and_training_step_then_artifact(tmp_path):
    from kedit_core import Editor
    from kedit_core.data import load_requests
    from kedit_core.methods.ke.train import KETrainer
    from kedit_core.trained import save_artifact
    from kedit_core.training import examples_from

    lm = load("tiny-random-llama", device="cpu")
    cfg = KEConfig(lstm_hidden=8, condition_dim=16, hidden=8, lr=1e-2, margin=0.0)
    tr = KETrainer(lm, cfg, seed=0)
    assert tr.sites == sites_for(lm, cfg) and len(tr.sites) == 6
    before = {k: v.clone() for k, v in tr.net.state_dict().items()}
    ex = examples_from(load_requests(None, limit=4))
    m = tr.train_step(ex, 4)
    assert m["loc_kl"] > 0 and tr.lagrange == pytest.approx(0.1 * m["loc_kl"])   # ascent on KL - margin
    tr.margin = 10.0
    tr.train_step(ex, 4)
    assert tr.lagrange == 0.0                                                     # clamped at 0
    moved = [k for k, v in tr.net.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("lstm") for k in moved) and any(k.startswith("weights") for k in moved)
    tr.margin = 1e-3
    out = tr.validate(ex)
    assert set(out) >= {"loss", "edit_acc", "para_acc", "loc_kl"}
    t, meta = tr.state_tensors()
    assert meta["extra"] == {"lagrange": tr.lagrange, "margin": tr.margin}

    art = tmp_path / "ke"
    save_artifact(art, "ke", tr.artifact_tensors(), base_model="tiny-random-llama",
                  base_fingerprint=lm.fingerprint(), config=tr.config())
    ed = Editor("tiny-random-llama", "ke", None, device="cpu", show_progress=False, editor=str(art))
    w0 = {s: lm.arch.weight(ed.lm.model, s).detach().clone() for s in tr.sites}
    ed.edit_batch(load_requests(None, limit=2))
    assert all(not torch.equal(lm.arch.weight(ed.lm.model, s), w0[s]) for s in tr.sites)
    with pytest.raises(BadInputError, match="not 'ke'|holds a 'ke'"):
        Editor("tiny-random-llama", "mend", None, device="cpu", show_progress=False, editor=str(art))
    with pytest.raises(BadInputError, match="other base weights"):
        Editor("tiny-random-qwen2", "ke", None, device="cpu", show_progress=False, editor=str(art))
