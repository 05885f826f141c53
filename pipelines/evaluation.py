"""Evaluation points of an edit stream (the plan: kedit_core.evaluate.plan), on the driver or
sharded over the stream's EditWorker replicas, and `kedit evaluate RUN_DIR`.

One evaluation point scores the union of its groups' requests once (a request of the latest
batch that is also in the retention sample is scored once), in units of at most
`eval_tokens` tokens; each group's metrics are `summarize` of its requests' values. With
workers, the units are dealt round-robin to the replicas, which must hold the driver's
weights (the weights version of every call, and the sha256 of the edited sites); the
driver computes perplexity meanwhile. A unit is computed the same way everywhere, so the
numbers are those of the driver alone (a test compares them). Memory methods (whose edited
model is more than the base model's weights) are evaluated on the driver.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

GROUPS = ("latest", "first", "retention", "all")


def _proc_status_mb() -> dict:
    """VmRSS and VmHWM of /proc/self/status in MB (empty where there is no such file)."""
    vals = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    vals[line[:5]] = int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return {}
    return vals


def rss_mb() -> dict:
    """Resident memory of this process now and at its peak so far (MB): VmRSS and VmHWM of
    /proc/self/status, else getrusage's peak for both."""
    vals = _proc_status_mb()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    now = vals.get("VmRSS", peak)
    return {"rss_mb": now, "peak_rss_mb": max(vals.get("VmHWM", peak), now)}


def reset_peak_rss() -> bool:
    """Reset this process's peak resident memory (VmHWM) to what it holds now, so that the next
    `rss_mb()["peak_rss_mb"]` is the peak of what follows (Linux >= 4.0: "5" written to
    /proc/self/clear_refs). True only where the reset is seen: VmHWM is readable afterwards and
    no higher than VmRSS then (getrusage's ru_maxrss, rss_mb's fallback, is not reset: it keeps
    the peak of threads that have exited). False where the OS cannot: the peak then stays the
    process's peak so far."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    vals = _proc_status_mb()
    # a few MB of slack: the process may grow between the write and the read
    return "VmHWM" in vals and "VmRSS" in vals and vals["VmHWM"] <= vals["VmRSS"] + 16


def make_plan(cfg, dataset: Sequence, n_stream: int) -> dict:
    """The evaluation plan of a stream, recorded in run.json once: retention sample size and
    seed, the probe (dataset indices and case ids), the unit size."""
    from kedit_core.evaluate.plan import choose_probe

    probe = choose_probe(dataset, n_stream, cfg.eval_probe, cfg.seed)
    return {"retention": cfg.eval_retention, "seed": cfg.seed, "probe": probe.to_dict(),
            "eval_tokens": cfg.eval_tokens, "eval_limit": cfg.eval_limit,
            "sample": "one edit per equal-width interval of the stream so far, lowest seeded priority "
                      "(kedit_core.evaluate.plan.retention_sample)"}


def plan_of_run(run_dir: Path, cfg, dataset: Sequence, n_stream: int) -> dict:
    """run.json's eval_plan, written now when absent (a stream of an older kedit)."""
    from kedit_core.errors import BadInputError
    from kedit_core.io import atomic_write_text

    run_json = Path(run_dir) / "run.json"
    rec = json.loads(run_json.read_text()) if run_json.is_file() else {}
    plan = rec.get("eval_plan")
    if plan is None:
        plan = make_plan(cfg, dataset, n_stream)
        if run_json.is_file():
            rec["eval_plan"] = plan
            atomic_write_text(run_json, json.dumps(rec, indent=1, default=list))
    elif not isinstance(plan, dict) or not isinstance(plan.get("probe"), dict):
        raise BadInputError("malformed evaluation plan", file=str(run_json), field="eval_plan")
    return plan


