"""Evaluation: exact batched multi-token scoring, CounterFact metrics, fluency, perplexity."""

import math

import pytest
import torch

from kedit_core.evaluate import evaluate_requests, ngram_entropy, perplexity, score
from kedit_core.models import load
from kedit_core.types import EditRequest, LabeledPrompt
from kedit_core.zopt import target_ids


@pytest.fixture(scope="module")
def lm():
    return load("tiny-random-llama", device="cpu")


def _manual_logprob(lm, prompt, answer):
    p = lm.tokenizer(prompt)["input_ids"]
    t = target_ids(lm, answer)
    ids = torch.tensor([p + t])
    lp = torch.log_softmax(lm.model(input_ids=ids).logits[0].float(), -1)
    return sum(float(lp[len(p) - 1 + j, tok]) for j, tok in enumerate(t)), len(t)


def test_batched_multi_token_scores_are_exact(lm):
    prompts = ["The capital of France is", "Hi", "A much longer prompt about the Eiffel Tower in"]
    answers = ["Paris", "there, friend", "Rome"]
    s = score(lm, prompts, answers, batch_tokens=40)  # forces several padded batches
    for i, (p, a) in enumerate(zip(prompts, answers)):
        lp, n = _manual_logprob(lm, p, a)
        assert s.logprob[i] == pytest.approx(lp, abs=1e-4)
        assert s.mean_nll[i] == pytest.approx(-lp / n, abs=1e-4)
        assert len(s.argmax[i]) == n and 0 <= s.token_acc[i] <= 1


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gpt2"])
def test_repeated_pairs_and_answer_position_logits_match_full_passes(name):
    """Each distinct pair is scored once and the vocabulary projection runs only at the
    answer positions; the scores equal one full pass per pair, repeats included, in order."""
    m = load(name, device="cpu")
    prompts = ["The capital of France is", "Hi", "The capital of France is", "Rome is in", "Hi"]
    answers = ["Paris", "there, friend", "Paris", "the country of Italy", "there, friend"]
    s = score(m, prompts, answers, batch_tokens=48)
    assert m.scratch.get("logits_to_keep", True)   # the fast path was taken
    for i, (p, a) in enumerate(zip(prompts, answers)):
        lp, n = _manual_logprob(m, p, a)
        assert s.logprob[i] == pytest.approx(lp, abs=1e-4)
        assert len(s.argmax[i]) == n
    assert s.argmax[0] == s.argmax[2] and s.logprob[1] == s.logprob[4]
    s.argmax[0].append(-1)                         # results are independent lists
    assert s.argmax[2] != s.argmax[0]


def test_counterfact_metrics_follow_their_definitions(lm):
    r = EditRequest(case_id="x", subject="Paris", prompt="{} is in", target_new="Rome",
                    target_true="France", paraphrase_prompts=("Paris lies in",),
                    neighborhood=(LabeledPrompt("Lyon is in", "France"),))
    m = evaluate_requests(lm, [r], generation=False)
    s = score(lm, ["Paris is in", "Paris is in", "Paris lies in", "Paris lies in", "Lyon is in", "Lyon is in"],
              ["Rome", "France", "Rome", "France", "France", "Rome"])
    nll = s.mean_nll
    assert m["efficacy_score"] == float(nll[0] < nll[1])
    assert m["paraphrase_score"] == float(nll[2] < nll[3])
    assert m["neighborhood_score"] == float(nll[4] < nll[5])
    # EM: per-token geometric means exp(-mean NLL), as the reference's rewrite_prompts_diff
    assert m["efficacy_magnitude"] == pytest.approx(math.exp(-nll[0]) - math.exp(-nll[1]), abs=1e-6)


def test_ngram_entropy_and_perplexity(lm):
    assert ngram_entropy("a a a a a a") == 0.0
    assert ngram_entropy("the cat sat on the mat with a hat") > ngram_entropy("the cat the cat the cat the cat")
    ppl = perplexity(lm, ["Hello there, this is text.", "More text for the probe."], n_texts=2)
    assert 1 < ppl < 1e4  # a random byte model is near-uniform over 257 symbols
    assert ppl == pytest.approx(perplexity(lm, ["Hello there, this is text.", "More text for the probe."],
                                           n_texts=2, batch_tokens=16), rel=1e-5)


def test_fluency_from_generation_prompts(lm):
    r = EditRequest(case_id="x", subject="Paris", prompt="{} is in", target_new="Rome",
                    target_true="France", generation_prompts=("Paris is a city", "Paris has"))
    m = evaluate_requests(lm, [r], fluency=True)
    assert m["fluency"] > 0
