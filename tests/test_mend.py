"""MEND's mathematics and its editor artifact on tiny models: the captured factors rebuild
the true weight gradient exactly (Linear and GPT-2's Conv1D), the untrained editor is the
normalised rank-1 sum, the statistics merge like one pass over all rows, a training step
moves the editor, and an artifact edits only the base weights it was trained for."""

import json

import pytest
import torch

from kedit_core.errors import BadInputError
from kedit_core.methods.mend.method import MENDConfig, capture_factors, encode, sites_for, token_nll
from kedit_core.methods.mend.net import GradientTransform, MENDNet
from kedit_core.models import load
from tests.conftest import TINY

PAIRS = [("The Eiffel Tower is in", "Rome"), ("Paris is the capital of", "Italy")]


@pytest.mark.parametrize("name", TINY)
def test_factors_rebuild_the_weight_gradient(name):
    lm = load(name, device="cpu")
    sites = sites_for(lm, MENDConfig())
    ids, mask, lab = encode(lm, PAIRS)
    loss, fac = capture_factors(lm, sites, ids, mask, lab)
    ws = [lm.arch.weight(lm.model, s) for s in sites]
    for w in ws:
        w.requires_grad_(True)
    try:
        true_loss, _ = token_nll(lm.model(input_ids=ids, attention_mask=mask).logits, lab)
        grads = torch.autograd.grad(true_loss, ws)
    finally:
        for w in ws:
            w.requires_grad_(False)
    assert torch.isclose(loss, true_loss.detach())
    for s, g in zip(sites, grads):
        u, d = fac[s]
        rebuilt = d.reshape(-1, d.shape[-1]).T @ u.reshape(-1, u.shape[-1])     # sum_t delta_t u_t^T
        torch.testing.assert_close(rebuilt, lm.arch.as_out_in(g), atol=1e-6, rtol=1e-5)
        assert float(g.abs().max()) > 0


def test_untrained_editor_is_the_normalised_rank1_sum():
    torch.manual_seed(0)
    net = MENDNet({"a": (6, 4), "b": (6, 4), "c": (3, 5)}, rank=3, edit_lr=0.5)
    assert len(net.transforms) == 2 and net.route["b"] == ("4x6", 1)
    u, d = torch.randn(7, 4), torch.randn(7, 6)
    net.transforms["4x6"].update_stats(torch.cat([u, d], 1))
    delta = net.delta("b", u, d)
    x = torch.cat([u, d], 1).double()
    xn = ((x - x.mean(0)) / (x.std(0) + 1e-7)).float()     # U = 0: the MLP is the identity
    expect = 0.5 * xn[:, 4:].T @ xn[:, :4]
    torch.testing.assert_close(delta, expect, atol=1e-5, rtol=1e-5)


def test_statistics_merge_batches_like_one_pass():
    g1, g2 = GradientTransform(3, 2, 4, 1, 1), GradientTransform(3, 2, 4, 1, 1)
    x = torch.randn(50, 5)
    g1.update_stats(x)
    for part in (x[:7], x[7:8], x[8:30], x[30:]):
        g2.update_stats(part)
    torch.testing.assert_close(g1.mean, g2.mean)
    torch.testing.assert_close(g1.m2, g2.m2)
    torch.testing.assert_close(g1.m2 / 49, x.double().var(0))


def test_training_step_moves_the_editor_and_artifact_edits_only_its_base(tmp_path):
    from kedit_core import Editor
    from kedit_core.data import load_requests
    from kedit_core.methods.mend.train import MENDTrainer
    from kedit_core.trained import save_artifact
    from kedit_core.training import examples_from

    lm = load("tiny-random-llama", device="cpu")
    tr = MENDTrainer(lm, MENDConfig(rank=4, lr=1e-2, lr_lr=1e-2), seed=0)
    before = {k: v.clone() for k, v in tr.net.state_dict().items()}
    ex = examples_from(load_requests(None, limit=4))
    m = tr.train_step(ex, 4)
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values())
    moved = [k for k, v in tr.net.state_dict().items() if not torch.equal(v, before[k])]
    assert "edit_lrs" in moved and any(k.endswith(".u") for k in moved) and any("count" in k for k in moved)

    art = tmp_path / "editor"
    save_artifact(art, "mend", tr.artifact_tensors(), base_model="tiny-random-llama",
                  base_fingerprint=lm.fingerprint(), config=tr.config())
    with pytest.raises(BadInputError, match="already holds"):
        save_artifact(art, "mend", tr.artifact_tensors(), base_model="x", base_fingerprint="y", config={})
    ed = Editor("tiny-random-llama", "mend", None, device="cpu", show_progress=False, editor=str(art))
    w0 = {s: lm.arch.weight(ed.lm.model, s).detach().clone() for s in tr.sites}
    rec = ed.edit_batch(load_requests(None, limit=2))
    changed = [s for s in tr.sites if not torch.equal(lm.arch.weight(ed.lm.model, s), w0[s])]
    assert changed == tr.sites and set(rec["delta_norms"]) == set(tr.sites)

    with pytest.raises(BadInputError, match="other base weights"):
        Editor("tiny-random-qwen2", "mend", None, device="cpu", show_progress=False, editor=str(art))
    meta = json.loads((art / "editor.json").read_text())
    (art / "editor.safetensors").write_bytes((art / "editor.safetensors").read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(BadInputError, match="damaged"):
        Editor("tiny-random-llama", "mend", None, device="cpu", show_progress=False, editor=str(art))
    assert meta["method"] == "mend" and meta["config"]["sites"] == tr.sites
    with pytest.raises(BadInputError, match="needs a trained editor"):
        Editor("tiny-random-llama", "mend", None, device="cpu", show_progress=False)
