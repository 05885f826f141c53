"""EVOKE's overfitting metrics (issue 12 point 2): each metric is the reference's probability
comparison, computed here by hand from the edited model's mean NLLs; the reader keeps the
multi-hop question with both answers; `kedit edit-local --data` on an EVOKE file writes them."""

import json

import numpy as np
import pytest

from kedit_core.data import read_dataset
from kedit_core.edited import ModelView
from kedit_core.evaluate.evoke import evoke_metrics, has_evoke_probes
from kedit_core.models import load

MAIN = {"case_id": 0, "requested_rewrite": {
    "prompt": "{} originates from", "relation_id": "P19", "subject": "Spike Hughes",
    "target_new": {"str": "Philadelphia", "id": "Q1"}, "target_true": {"str": "London", "id": "Q84"},
    "data_augmentation_prompt_para": ["{} comes from"]},
    "paraphrase_prompts": ["Spike Hughes is native to", "Spike Hughes was born in"],
    "neighborhood_prompts": ["Max Mosley originates from", "William Hogarth originated from"],
    "attribute_prompts": [], "generation_prompts": ["Spike Hughes currently lives in"],
    "portability": {"Recalled Relation": "(Philadelphia, known for, cheesesteaks)",
                    "New Question": "What food is associated with the city where Spike Hughes originates from?",
                    "New Answer": "Cheesesteaks", "Original Answer": "Fish and chips"},
    "prefix_distraction": ["Spike Hughes originates from Philadelphia. Max Mosley originates from",
                           "Spike Hughes originates from Philadelphia. Lita Ford was native to"]}
SUBJ = {"case_id": 1, "requested_rewrite": {
    "prompt": "The name of the country of citizenship of {} is", "relation_label": "COUNTRY OF CITIZENSHIP",
    "target_new": {"str": "Syria", "id": "Q858"}, "target_true": {"str": "United States of America", "id": "Q30"},
    "subject": "Leonardo DiCaprio", "data_augmentation_prompt_para": ["{} holds citizenship in"]},
    "relation_specificity": {"prompt": "The name of the mother of Leonardo DiCaprio is",
                             "answer": {"value": "Irmelin DiCaprio", "aliases": ["Irmelin Indenbirken"]}}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("evoke")
    (d / "main.json").write_text(json.dumps([MAIN]))
    (d / "subj.json").write_text(json.dumps([SUBJ]))
    return d


@pytest.fixture(scope="module")
def view():
    return ModelView(load("tiny-random-llama", device="cpu"))


def test_reader_keeps_the_multihop_prompt_with_both_answers(files):
    (r,) = read_dataset(files / "main.json").requests
    probes = dict(r.probes)
    q = "What food is associated with the city where Spike Hughes originates from?"
    assert probes["multihop"][0].prompt == f"{q} The answer to this question, most simply, is"
    assert probes["multihop"][0].answer == "Cheesesteaks" and probes["multihop_original"][0].answer == "Fish and chips"
    assert [p.answer for p in probes["prefix_distraction"]] == ["London", "London"]
    assert has_evoke_probes([r])


def test_metrics_are_the_reference_comparisons(files, view):
    (r,) = read_dataset(files / "main.json").requests
    (s,) = read_dataset(files / "subj.json").requests
    m = evoke_metrics(view, [r, s])

    def P(prompt, answer):
        return float(np.exp(-view.score([prompt], [answer]).mean_nll[0]))

    new, true = "Philadelphia", "London"
    eff = [P(r.text, new) > P(r.text, true), P(s.text, "Syria") > P(s.text, "United States of America")]
    assert m["efficacy_AMS"] == pytest.approx(np.mean(eff))
    assert m["paraphrase_AMS"] == pytest.approx(np.mean([P(p, new) > P(p, true) for p in MAIN["paraphrase_prompts"]]))
    assert m["rel_spec_EOS"] == pytest.approx(np.mean([P(p, true) > P(p, new) for p in MAIN["neighborhood_prompts"]]))
    assert m["distraction_EOS"] == pytest.approx(np.mean([P(p, true) > P(p, new) for p in MAIN["prefix_distraction"]]))
    mh = dict(r.probes)["multihop"][0].prompt
    assert m["multihop_EOS"] == float(P(mh, "Cheesesteaks") > P(mh, new))
    assert m["multihop_AMS"] == float(P(mh, "Cheesesteaks") > P(mh, "Fish and chips"))
    assert m["multihop_overfit_target_prob"] == pytest.approx(P(mh, new), rel=1e-5)
    sp = SUBJ["relation_specificity"]["prompt"]
    assert m["subj_spec_EOS"] == float(P(sp, "Irmelin DiCaprio") > P(sp, "Syria"))
    assert m["subj_spec_correct_ans_prob"] == pytest.approx(P(sp, "Irmelin DiCaprio"), rel=1e-5)
    eos = [m[f"{t}_EOS"] for t in ("multihop", "distraction", "rel_spec", "subj_spec")]
    assert m["overfit_EOS_mean"] == pytest.approx(np.mean(eos))
    assert m["n_multihop"] == 1 and m["n_subj_spec"] == 1


def test_edit_local_on_an_evoke_file_writes_the_metrics(files, tmp_path):
    from pipelines.cli import main as cli

    out = tmp_path / "run"
    assert cli(["edit-local", "--model", "tiny-random-llama", "--method", "ft-m", "--data", str(files / "main.json"),
                "--out", str(out), "--device", "cpu", "--perplexity-texts", "0", "--no-export",
                "--set", "layers=1", "--set", "num_steps=2"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for k in ("efficacy_AMS", "multihop_EOS", "multihop_AMS", "distraction_EOS", "rel_spec_EOS", "overfit_EOS_mean"):
        assert k in m["pre"] and k in m["post"]
