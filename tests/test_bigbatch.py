"""Large batches: the chunked solve equals the unchunked one (MEMIT, AlphaEdit), AlphaEdit's
K_p K_p^T from the solve equals the keys recomputed after the update, chunk layouts, the
on-disk chunk log (checksums, batch identity, resume), a batch killed by SIGKILL that
resumes with only the remaining chunks, and the choice of workers and threads."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kedit_core.data import load_builtin
from kedit_core.methods import get_method, make_config
from kedit_core.methods.common import ChunkLog, LocalBackend, chunk_bounds, keys_after
from kedit_core.models import load
from kedit_core.stats import StatsView, collect_second_moments, tokenize_corpus

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ["Paris is the capital of France and a centre of art.",
          "The Colosseum is an ancient amphitheatre in the centre of Rome.",
          "Tokyo is the capital of Japan.", "Edits change facts in models."]
HP = {"layers": (1, 2), "v_num_grad_steps": 4}


@pytest.fixture(scope="module")
def lm():
    return load("tiny-random-llama", device="cpu")


@pytest.fixture(scope="module")
def reqs():
    return load_builtin().requests[:7]


@pytest.fixture(scope="module")
def stats(lm):
    sites = [lm.arch.mlp_out_site(l) for l in HP["layers"]]
    return StatsView(collect_second_moments(lm, sites, tokenize_corpus(lm, CORPUS * 10, max_length=64)))


def _run(lm, reqs, stats, method, chunk, extra=None, log=None):
    m = get_method(method)
    cfg = make_config(m.config_cls, lm, {**HP, **(extra or {})})
    state = m.prepare(lm, cfg, stats)
    return m.compute(lm, reqs, state, LocalBackend(lm, chunk, log))


def test_chunk_bounds():
    assert chunk_bounds(10, 0) == [(0, 10)]
    assert chunk_bounds(10, 4) == [(0, 3), (3, 7), (7, 10)]          # ceil(10 / 4) near-equal chunks
    assert chunk_bounds(10, 64, parallel=2) == [(0, 5), (5, 10)]      # every worker gets one
    assert chunk_bounds(3, 1, parallel=8) == [(0, 1), (1, 2), (2, 3)]  # never an empty chunk
    for n, c, p in [(1000, 64, 3), (7, 2, 1), (10_000, 64, 16)]:
        b = chunk_bounds(n, c, p)
        assert b[0][0] == 0 and b[-1][1] == n and all(x[1] == y[0] for x, y in zip(b, b[1:]))
        assert max(e - s for s, e in b) <= c and max(e - s for s, e in b) - min(e - s for s, e in b) <= 1


@pytest.mark.parametrize("method,extra", [("memit", {"mom2_update_weight": 50.0}),
                                          ("alphaedit", {"nullspace_threshold": 1e-3, "L2": 1.0})])
def test_chunked_batch_equals_unchunked(lm, reqs, stats, method, extra):
    whole, s_whole = _run(lm, reqs, stats, method, 0, extra)
    parts, s_parts = _run(lm, reqs, stats, method, 2, extra)       # 4 chunks of 1-2 requests
    assert whole.info["chunks"] == 1 and parts.info["chunks"] == 4
    for a, b in zip(whole.deltas, parts.deltas):
        assert a.site == b.site and float(a.matrix().norm()) > 0
        torch.testing.assert_close(b.matrix(), a.matrix(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(parts.info["targets"], whole.info["targets"], rtol=1e-4, atol=1e-6)
    if method == "alphaedit":
        for l in HP["layers"]:
            torch.testing.assert_close(s_parts["KpKp"][l], s_whole["KpKp"][l], rtol=1e-6, atol=1e-8)


def test_alphaedit_kpkp_from_the_solve_equals_the_recomputed_keys(lm, reqs, stats):
    """The keys' moment that AlphaEdit adds to K_p K_p^T, taken from the layer solves, equals
    the reference's recomputation of the keys after the whole update; unsorted layers take
    the recomputing path and give the same state for the same update."""
    result, state = _run(lm, reqs, stats, "alphaedit", 3, {"nullspace_threshold": 1e-3})
    K = keys_after(lm, reqs, HP["layers"], result.deltas)
    for l in HP["layers"]:
        torch.testing.assert_close(state["KpKp"][l], K[l] @ K[l].T, rtol=1e-6, atol=1e-8)


class _Counting(ChunkLog):
    def __init__(self):
        super().__init__()
        self.sums = []

    def put_sums(self, i, done, KK, KR):
        self.sums.append((i, done))


def test_sums_are_taken_chunk_by_chunk_in_order(lm, reqs, stats):
    log = _Counting()
    _run(lm, reqs, stats, "memit", 3, {"mom2_update_weight": 50.0}, log=log)
    assert log.bounds == [(0, 2), (2, 5), (5, 7)]
    assert log.sums == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