class Evaluator:
    """Evaluation points for one Editor: `point(groups)` -> {group/metric: value}. `backend`
    is the stream's RayBackend (None: no workers)."""

    def __init__(self, ed, reqs: Sequence, dataset: Sequence, plan: dict, *, backend=None,
                 perplexity_texts: int = 0, where: str = "run.json"):
        from kedit_core.evaluate.plan import probe_from_dict, probe_requests

        self.ed, self.reqs, self.plan = ed, list(reqs), plan
        self.unit_tokens = int(plan.get("eval_tokens") or 16384)
        self.perplexity_texts = perplexity_texts
        self.probe = probe_requests(probe_from_dict(plan["probe"], dataset, where), dataset)
        self.backend = backend
        self._cost: dict = {}

    @property
    def shard(self):
        """The replicas, when this point's edited model is the base model with its weights
        (no memory or router around it: replicas hold weights only). Decided at every point:
        a memory method's view is the bare model until its memory holds an entry."""
        from kedit_core.edited import ModelView

        return self.backend if self.backend is not None and type(self.ed.model) is ModelView else None

    def _costs(self, reqs: Sequence, keys: Sequence) -> list[int]:
        """Token cost of each request (`keys` name them in the cost cache)."""
        from kedit_core.evaluate.plan import request_tokens

        todo = [j for j, k in enumerate(keys) if k not in self._cost]
        if todo:
            for j, c in zip(todo, request_tokens(self.ed.lm.tokenizer, [reqs[j] for j in todo])):
                self._cost[keys[j]] = c
        return [self._cost[k] for k in keys]

    def _baseline_for(self, reqs: Sequence) -> dict | None:
        base = self.ed._baseline
        if not base:
            return None
        keys = {(r.case_id, n.prompt, n.answer) for r in reqs for n in r.neighborhood}
        return {k: base[k] for k in keys if k in base}

    def _probe_baseline(self) -> None:
        """The unedited model's greedy tokens on the probe (for probe/locality), computed once
        (the original weights swapped in) and kept in the Editor's baseline, which the
        checkpoints hold."""
        from kedit_core.editor import baseline_predictions_unedited

        if self.ed._baseline is None:
            self.ed._baseline = {}
        base = self.ed._baseline
        missing = [r for r in self.probe if any((r.case_id, n.prompt, n.answer) not in base for n in r.neighborhood)]
        if missing:
            base.update(baseline_predictions_unedited(self.ed, missing))

    def jobs(self, indices: Sequence[int], *, probe: bool) -> list[tuple[list, bool, list]]:
        """The units of one point: (requests, generation, keys); keys are stream indices, or
        ("probe", i)."""
        from kedit_core.evaluate.plan import units

        jobs = []
        idx = sorted(set(indices))
        for u in units(self._costs([self.reqs[i] for i in idx], idx), self.unit_tokens):
            jobs.append(([self.reqs[idx[j]] for j in u], True, [idx[j] for j in u]))
        if probe and self.probe:
            self._probe_baseline()
            pkeys = [("probe", i) for i in range(len(self.probe))]
            for u in units(self._costs(self.probe, pkeys), self.unit_tokens):
                jobs.append(([self.probe[j] for j in u], False, [pkeys[j] for j in u]))
        return jobs

    def run(self, jobs: list) -> dict:
        """{key: per-request values} of every unit, on the replicas when there are some."""
        from kedit_core.evaluate.metrics import request_values

        shard = self.shard
        n_req = sum(len(reqs) for reqs, _, _ in jobs)
        where = f"{len(shard.workers)} replica(s)" if shard is not None and jobs else "the driver"
        log.info("evaluation point: %d requests in %d unit(s) on %s", n_req, len(jobs), where)
        t0 = time.perf_counter()
        bar = self._bar(len(jobs))
        if shard is None or not jobs:
            model = self.ed.model
            results = []
            for reqs, gen, _ in jobs:
                results.append(request_values(model, reqs, baseline=self._baseline_for(reqs), generation=gen))
                bar.update(1)
        else:
            results = self._sharded(jobs, shard, bar)
        bar.close()
        log.info("evaluation point: %d requests scored in %.1f s", n_req, time.perf_counter() - t0)
        vals: dict = {}
        for (_, _, keys), res in zip(jobs, results):
            vals.update(zip(keys, res))
        return vals

    def _bar(self, total: int):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="evaluation units", unit="unit", leave=False,
                    disable=not getattr(self.ed, "show_progress", True) or not total)

    def _sharded(self, jobs: list, shard, bar) -> list[list[dict]]:
        """One call per unit, dealt round-robin to the replicas with a bounded number in
        flight (RayBackend.map: results in unit order, so no call's duration grows with the
        number of edits and the progress bar moves per unit); each call checks the replica's
        weights version and the sha256 of the edited sites (a replica out of step gets the
        driver's weights and the call is repeated: RayBackend._result)."""
        from kedit_core.apply import read_weights
        from pipelines.checkpoint import tensors_hash
        from pipelines.workers import DivergedReplica

        sites = sorted(self.ed.applier.originals)
        sites_hash = tensors_hash(read_weights(self.ed.lm, sites, "cpu"))
        calls = ((sites_hash, sites, [(reqs, gen)], self._baseline_for(reqs)) for reqs, gen, _ in jobs)
        out: list = []
        try:
            for (res,) in shard.map("evaluate_units", calls):
                out.append(res)
                bar.update(1)
        except DivergedReplica as e:   # left as it is: the end-of-stream check fails the run
            log.warning("%s: this point is evaluated on the driver", e)
            from kedit_core.evaluate.metrics import request_values

            return [request_values(self.ed.model, reqs, baseline=self._baseline_for(reqs), generation=gen)
                    for reqs, gen, _ in jobs]
        return out

    def point(self, groups: dict[str, Sequence[int]], *, probe: bool = True, perplexity: bool = True) -> dict:
        """Metrics of each group (stream indices), of the probe, and perplexity."""
        from kedit_core.evaluate.metrics import summarize
        from kedit_core.evaluate.plan import PROBE_KEYS

        jobs = self.jobs(sorted({i for g in groups.values() for i in g}), probe=probe)
        row: dict = {}
        want_ppl = bool(perplexity and self.perplexity_texts)
        if self.shard is not None and want_ppl:   # perplexity on the driver while the replicas score
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(1) as pool:
                fut = pool.submit(self.run, jobs)
                row["perplexity"] = self._perplexity()
                vals = fut.result()
        else:
            vals = self.run(jobs)
            if want_ppl:
                row["perplexity"] = self._perplexity()
        for name, g in groups.items():
            if len(g):
                row.update({f"{name}/{k}": v for k, v in summarize([vals[i] for i in g]).items()})
        pvals = [vals[("probe", i)] for i in range(len(self.probe))] if probe else []
        if pvals:
            row.update({f"probe/{k}": v for k, v in summarize(pvals).items() if k in PROBE_KEYS})
        return row

    def _perplexity(self) -> float:
        from kedit_core.evaluate.perplexity import perplexity

        n = self.perplexity_texts
        return perplexity(self.ed.lm, self.ed.heldout(n).texts, n_texts=n)

    def memory(self) -> dict:
        """rss/ of the driver and (the largest of) the replicas, now and at their peaks (MB)."""
        d = rss_mb()
        out = {"rss/driver_mb": d["rss_mb"], "rss/driver_peak_mb": d["peak_rss_mb"]}
        if self.backend is not None:
            ws = self.backend.gather("memory")
            out["rss/workers_mb"] = max(w["rss_mb"] for w in ws)
            out["rss/workers_peak_mb"] = max(w["peak_rss_mb"] for w in ws)
        return out


