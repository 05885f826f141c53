"""The scalable evaluation of edit streams (kedit_core.evaluate.plan, pipelines.evaluation):
the retention sample (fixed size, seeded, stratified, the same after a resume), the probe,
per-request values that add up to the metrics, the groups in MLflow, `kedit evaluate
RUN_DIR`, and evaluation sharded over Ray workers giving the driver's numbers."""

import json

import numpy as np
import pytest

from kedit_core.evaluate.plan import (choose_probe, priorities, probe_from_dict, probe_requests, retention_sample,
                                      units)
from pipelines.cli import main as cli
from pipelines.config import build

SETS = {"layers": "1,2", "v_num_grad_steps": "3", "mom2_n_samples": "64", "nullspace_threshold": "1e-3"}


# the stream tests' word corpus and local Ray instance, shared with test_pipeline_edit
from tests.test_pipeline_edit import corpus, ray_local  # noqa: E402,F401


def test_retention_sample_is_fixed_size_stratified_and_reproducible():
    for total, size in [(2000, 500), (1000, 7), (501, 500), (10_000, 500)]:
        s = retention_sample(total, size, seed=3)
        assert len(s) == size and s == sorted(set(s)) and 0 <= s[0] and s[-1] < total
        # one edit in each of `size` equal-width intervals of the stream
        assert [i * size // total for i in s] == list(range(size))
        assert s == retention_sample(total, size, seed=3)           # a resume recomputes it exactly
    assert retention_sample(2000, 500, 3) != retention_sample(2000, 500, 4)
    assert retention_sample(30, 500, 0) == list(range(30)) and retention_sample(30, 0, 0) == []
    # an edit's priority does not depend on how long the stream is: consecutive points share
    # most of their sample (here: every interval that did not move keeps its edit)
    assert np.array_equal(priorities(5, 5000)[:4200], priorities(5, 4200))
    a, b = set(retention_sample(1000, 100, 1)), set(retention_sample(1000 + 10, 100, 1))
    assert len(a & b) > 30
    # stratified: each tenth of the stream holds a tenth of the sample
    s = retention_sample(10_000, 500, 9)
    assert np.bincount(np.array(s) // 1000).tolist() == [50] * 10


def test_probe_is_never_edited_recorded_and_checked():
    from kedit_core.data import load_requests
    from kedit_core.errors import BadInputError

    ds = load_requests()
    p = choose_probe(ds, 12, 6, seed=0)
    assert len(p.indices) == 6 and p.source == "unedited records" and p == choose_probe(ds, 12, 6, seed=0)
    edited = {r.subject for r in ds[:12]}
    assert all(i >= 12 and ds[i].subject not in edited for i in p.indices)
    assert probe_from_dict(p.to_dict(), ds, "run.json") == p
    bad = {**p.to_dict(), "case_ids": ["x", *p.case_ids[1:]]}
    with pytest.raises(BadInputError, match="run.json.*eval_plan.probe"):
        probe_from_dict(bad, ds, "run.json")
    # the probe's questions: the true fact and the neighbourhood prompts, against target_new
    r, q = ds[p.indices[0]], probe_requests(p, ds)[0]
    assert q.neighborhood[0].prompt == r.text and q.neighborhood[0].answer == r.target_true
    assert q.neighborhood[1:] == r.neighborhood and not q.paraphrase_prompts and q.target_new == r.target_new
    # a stream over the whole dataset: the stream's neighbourhood prompts, without the edited facts
    whole = choose_probe(ds, len(ds), 6, seed=0)
    assert whole.source == "stream neighbourhoods"
    assert all(x.neighborhood == ds[i].neighborhood for x, i in zip(probe_requests(whole, ds), whole.indices))


def test_units_are_contiguous_and_bounded():
    costs = [5, 7, 3, 20, 1, 1, 9]
    us = units(costs, 12)
    assert [i for u in us for i in u] == list(range(len(costs)))
    assert all(sum(costs[i] for i in u) <= 12 or len(u) == 1 for u in us)
    assert us == [[0, 1], [2], [3], [4, 5, 6]]


def test_metrics_of_parts_are_the_metrics_of_the_whole():
    """Every metric is a mean over requests of a per-request value, so the metrics of a set
    evaluated in parts (units, shards) are summarize() of the parts' values."""
    from kedit_core.data import load_requests
    from kedit_core.evaluate.metrics import evaluate_requests, request_values, summarize
    from kedit_core.models import load

    lm = load("tiny-random-llama", device="cpu")
    reqs = load_requests(limit=7)
    whole = evaluate_requests(lm, reqs)
    parts = request_values(lm, reqs[:3]) + request_values(lm, reqs[3:])
    assert summarize(parts).keys() == whole.keys()
    assert summarize(parts) == pytest.approx(whole, rel=1e-6, abs=1e-9)
    assert summarize(request_values(lm, reqs)) == whole      # one pass: exactly evaluate_requests
    assert whole["n_requests"] == 7.0


def _cfg(out, corpus, workers=0, **kw):
    return dict(model="tiny-random-llama", method="alphaedit", data="builtin", limit=6, batch_size=2,
                workers=workers, eval_every=2, perplexity_texts=4, stats_corpus=str(corpus), out=str(out),
                device="cpu", set=dict(SETS), eval_retention=3, eval_probe=4, **kw)


def _same_rows(a, b):
    drop = ("eval_seconds", "seconds_per_edit")
    clean = lambda r: {k: v for k, v in r.items() if k not in drop and not k.startswith("rss/")}  # noqa: E731
    return [clean(r) for r in a] == [clean(r) for r in b]


@pytest.mark.slow
def test_stream_logs_the_groups_and_a_resume_reproduces_the_plan(tmp_path, corpus, monkeypatch, capsys):
    from pipelines.edit_job import EditStream
    from pipelines.tracking import Tracker

    whole = EditStream(build(None, **_cfg(tmp_path / "runs" / "whole", corpus)), show_progress=False).run()
    rows = whole["curve"]
    assert [r["edits"] for r in rows] == [0, 2, 4, 6]
    for r in rows[1:]:   # the sample is recorded and is the seeded stratified draw of that point
        assert r["retention_sample"] == retention_sample(r["edits"], 3, 0)
        assert r["retention/n_requests"] == len(r["retention_sample"]) and r["latest/n_requests"] == 2
        assert r["probe/n_requests"] == 4 and r["rss/driver_peak_mb"] >= r["rss/driver_mb"] > 0
    assert "all/efficacy_score" in rows[0] and "all/efficacy_score" in rows[-1]
    assert not any(k.startswith("all/") for r in rows[1:-1] for k in r)      # all edits: start and end only
    assert rows[-1]["all/n_requests"] == 6 and rows[0]["all/n_requests"] == 6
    # the probe is the same facts at every point, recorded in run.json; unedited, it keeps
    # the unedited model's greedy answers at step 0
    plan = json.loads((tmp_path / "runs" / "whole" / "run.json").read_text())["eval_plan"]
    assert plan["probe"]["indices"] and min(plan["probe"]["indices"]) >= 6 and whole["eval_plan"] == plan
    assert rows[0]["probe/locality"] == 1.0
    # MLflow: each group under its prefix, step = edits applied
    tr = Tracker(tmp_path / "runs" / "whole", None)
    tr.run_id = json.loads((tmp_path / "runs" / "whole" / "mlflow.json").read_text())["run_id"]
    steps = lambda k: sorted(s for s, _ in tr.history(k))  # noqa: E731
    assert steps("latest/efficacy_score") == steps("first/efficacy_score") == [2, 4, 6]
    assert steps("retention/paraphrase_score") == [2, 4, 6]
    assert steps("probe/neighborhood_score") == steps("perplexity") == [0, 2, 4, 6]
    assert steps("all/efficacy_score") == [0, 6] and steps("rss/driver_peak_mb") == [0, 2, 4, 6]

    # The same stream stopped after its second checkpoint, then resumed: the same plan,
    # samples and numbers.
    out = tmp_path / "runs" / "stopped"
    real = EditStream._checkpoint

    def stop(self, ckm, ed, n_batches, *a):
        real(self, ckm, ed, n_batches, *a)
        if n_batches == 2:
            raise RuntimeError("stopped")

    monkeypatch.setattr(EditStream, "_checkpoint", stop)
    with pytest.raises(RuntimeError, match="stopped"):
        EditStream(build(None, **_cfg(out, corpus)), show_progress=False).run()
    monkeypatch.setattr(EditStream, "_checkpoint", real)
    assert cli(["edit", "--resume", str(out)]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "run.json").read_text())["eval_plan"] == plan
    assert resumed["weights_hash"] == whole["weights_hash"]
    assert _same_rows(resumed["curve"], rows)

    # kedit evaluate RUN_DIR: the latest checkpoint on all its edits, the stream's numbers
    capsys.readouterr()
    assert cli(["evaluate", str(out)]) == 0
    ev = json.loads((out / "evaluations" / "all-00000006.json").read_text())
    assert ev["n_edits"] == 6 and ev["weights_hash"] == whole["weights_hash"]
    for k, v in rows[-1].items():
        if k.startswith(("all/", "probe/")) or k == "perplexity":
            assert ev["metrics"][k] == v, k
    tr = Tracker(out, None)
    tr.run_id = json.loads((out / "mlflow.json").read_text())["run_id"]
    assert sorted(s for s, _ in tr.history("all/efficacy_score")) == [0, 6, 6]   # the stream's end, and this
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tr.uri).get_run(tr.run_id)
    assert run.info.status == "FINISHED"   # left as the stream left it
    assert "all-00000006.json" in {a.path for a in MlflowClient(tr.uri).list_artifacts(tr.run_id)}


