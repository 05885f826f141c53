"""EVOKE's LTI in the shared target optimisation (issue 12 point 2): the teacher reads
"Imagine that {fact}" with its positions aligned to the prefixed rows (the reference's
misalignment not reproduced), the objective's KL terms fall as delta is optimised, and
ROME / MEMIT run with `lti=true`."""

import pytest
import torch

from kedit_core import Editor
from kedit_core.data import load_builtin
from kedit_core.models import load
from kedit_core.zopt import LTIConfig, ZOptConfig, _lti_teacher, optimize_targets, subject_last_index, target_ids

LTI = LTIConfig(nll_factor=0.125, last_kl_factor=0.0425, mid_kl_factor=0.0525, mid_layer=3)


@pytest.fixture(scope="module")
def lm():
    return load("tiny-random-llama", device="cpu")


@pytest.fixture(scope="module")
def reqs():
    return load_builtin().requests[:2]


def test_teacher_reads_the_fact_in_context_at_aligned_positions(lm, reqs):
    templates = ["{}", "The weather. {}"]
    t = _lti_teacher(lm, reqs, templates, "{} is a", LTI)
    r = reqs[1]
    tgt = target_ids(lm, r.target_new)
    last, mid = t[1]
    assert last.shape[0] == len(templates) * len(tgt) + 1 and mid.shape[0] == len(templates) + 1
    # the second template row: prefix + row, read by the unedited model right before each target token
    text = f"Imagine that {r.text} {r.target_new}\n" + templates[1].replace("{}", r.prompt)
    ids, li = subject_last_index(lm, text, r.subject)
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([ids + tgt[:-1]])).logits[0]
    want = torch.log_softmax(logits[len(ids) - 1:len(ids) - 1 + len(tgt)].float(), -1)
    got = last[len(tgt):2 * len(tgt)]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the subject's last token in the prefixed row is later than in the bare row, by the prefix
    _, bare = subject_last_index(lm, templates[1].replace("{}", r.prompt), r.subject)
    assert li > bare
    # "{subject} is a" is read without the prefix, at its last token
    kl_ids, _ = subject_last_index(lm, "{} is a", r.subject)
    with torch.no_grad():
        kl_logits = lm.model(input_ids=torch.tensor([kl_ids])).logits[0, -1]
    torch.testing.assert_close(last[-1], torch.log_softmax(kl_logits.float(), -1), atol=1e-4, rtol=1e-4)


def test_lti_objective_falls_and_differs_from_the_plain_one(lm, reqs):
    templates = ["{}", "The weather. {}"]
    # (no weight decay: a tiny random model's hidden states are so small that it dominates)
    cfg = ZOptConfig(layer=1, steps=1, lti=LTI, weight_decay=0.0, early_stop_loss=0.0)
    first = optimize_targets(lm, reqs, cfg, templates)
    later = optimize_targets(lm, reqs, ZOptConfig(layer=1, steps=15, lti=LTI, weight_decay=0.0, early_stop_loss=0.0),
                             templates)
    assert all(b < a for a, b in zip(first.losses, later.losses))
    plain = optimize_targets(lm, reqs, ZOptConfig(layer=1, steps=1, weight_decay=0.0, early_stop_loss=0.0), templates)
    assert all(abs(a - b) > 1e-6 for a, b in zip(first.losses, plain.losses))
    torch.testing.assert_close(first.init, plain.init)   # the same unedited hidden states (full vs cached passes)
    # a teacher-only objective: with no NLL, delta moves the student towards the teacher
    kl_only = LTIConfig(nll_factor=0.0, last_kl_factor=1.0, mid_kl_factor=1.0, mid_layer=3)
    a = optimize_targets(lm, reqs, ZOptConfig(layer=1, steps=1, lti=kl_only, weight_decay=0.0, early_stop_loss=0.0),
                         templates)
    b = optimize_targets(lm, reqs, ZOptConfig(layer=1, steps=15, lti=kl_only, weight_decay=0.0, early_stop_loss=0.0),
                         templates)
    assert all(y < x for x, y in zip(a.losses, b.losses))


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_rome_and_memit_run_with_lti(method, lm, reqs, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(["Paris is the capital of France.", "Edits change facts in models."] * 30))
    over = {"layers": (1,)} if method == "rome" else {"layers": (0, 1)}
    ed = Editor(lm, method, str(corpus), show_progress=False, stats_dir=str(tmp_path / "s"), lti=True,
                v_num_grad_steps=3, mom2_n_samples=40, lti_mid_layer=3, **over)
    assert ed.cfg.lti and (ed.cfg.lti_nll_factor == (0.15 if method == "rome" else 0.125))
    rec = ed.edit_batch(reqs)
    assert rec["delta_norms"] and all(v > 0 for v in rec["delta_norms"].values())
    ed.revert()
