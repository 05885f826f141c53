"""Shared-prefix evaluation (kedit_core.prefix) gives what the unshared path gives: scores and
greedy continuations on every tiny architecture, and a plan that keeps long contexts apart."""

import pytest
import torch

from kedit_core import prefix as shared
from kedit_core.evaluate.scoring import score
from kedit_core.generation import greedy, greedy_until
from tests.conftest import TINY

CONTEXTS = [" ".join(f"Fact {i}: the city number {i * k} lies in the country {k}." for i in range(1, 4))
            for k in (3, 5)]
QUERIES = ["Paris is the capital of", "Rome is located in", "The Eiffel Tower is in", "Tokyo"]


def _unshared(monkeypatch):
    monkeypatch.setattr(shared, "MIN_PREFIX", 10 ** 9)
    monkeypatch.setattr(shared.plan, "__defaults__", (10 ** 9,))


@pytest.mark.parametrize("name", TINY)
def test_shared_prefix_scores_and_continuations_match_the_full_forward(name, monkeypatch):
    from kedit_core.models import load

    lm = load(name, device="cpu")
    prompts = [c + "\n" + q for c in CONTEXTS for q in QUERIES] + ["A short prompt alone"]
    answers = [" France", " Italy and more", " Paris", " Japan"] * 2 + [" x"]
    ids = [lm.tokenizer(p)["input_ids"] for p in prompts]
    groups, single = shared.plan(ids, [len(x) - 1 for x in ids])
    assert len(groups) == 2 and all(len(m) == 4 and p >= shared.MIN_PREFIX for p, m in groups)
    assert single == [8]
    a = score(lm, prompts, answers)
    g = greedy(lm, prompts, 6)
    u = greedy_until(lm, prompts, ["the"], 8)
    with monkeypatch.context() as m:
        _unshared(m)
        assert shared.plan(ids, [len(x) - 1 for x in ids])[0] == []
        b = score(lm, prompts, answers)
        g2 = greedy(lm, prompts, 6)
        u2 = greedy_until(lm, prompts, ["the"], 8)
    torch.testing.assert_close(torch.tensor(a.logprob), torch.tensor(b.logprob), atol=2e-4, rtol=1e-5)
    assert a.argmax == b.argmax
    assert g == g2 and u == u2


def test_plan_splits_where_contexts_differ_and_respects_caps():
    common = list(range(100))
    ctx_a, ctx_b = common + list(range(1000, 1400)), common + list(range(2000, 2400))
    seqs = [ctx_a + [7, i] for i in range(3)] + [ctx_b + [8, i] for i in range(3)]
    groups, single = shared.plan(seqs, [len(s) - 1 for s in seqs])
    assert sorted((p, sorted(m)) for p, m in groups) == [(501, [0, 1, 2]), (501, [3, 4, 5])]
    assert single == []
    # a cap below the shared length (a scored position inside it) limits the prefix
    groups, _ = shared.plan(seqs[:3], [200, 501, 501])
    assert groups == [(200, [0, 1, 2])]
    # nothing worth sharing
    assert shared.plan([[1, 2, 3], [1, 2, 4]], [2, 2]) == ([], [0, 1])