def test_kedit_evaluate_refuses_a_bad_directory(tmp_path, capsys):
    assert cli(["evaluate", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run.json" in err[0] and "not a run directory" in err[0]
    d = tmp_path / "broken"
    d.mkdir()
    (d / "run.json").write_text("{\"config\": {\"model\": \"tiny-random-llama\", \"method\": \"alphaedit\"}, ")
    assert cli(["evaluate", str(d)]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err
    (d / "run.json").write_text(json.dumps({"config": {"model": "tiny-random-llama", "method": "alphaedit"},
                                            "identity": {}}))
    assert cli(["evaluate", str(d)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no complete checkpoint" in err[0] and "checkpoints" in err[0]


ray = pytest.importorskip("ray")


@pytest.mark.slow
def test_sharded_evaluation_equals_the_driver_alone(ray_local, tmp_path, corpus):
    """A stream on 2 EditWorker replicas evaluates sharded (units dealt to the replicas);
    the driver alone, on the same checkpoint, gives exactly the same numbers, and so does
    `kedit evaluate --workers 2`."""
    from pipelines.edit_job import EditStream
    from pipelines.evaluation import evaluate_run

    out = tmp_path / "runs" / "ray"
    stream = EditStream(build(None, **_cfg(out, corpus, workers=2, eval_tokens=64)), show_progress=False)
    res = stream.run()
    assert res["replicas_in_step"] is True and stream.evaluator.shard is not None
    post = res["post"]
    assert post["rss/workers_peak_mb"] >= post["rss/workers_mb"] > 0
    local = evaluate_run(out, workers=0, show_progress=False)
    assert not local["sharded"]
    keys = [k for k in post if k.startswith(("all/", "probe/"))]
    assert len(keys) > 10
    assert {k: local["metrics"][k] for k in keys} == {k: post[k] for k in keys}
    sharded = evaluate_run(out, workers=2, show_progress=False)
    assert sharded["sharded"]
    assert {k: sharded["metrics"][k] for k in keys} == {k: post[k] for k in keys}
