"""Edits on the real default model (SmolLM2-135M): the acceptance behaviours that fit in CI.
The full CounterFact numbers (100 / 200 records) are measured by benchmarks/bench_edits.py."""

import pytest

from kedit_core import Editor, load_requests
from kedit_core.generation import first_token_ranks, greedy

pytestmark = pytest.mark.slow


def test_rome_moves_the_eiffel_tower_to_rome(smol):
    reqs = [r for r in load_requests() if r.subject == "The Eiffel Tower"]
    ed = Editor(smol, "rome", show_progress=False)
    neigh = list(reqs[0].neighborhood)
    assert greedy(smol, [reqs[0].text], 2)[0].startswith(" Paris")
    ed.edit(reqs, batch_size=1)
    try:
        assert greedy(smol, [reqs[0].text], 2)[0].startswith(" Rome")
        ranks = first_token_ranks(smol, [n.prompt for n in neigh], [n.answer for n in neigh])
        assert ranks == [0] * len(neigh)  # the built-in neighbourhood keeps its answers
    finally:
        ed.revert()
    assert greedy(smol, [reqs[0].text], 2)[0].startswith(" Paris")


def test_alphaedit_sequential_batches_on_builtin_edits(smol):
    """The built-in set holds popular facts whose keys lie largely inside the subspace that
    SmolLM2's CounterFact-tuned projection preserves; with the ridge L2 = 1 they edit
    (benchmarks/results/hparams_smollm2.md)."""
    reqs = load_requests()[:20]
    ed = Editor(smol, "alphaedit", show_progress=False, L2=1.0)
    pre = ed.evaluate(reqs)
    ed.edit(reqs, batch_size=10)
    try:
        post = ed.evaluate(reqs)  # over ALL 20, after the second batch
        assert post["efficacy_score"] >= 0.9
        assert post["paraphrase_score"] >= 0.5
        assert post["neighborhood_score"] >= pre["neighborhood_score"] - 0.2
        assert len(ed.history) == 2
    finally:
        ed.revert()
