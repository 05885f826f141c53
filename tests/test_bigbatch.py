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
HP = {"layers": (1, 2), "v_num_grad_steps": 3}


@pytest.fixture(scope="module")
def lm():
    return load("tiny-random-llama", device="cpu")


@pytest.fixture(scope="module")
def reqs():
    return load_builtin().requests[:5]


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
    parts, s_parts = _run(lm, reqs, stats, method, 2, extra)       # 3 chunks of 1-2 requests
    assert whole.info["chunks"] == 1 and parts.info["chunks"] == 3
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
    assert log.bounds == [(0, 2), (2, 5)]
    assert log.sums == [(0, 1), (0, 2), (1, 1), (1, 2)]


# ------------------------------------------------------------------ the chunk log on disk
def test_batch_partial_records_verify_and_belong_to_their_batch(tmp_path, caplog):
    from kedit_core.zopt import ZResult
    from pipelines.checkpoint import BatchPartial

    key = {"identity_hash": "abc", "batch": 3, "weights_hash": "w"}
    p = BatchPartial(tmp_path, key, every_s=0)
    assert p.start([(0, 2), (2, 4)]) == [(0, 2), (2, 4)]
    z = ZResult(targets=torch.randn(2, 5), init=torch.randn(2, 5), losses=[0.5, 0.25], steps=[3, 4])
    p.put_targets(0, z)
    KK, KR = torch.randn(6, 6, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    p.put_sums(0, 1, KK, KR)
    # a new process with the same key resumes the layout and reads the exact bits back
    q = BatchPartial(tmp_path, key, every_s=0)
    assert q.start([(0, 1), (1, 2), (2, 3), (3, 4)]) == [(0, 2), (2, 4)]
    assert q.has_targets(0) and not q.has_targets(1)
    assert torch.equal(q.get_targets(0).targets, z.targets) and q.get_losses(0) == ([0.5, 0.25], [3, 4])
    done, kk, kr = q.get_sums(0)
    assert done == 1 and torch.equal(kk, KK) and torch.equal(kr, KR)
    # a damaged record is refused (checksum) and its chunk recomputed
    f = next(tmp_path.glob("partial/targets-00000-*.safetensors"))
    f.write_bytes(f.read_bytes()[:-1] + b"\x00")
    assert not q.has_targets(0) and "does not match its sha256" in caplog.text
    # the log of another batch is discarded when a batch starts
    r = BatchPartial(tmp_path, {**key, "batch": 4}, every_s=0)
    assert r.start([(0, 4)]) == [(0, 4)] and r.get_sums(0) is None
    # sums are throttled to every_s, but a complete pass is always saved
    s = BatchPartial(tmp_path, key, every_s=3600)
    s.start([(0, 2), (2, 4)])
    s.put_sums(0, 1, KK, KR)
    assert s.get_sums(0) is None
    s.put_sums(0, 2, KK, KR)
    assert s.get_sums(0)[0] == 2
    s.clear()
    assert not (tmp_path / "partial").exists()


SETS = ["layers=1,2", "v_num_grad_steps=3", "mom2_n_samples=64", "mom2_update_weight=50"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    f = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    f.write_text("\n".join(CORPUS * 20) + "\n")
    return f


def _argv(out, corpus, *extra):
    a = ["edit", "--model", "tiny-random-llama", "--method", "memit", "--data", "builtin", "--limit", "8",
         "--batch-size", "8", "--workers", "0", "--zopt-chunk", "1", "--chunk-checkpoint-s", "0",
         "--eval-every", "0", "--perplexity-texts", "2", "--stats-corpus", str(corpus), "--out", str(out),
         "--device", "cpu"]
    for s in SETS:
        a += ["--set", s]
    return a + list(extra)


@pytest.mark.slow
def test_sigkill_mid_batch_resumes_only_the_remaining_chunks(tmp_path, corpus, monkeypatch):
    """One batch of 8 in 8 chunks: killed by SIGKILL after a few chunks' targets were
    saved, the resumed run optimises only the chunks without saved targets and ends with
    the weights of an uninterrupted run, bit for bit."""
    from pipelines.cli import main as cli

    assert cli(_argv(tmp_path / "whole", corpus)) == 0
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert not (tmp_path / "whole" / "partial").exists()   # removed once the batch is checkpointed

    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *_argv(out, corpus)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "partial" / "targets-00002.json").exists():
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = len(list((out / "partial").glob("targets-*.json")))
    assert 3 <= saved < 8 and not (out / "metrics.json").exists(), "killed mid-batch"

    calls = []
    orig = LocalBackend.chunk_targets
    monkeypatch.setattr(LocalBackend, "chunk_targets", lambda self, reqs, *a: calls.append(len(reqs)) or
                        orig(self, reqs, *a))
    assert cli(["edit", "--resume", str(out)]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    assert len(calls) == 8 - saved        # only the chunks whose targets were not saved
    assert resumed["weights_hash"] == whole["weights_hash"]
    assert not (out / "partial").exists()


# ------------------------------------------------------------------ workers and threads
def _node(i, cpu, gpu=0):
    return {"id": f"n{i}", "CPU": cpu, "GPU": gpu}


@pytest.mark.parametrize("nodes,device,requested,expect", [
    # this machine: one node, 2 cores -> one worker with both (the driver time-shares them)
    ([_node(0, 2)], "auto", "auto", (1, 2, 0)),
    ([_node(0, 1)], "cpu", "auto", (1, 1, 0)),
    ([_node(0, 8)], "auto", "auto", (1, 8, 0)),
    ([_node(0, 16)], "auto", "auto", (2, 8, 0)),
    ([_node(0, 64)], "cpu", "auto", (8, 8, 0)),
    # one thread count for all (the smallest node decides): floor(16 / 6) + floor(16 / 6) + 1
    ([_node(0, 16), _node(1, 16), _node(2, 6)], "cpu", "auto", (5, 6, 0)),
    # GPUs: one worker per GPU, the node's CPUs shared among its GPUs
    ([_node(0, 16, 1)], "auto", "auto", (1, 16, 1)),
    ([_node(0, 32, 4), _node(1, 16, 4)], "auto", "auto", (8, 4, 1)),
    ([_node(0, 16, 1)], "cpu", "auto", (2, 8, 0)),       # device=cpu ignores the GPUs
    # an explicit number: as asked, CPUs shared equally
    ([_node(0, 2)], "auto", 2, (2, 1, 0)),
    ([_node(0, 2)], "auto", 0, (0, 0, 0)),
    ([_node(0, 16, 2)], "auto", 2, (2, 8, 1)),
    ([_node(0, 16, 1)], "auto", 2, (2, 8, 0)),           # too few GPUs for 2: CPUs
])
def test_plan_workers(nodes, device, requested, expect):
    from pipelines.workers import plan_workers

    p = plan_workers(nodes, requested=requested, device=device, driver_node="n0")
    assert (p.workers, p.threads, p.gpus) == expect, p.reason
    assert p.driver_threads == int(nodes[0]["CPU"])
    if requested == "auto" and not p.gpus:   # never more threads than cores on any node
        per_node = [int(n["CPU"]) // p.threads for n in nodes]
        assert sum(per_node) == p.workers and all(k * p.threads <= n["CPU"] for k, n in zip(per_node, nodes))


def test_plan_workers_warns_on_oversubscription(caplog):
    from pipelines.workers import plan_workers

    p = plan_workers([_node(0, 2)], requested=4)
    assert (p.workers, p.threads) == (4, 1) and "oversubscribe" in p.reason and "oversubscribe" in caplog.text


def test_local_ray_advertises_the_cores_this_process_may_use(monkeypatch):
    """A local Ray instance counts the process's CPU affinity (taskset, a container's cpuset),
    not every core of the host, so workers=auto never oversubscribes a restricted job."""
    import os

    from pipelines import raycluster

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert raycluster.usable_cpus() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 5}, raising=False)
    assert raycluster.usable_cpus() == 4

    def no_affinity(pid):
        raise OSError("not supported")

    monkeypatch.setattr(os, "sched_getaffinity", no_affinity, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert raycluster.usable_cpus() == 6


def test_quickstart_and_kedit_edit_default_to_auto(monkeypatch, tmp_path):
    """The quickstart's job config and `kedit edit` without --workers use workers=auto, and
    the stream resolves it through plan_workers with what Ray reports (recorded, not part of
    the identity)."""
    from pipelines import workers as W
    from pipelines.commands.quickstart import JOB
    from pipelines.config import RunConfig, build
    from pipelines.edit_job import EditStream

    assert build(JOB).workers == "auto" and build(None).workers == "auto"
    assert "workers" not in RunConfig.IDENTITY
    assert build(None, workers="3").workers == 3
    from kedit_core.errors import BadInputError

    with pytest.raises(BadInputError, match="workers"):
        build(None, workers="many")
    seen = {}

    def fake_plan(nodes, **kw):
        seen.update(kw, nodes=nodes)
        raise RuntimeError("planned")

    monkeypatch.setattr(W, "plan_workers", fake_plan)
    monkeypatch.setattr(W, "cluster_nodes", lambda: ([_node(0, 2)], "n0"))
    monkeypatch.setattr("pipelines.raycluster.init_ray", lambda *a, **k: None)
    cfg = build(JOB, out=str(tmp_path / "q"), model="tiny-random-llama", stats_corpus=None)
    with pytest.raises(RuntimeError, match="planned"):
        EditStream(cfg, show_progress=False).run()
    assert seen["requested"] == "auto" and seen["nodes"] == [_node(0, 2)] and seen["driver_node"] == "n0"