def evaluate_run(run_dir: str | Path, *, workers: int = 0, show_progress: bool = True) -> dict:
    """`kedit evaluate RUN_DIR`: the latest complete checkpoint of a run evaluated on every
    edit it holds (the `all` group), its probe and perplexity; written atomically to
    RUN_DIR/evaluations/all-<edits>.json and logged to the run's MLflow run (step = edits)
    when it has one. Refuses (one line) a directory that is not a run, has no complete
    checkpoint, is in use by a driver, or whose data or model changed."""
    from kedit_core import Editor
    from kedit_core.errors import BadInputError
    from kedit_core.io import FileLock, LockHeld, atomic_write_text
    from kedit_core.models import load
    from pipelines.checkpoint import CheckpointManager, tensors_hash
    from pipelines.commands.edit import read_run_json
    from pipelines.config import build
    from pipelines.edit_job import EditStream, data_hash

    run_dir = Path(run_dir)
    saved = read_run_json(run_dir)
    cfg = build(None, **{**saved, "out": str(run_dir), "workers": workers})
    lock = FileLock(run_dir / ".lock", blocking=False)
    try:
        lock.acquire()
    except LockHeld as e:
        raise BadInputError(f"the run directory is in use by {e.holder} (a driver is running on it); "
                            "evaluate it when the driver has stopped", file=str(run_dir / ".lock")) from None
    try:
        ck = CheckpointManager(run_dir).latest()
        if ck is None:
            raise BadInputError("no complete checkpoint to evaluate", file=str(run_dir / "checkpoints"))
        ident = ck.state.get("identity", {})
        if ident.get("data_hash") not in (None, data_hash(cfg.data)):
            raise BadInputError("the dataset file changed since the run edited it (sha256 differs)",
                                file=cfg.data, field="data")
        stream = EditStream(cfg, show_progress=show_progress)
        reqs, dataset = stream._requests(), stream._dataset()
        n = ck.n_edits
        if n > len(reqs):
            raise BadInputError(f"the checkpoint holds {n} edits, the dataset gives {len(reqs)}", file=str(ck.path))
        t0 = time.perf_counter()
        lm = load(cfg.model, dtype=cfg.dtype, device=cfg.device, zero3=cfg.zero3, ds_config=cfg.ds_config)
        if ident.get("model_hash") not in (None, lm.fingerprint()):
            raise BadInputError("the model's weights differ from those the run edited", file=str(ck.path),
                                field="model")
        ed = Editor(lm, cfg.method, cfg.stats_corpus, show_progress=show_progress,
                    perplexity_corpus=cfg.perplexity_corpus, **cfg.set)
        stream._restore(ed, ck)
        plan = plan_of_run(run_dir, cfg, dataset, len(reqs))
        backend, ws = None, []
        try:
            if workers > 0:
                from kedit_core.apply import read_weights
                from pipelines.raycluster import init_ray
                from pipelines.workers import RayBackend, start_edit_workers

                init_ray(cfg.ray_address)
                ws = start_edit_workers(workers, cfg.model, cfg.dtype, cfg.device, cfg.zopt_chunk,
                                        zero3=cfg.zero3, ds_config=cfg.ds_config, fingerprint=lm.fingerprint(),
                                        max_restarts=cfg.actor_max_restarts,
                                        start_timeout_s=cfg.actor_start_timeout_s)
                backend = RayBackend(ws, lambda: read_weights(ed.lm, ed.applier.originals, "cpu"),
                                     call_timeout_s=cfg.actor_call_timeout_s)
                backend.load_all(int(ck.state["cursor"]["batches"]))
            ev = Evaluator(ed, reqs, dataset, plan, backend=backend, perplexity_texts=cfg.perplexity_texts,
                           where=str(run_dir / "run.json"))
            metrics = ev.point({"all": range(n)})
            metrics.update(ev.memory())
        finally:
            if ws:
                import ray

                for w in ws:
                    ray.kill(w)
        weights = ck.weights
        result = {"run_dir": str(run_dir), "checkpoint": str(ck.path), "n_edits": n,
                  "weights_hash": tensors_hash(weights), "workers": workers, "sharded": backend is not None,
                  "eval_seconds": time.perf_counter() - t0, "metrics": metrics}
        out = run_dir / "evaluations" / f"all-{n:08d}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(result, indent=1, default=str))
        result["path"] = str(out)
        if (run_dir / "mlflow.json").is_file():
            from pipelines.tracking import log_to_run

            log_to_run(run_dir, {k: v for k, v in metrics.items() if not k.startswith("rss/")}, n, [out],
                       timeout_s=cfg.tracking_timeout_s, flush_s=cfg.tracking_flush_s)
        return result
    finally:
        lock.release()
