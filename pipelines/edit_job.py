"""`kedit edit`: the sequential edit stream driver.

    read dataset -> slice into sequential batches -> for each batch: target optimisation and
    key moments spread over EditWorker actors (pipelines.workers.RayBackend), closed-form
    solve on the driver, apply, broadcast the delta to the replicas, checkpoint, evaluate
    at the cadence (MLflow, step = edits applied) -> final table, plots, summary.

A very large batch (10,000 MEMIT requests) goes through the same path: the batch is cut
into chunks of `zopt_chunk` requests, each chunk is one worker call that returns only sums
(K K^T, K R^T, float64), and the driver adds them in chunk order, so neither the driver's nor
a worker's memory grows with the batch beyond the d x d sums (kedit_core.methods.common).
The chunks' targets and the running sums are saved in RUN_DIR/partial/ as they come
(pipelines.checkpoint.BatchPartial): a batch killed mid-way resumes with only the chunks not
done and ends with the same deltas.

Workers: `workers: auto` (the default) chooses EditWorker actors and torch threads from the
resources Ray reports (pipelines.workers.plan_workers: one per GPU; on CPUs workers x threads
<= cores on every node); the choice is logged, written to RUN_DIR/worker_plan.json and MLflow,
and is not part of the run's identity.

Resume: the run directory holds run.json (the config and its identity) and checkpoints/;
re-running the same command, or `kedit edit --resume RUN_DIR`, continues after the last
complete checkpoint and ends with the same weights as an uninterrupted run (a test kills the
driver with SIGKILL and compares hashes). A different model, method, dataset or
hyper-parameter is refused, naming the difference.

Faults: MLflow is never allowed to stop or stall the stream (pipelines.tracking.Tracker
buffers while the store is down and a resume re-logs what is missing); worker actors are
waited for with timeouts and restarted a bounded number of times (pipelines.workers); a
worker failure ends the stream between checkpoints with a one-line error, and replicas that
are not in step with the driver at the end fail the command (metrics.json is still written,
marked `replicas_in_step: false`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from kedit_core.apply import read_weights, write_weights
from kedit_core.errors import BadInputError
from kedit_core.models.loader import iter_full_state
from pipelines.checkpoint import CheckpointManager, atomic_write_text, tensors_hash
from pipelines.config import RunConfig, config_identity, differences, identity, identity_hash

log = logging.getLogger(__name__)

def data_hash(path: str) -> str:
    from kedit_core.data import builtin_path

    p = builtin_path() if path == "builtin" else Path(path)
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def _rng_state() -> dict:
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state().tolist(), "python": [version, list(internal), gauss],
            "numpy": [x.tolist() if hasattr(x, "tolist") else x for x in np.random.get_state()]}


def _set_rng(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    ns = state["numpy"]
    np.random.set_state((ns[0], np.array(ns[1], dtype=np.uint32), *ns[2:]))


def _strided(n: int, limit: int | None) -> list[int]:
    """At most `limit` of range(n), evenly strided (all when limit is None)."""
    if not limit or n <= limit:
        return list(range(n))
    step = n / limit
    return [int(i * step) for i in range(limit)]


class EditStream:
    def __init__(self, cfg: RunConfig, *, show_progress: bool = True):
        if not cfg.out:
            raise BadInputError("an output directory is required", field="out")
        self.cfg, self.out, self.show_progress = cfg, Path(cfg.out), show_progress
        self.worker_plan = None

    # ---------------------------------------------------------------- set-up
    def _requests(self) -> list:
        from kedit_core.data import load_requests

        reqs = load_requests(None if self.cfg.data == "builtin" else self.cfg.data, limit=self.cfg.limit,
                             skip_invalid=self.cfg.skip_invalid, zsre_convention=self.cfg.zsre_convention)
        if not reqs:
            raise BadInputError("no edit requests to apply", file=self.cfg.data, field="data")
        return reqs

    def _dataset(self) -> list:
        """Every request of the dataset, the stream's first (the evaluation probe is drawn
        from those the stream does not edit)."""
        from kedit_core.data import load_requests

        if self.cfg.limit is None:
            return self._requests()
        return load_requests(None if self.cfg.data == "builtin" else self.cfg.data,
                             skip_invalid=self.cfg.skip_invalid, zsre_convention=self.cfg.zsre_convention)

    def _read_run_json(self) -> dict | None:
        run_json = self.out / "run.json"
        if not run_json.is_file():
            return None
        try:
            rec = json.loads(run_json.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            raise BadInputError("unreadable run record", file=str(run_json)) from e
        if not isinstance(rec, dict) or not ("config_identity" in rec or "identity" in rec):
            raise BadInputError("run record without an identity", file=str(run_json), field="identity")
        return rec

    def _refuse(self, diff: list[str]) -> None:
        raise BadInputError("this run directory holds a different stream; refusing to resume it "
                            f"({'; '.join(diff)[:400]}); choose another --out", file=str(self.out / "run.json"))

    def _check_config(self, early: dict) -> None:
        """Before any model loads: the config-level identity (identity fields, dataset hash,
        statistics corpus) against run.json, which is written now when absent. A mismatch is
        refused in seconds."""
        rec = self._read_run_json()
        if rec is None:
            atomic_write_text(self.out / "run.json", json.dumps(
                {"config_identity": early, "config": self.cfg.to_dict()}, indent=1, default=list))
            return
        old = rec.get("config_identity")
        if old is None:  # a run.json of an older kedit: compare what its full identity holds
            old = {k: v for k, v in rec["identity"].items() if k in early}
            early = {k: v for k, v in early.items() if k in old}
        diff = differences(old, early)
        if diff:
            self._refuse(diff)

    def _check_run_dir(self, ident: dict) -> None:
        """After the model loaded: the full identity (resolved hyper-parameters, model hash,
        the statistics used)."""
        rec = self._read_run_json() or {}
        if "identity" in rec:
            diff = differences(rec["identity"], ident)
            if diff:
                self._refuse(diff)
            return
        rec.update({"identity": ident, "identity_hash": identity_hash(ident), "config": self.cfg.to_dict()})
        atomic_write_text(self.out / "run.json", json.dumps(rec, indent=1, default=list))

    def _stats(self, lm) -> None:
        """Missing statistics are computed by the Ray stats job before the Editor needs them."""
        from kedit_core.methods import get_method, make_config
        from kedit_core.stats import StatsStore, open_corpus
        from pipelines.stats_job import run_stats

        method = get_method(self.cfg.method)
        mcfg = make_config(method.config_cls, lm, self.cfg.set)
        sites = [k.site for k in method.required_stats(mcfg, lm)]
        if not sites:   # a method without statistics (fine-tuning, memory methods)
            return
        corpus = open_corpus(self.cfg.stats_corpus)
        store = StatsStore()
        specs = store.specs(lm, sites, corpus, n_samples=mcfg.mom2_n_samples, max_length=mcfg.mom2_max_length)
        if all(store.load(s) is not None for s in specs.values()):   # present AND verified
            return
        workers = self.cfg.stats_workers or max(1, self.worker_plan.workers if self.worker_plan else 1)
        res = run_stats(lm, sites, corpus, n_samples=mcfg.mom2_n_samples, max_length=mcfg.mom2_max_length,
                        workers=workers, store=store, model_spec=self.cfg.model, dtype=self.cfg.dtype,
                        device=self.cfg.device, show_progress=self.show_progress,
                        zero3=self.cfg.zero3, ds_config=self.cfg.ds_config,
                        start_timeout_s=self.cfg.actor_start_timeout_s, call_timeout_s=self.cfg.actor_call_timeout_s,
                        max_restarts=self.cfg.actor_max_restarts)
        self.stats_throughput = res.get("_throughput")

    # ---------------------------------------------------------------- the stream
    def run(self) -> dict:
        """The stream, holding the run directory's lock (RUN_DIR/.lock, flock) throughout: a
        second driver on the same directory is refused at once, naming the holder; the
        kernel releases the lock of a killed driver, so a resume is never blocked."""
        from kedit_core.io import FileLock, LockHeld

        reqs = self._requests()          # bad data is refused before anything is written
        self.out.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.out / ".lock", blocking=False)
        try:
            lock.acquire()
        except LockHeld as e:
            raise BadInputError(f"the run directory is in use by {e.holder} (a driver is running on it); "
                                "wait for it or choose another --out", file=str(self.out / ".lock")) from None
        created = not (self.out / "run.json").exists()
        try:
            return self._run(reqs)
        except BadInputError:
            # refused before the stream wrote anything else (a typo in --set, a layer out of
            # range): the run.json this call created must not bind the directory to it
            if created and not (self.out / "checkpoints").exists():
                (self.out / "run.json").unlink(missing_ok=True)
            raise
        finally:
            lock.release()

    def _run(self, reqs: list) -> dict:
        from tqdm.auto import tqdm

        from kedit_core import Editor
        from kedit_core.models import load
        from kedit_core.stats import open_corpus

        cfg = self.cfg
        dhash = data_hash(cfg.data)
        from kedit_core.methods import get_method, make_config

        make_config(get_method(cfg.method).config_cls, None, cfg.set)   # names and types, before any write
        corpus = open_corpus(cfg.stats_corpus)
        corpus_ident = {"id": corpus.id, "hash": corpus.content_hash()}
        self._check_config(config_identity(cfg, data_hash=dhash, corpus=corpus_ident))
        use_ray = cfg.workers != 0
        self.worker_plan = None
        if use_ray:
            from pipelines.raycluster import init_ray
            from pipelines.workers import cluster_nodes, plan_workers

            init_ray(cfg.ray_address)
            nodes, me = cluster_nodes()
            self.worker_plan = plan_workers(nodes, requested=cfg.workers, device=cfg.device, driver_node=me)
            log.info("workers: %s", self.worker_plan.reason)
            atomic_write_text(self.out / "worker_plan.json", json.dumps(self.worker_plan.to_dict(), indent=1))
            if me in {n["id"] for n in nodes}:   # the driver runs on a node of the cluster
                torch.set_num_threads(self.worker_plan.driver_threads)
            use_ray = self.worker_plan.workers > 0
        lm = load(cfg.model, dtype=cfg.dtype, device=cfg.device, zero3=cfg.zero3, ds_config=cfg.ds_config)
        self.stats_throughput = None
        if use_ray:
            self._stats(lm)
        ed = Editor(lm, cfg.method, cfg.stats_corpus, show_progress=self.show_progress,
                    perplexity_corpus=cfg.perplexity_corpus, **cfg.set)
        self.editor = ed
        ident = identity(cfg, data_hash=dhash, hparams=ed.cfg.to_dict())
        ident["model_hash"] = lm.fingerprint()
        ident["corpus"] = corpus_ident
        ident["statistics"] = {s: {"texts": m.texts, "tokens": m.count} for s, m in sorted(ed.stats.moments.items())}
        ihash = identity_hash(ident)
        self._check_run_dir(ident)

        batches = [reqs[i:i + cfg.batch_size] for i in range(0, len(reqs), cfg.batch_size)]
        ckm = CheckpointManager(self.out, cfg.keep_checkpoints)
        ck = ckm.latest()
        rows, records, start = [], [], 0
        if ck is not None:
            if ck.state.get("identity_hash") != ihash:
                diff = differences(ck.state.get("identity", {}), ident)
                raise BadInputError(f"checkpoint belongs to a different stream ({'; '.join(diff)[:400]})",
                                    file=str(ck.path))
            self._restore(ed, ck)
            rows, records = ck.state["metrics"], ck.state["batches"]
            start = int(ck.state["cursor"]["batches"])
            log.info("resuming after %d edits (%d of %d batches) from %s", ck.n_edits, start, len(batches), ck.path)
        else:   # a fresh stream: the seed decides every random draw from here on (a resumed
            # stream restores the RNG states of its checkpoint instead)
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
            torch.manual_seed(cfg.seed)
        finished = start >= len(batches) and (self.out / "metrics.json").is_file()

        from pipelines.tracking import Tracker

        tracker = Tracker(self.out, cfg.tracking_uri, cfg.experiment, timeout_s=cfg.tracking_timeout_s,
                          flush_s=cfg.tracking_flush_s)
        self.tracker = tracker
        from kedit_core import __version__

        tracker.start(self.out.name, {**{k: v for k, v in cfg.to_dict().items() if k != "set"},
                                      "hparams": ed.cfg.to_dict(), "data_hash": dhash,
                                      "n_requests": len(reqs), "model_hash": lm.fingerprint(),
                                      "worker_plan": self.worker_plan.to_dict() if self.worker_plan else None},
                      {"kedit_version": __version__, "git_sha": git_sha(), "identity_hash": ihash,
                       **({"mlflow.parentRunId": cfg.parent_run_id} if cfg.parent_run_id else {})})
        self._relog(tracker, rows, records)
        if finished:
            log.info("stream already finished: %s", self.out / "metrics.json")
            result = json.loads((self.out / "metrics.json").read_text())
            for f in ("metrics.json", "metrics.md", "curves.png"):   # the store may have been down at the end
                if (self.out / f).is_file():
                    tracker.log_artifact(self.out / f, only_missing=True)
            tracker.finish()
            if result.get("replicas_in_step") is False:
                from pipelines.workers import WorkerFailure

                raise WorkerFailure(f"this stream ended with EditWorker replicas out of step with the driver "
                                    f"(replicas_in_step=false in {self.out / 'metrics.json'})")
            return result

        backend = None
        workers = []
        try:
            if use_ray:
                from pipelines.workers import RayBackend, start_edit_workers

                t0 = time.perf_counter()
                workers = start_edit_workers(self.worker_plan, cfg.model, cfg.dtype, cfg.device, cfg.zopt_chunk,
                                             zero3=cfg.zero3, ds_config=cfg.ds_config, fingerprint=lm.fingerprint(),
                                             max_restarts=cfg.actor_max_restarts,
                                             start_timeout_s=cfg.actor_start_timeout_s)
                backend = RayBackend(workers, lambda: read_weights(ed.lm, ed.applier.originals, "cpu"),
                                     call_timeout_s=cfg.actor_call_timeout_s, chunk=self._chunk(ed))
                if start:
                    backend.load_all(start)
                log.info("%d EditWorker replicas ready in %.1fs", len(workers), time.perf_counter() - t0)
        except BaseException:   # a worker that cannot start: the run is marked failed
            tracker.finish("FAILED", flush_s=min(cfg.tracking_flush_s, cfg.tracking_timeout_s))
            if workers:
                import ray

                for w in workers:
                    ray.kill(w)
            raise
        self.backend = backend
        from kedit_core.methods.common import LocalBackend

        compute = backend if backend is not None else LocalBackend(ed.lm, self._chunk(ed))

        try:
            if start == 0 and not rows:
                rows.append(self._evaluate(ed, reqs, batches, 0, None))
                rows[-1].update(self._benchmark_metrics(ed, reqs))   # the unedited model's, for comparison
                tracker.log_metrics(rows[-1], step=0)
            bar = tqdm(total=len(batches), initial=start, desc=f"{cfg.method} stream", unit="batch",
                       disable=not self.show_progress)
            for b in range(start, len(batches)):
                compute.log = self._partial(ed, ihash, b)
                rec = ed.edit_batch(batches[b], compute)
                rec.pop("memory", None)   # held by ed.memory, checkpointed through ed.state_dict()
                if backend is not None:
                    backend.broadcast(rec.pop("deltas"))
                else:
                    rec.pop("deltas")
                edits = sum(len(x) for x in batches[:b + 1])
                rec["edits"] = edits
                records.append(rec)
                per_batch = {"seconds_per_edit": rec["seconds_per_edit"], "z_loss_mean": rec["z_loss_mean"],
                             **{f"delta_norm/{s}": float(v) for s, v in self._cumulative_norms(ed).items()}}
                last = b == len(batches) - 1
                row = None
                if last or (cfg.eval_every and edits // cfg.eval_every > (edits - len(batches[b])) // cfg.eval_every):
                    row = self._evaluate(ed, reqs, batches, b + 1, rec)
                    rows.append(row)
                if (b + 1) % cfg.checkpoint_every == 0 or last:
                    self._checkpoint(ckm, ed, b + 1, edits, ident, ihash, rows, records)
                compute.log.clear()   # the batch is done (and checkpointed, or redone on resume)
                compute.log = None
                # One call per step: a key (seconds_per_edit is in both) is logged once per step.
                tracker.log_metrics({**(row or {}), **per_batch}, step=edits)
                bar.update(1)
                bar.set_postfix(edits=edits, s_edit=f"{rec['seconds_per_edit']:.2f}")
            bar.close()
            result = self._finish(ed, tracker, reqs, rows, records)
            tracker.finish()
            return result
        except BaseException:
            tracker.finish("FAILED", flush_s=min(cfg.tracking_flush_s, cfg.tracking_timeout_s))
            raise
        finally:
            if workers:
                import ray

                for w in workers:
                    ray.kill(w)

    # ---------------------------------------------------------------- pieces
    def _chunk(self, ed) -> int:
        """Requests per chunk of a batch: the method's own v_batch_size when set, else zopt_chunk."""
        return getattr(ed.cfg, "v_batch_size", 0) or self.cfg.zopt_chunk

    def _partial(self, ed, ihash: str, b: int):
        """The on-disk chunk log of batch b, named by the run, the batch and the weights it starts from."""
        from pipelines.checkpoint import BatchPartial

        key = {"identity_hash": ihash, "batch": b,
               "weights_hash": tensors_hash(read_weights(ed.lm, ed.applier.originals))}
        return BatchPartial(self.out, key, every_s=self.cfg.chunk_checkpoint_s)

    @staticmethod
    def _cumulative_norms(ed) -> dict[str, float]:
        cur = read_weights(ed.lm, ed.applier.originals)
        return {s: float((cur[s].float() - o.float()).norm()) for s, o in ed.applier.originals.items()}

    def _evaluator(self, ed, reqs):
        """The stream's Evaluator (pipelines.evaluation), its plan read from run.json (written
        there at the first evaluation point, so a resume uses the same probe)."""
        from pipelines.evaluation import Evaluator, plan_of_run

        backend = getattr(self, "backend", None)
        ev = getattr(self, "evaluator", None)
        if ev is None or ev.ed is not ed or ev.backend is not backend:
            dataset = self._dataset()
            self.eval_plan = plan_of_run(self.out, self.cfg, dataset, len(reqs))
            ev = self.evaluator = Evaluator(ed, reqs, dataset, self.eval_plan, backend=backend,
                                            perplexity_texts=self.cfg.perplexity_texts,
                                            where=str(self.out / "run.json"))
        return ev

    def _evaluate(self, ed, reqs, batches, n_batches: int, rec) -> dict:
        """One evaluation point (kedit_core.evaluate.plan): before any edit the unedited model
        on every request of the stream (`all`); after batch n: `latest` (batch n), `first`,
        `retention` (the stratified sample, recorded in the row), `probe`, perplexity, and at
        the end `all` (every edit). With eval_limit, `all` is also measured at every point,
        on a strided sample of at most eval_limit of the edits so far. Peak RSS of the driver
        and the workers under rss/."""
        from kedit_core.evaluate.plan import retention_sample

        cfg = self.cfg
        ev = self._evaluator(ed, reqs)
        done = sum(len(b) for b in batches[:n_batches])
        row: dict = {"edits": done, "batches": n_batches}
        t0 = time.perf_counter()
        groups: dict[str, list[int]] = {}
        if n_batches == 0:   # the unedited model on the whole stream (a sample of it with eval_limit)
            groups["all"] = _strided(len(reqs), cfg.eval_limit)
        else:
            last = len(batches[n_batches - 1])
            groups["latest"] = list(range(done - last, done))
            groups["first"] = list(range(len(batches[0])))
            sample = retention_sample(done, int(self.eval_plan["retention"]), int(self.eval_plan["seed"]))
            groups["retention"] = sample
            row["retention_sample"] = sample
            if n_batches == len(batches) or cfg.eval_limit:
                groups["all"] = _strided(done, cfg.eval_limit)
        row.update(ev.point(groups))
        row.update(ev.memory())
        if rec is not None:
            row["seconds_per_edit"] = rec["seconds_per_edit"]
        row["eval_seconds"] = time.perf_counter() - t0
        log.info("after %d edits: %s", done, ", ".join(
            f"{k}={row[k]:.3f}" for k in ("latest/efficacy_score", "first/efficacy_score", "retention/efficacy_score",
                                          "all/efficacy_score", "probe/neighborhood_score", "perplexity",
                                          "rss/driver_peak_mb", "eval_seconds") if isinstance(row.get(k), float)))
        return row

    def _checkpoint(self, ckm, ed, n_batches, edits, ident, ihash, rows, records) -> None:
        weights = read_weights(ed.lm, ed.applier.originals)
        state_tensors, method_state = ed.state_dict()
        baseline = [[k[0], k[1], k[2], v] for k, v in (ed._baseline or {}).items()]
        state = {"cursor": {"edits": edits, "batches": n_batches}, "rng": _rng_state(), "identity": ident,
                 "identity_hash": ihash, "metrics": rows, "batches": records, "baseline": baseline,
                 "weights_hash": tensors_hash(weights), "history": ed.history,
                 "method_state": method_state}
        path = ckm.save(edits, weights, state_tensors, state)
        log.info("checkpoint %s", path)

    def _restore(self, ed, ck) -> None:
        ed.applier.originals.update(read_weights(ed.lm, ck.weights))
        write_weights(ed.lm, ck.weights)
        if tensors_hash(read_weights(ed.lm, ck.weights)) != ck.state["weights_hash"]:
            raise BadInputError("restored weights do not match the checkpoint's hash", file=str(ck.path))
        if ck.state_tensors or ck.state.get("method_state"):
            ed.load_state_dict(ck.state_tensors, ck.state.get("method_state", {}))
        ed._baseline = {(c, p, a): v for c, p, a, v in ck.state["baseline"]}
        ed.history[:] = ck.state["history"]
        _set_rng(ck.state["rng"])

    def _relog(self, tracker, rows, records) -> None:
        """Metrics in the checkpoint that the run does not hold: a killed driver computed
        them but had not logged them, or the store was down and the previous driver ended
        before it answered again. Queued on the tracker, so a store that is down now gets
        them when it answers."""
        if not rows and not records:
            return
        tracker.log_missing([({"seconds_per_edit": r["seconds_per_edit"], "z_loss_mean": r.get("z_loss_mean")},
                              r["edits"]) for r in records], probe="seconds_per_edit")
        tracker.log_missing([({k: v for k, v in row.items() if k not in ("seconds_per_edit", "z_loss_mean")},
                               row["edits"]) for row in rows], probe="batches")

    def _benchmark_metrics(self, ed, reqs) -> dict:
        """Before the first and after the last edit, the metrics of the dataset's own benchmark
        beyond the per-request ones: MQuAKE's multi-hop accuracy (cases whose every rewrite is
        in the stream) and EVOKE's overfitting metrics, under `bench/`."""
        from kedit_core.evaluate.evoke import evoke_metrics, has_evoke_probes

        out: dict = {}
        if self.cfg.data != "builtin":
            from kedit_core.data import read_dataset
            from kedit_core.evaluate.multihop import evaluate_cases

            edited = set(reqs)
            cases = [c for c in read_dataset(self.cfg.data, skip_invalid=self.cfg.skip_invalid,
                                             zsre_convention=self.cfg.zsre_convention).cases
                     if c.multi_hop_questions and all(r in edited for r in c.requests)]
            if cases:
                out.update(evaluate_cases(ed.model, cases))
        if has_evoke_probes(reqs):
            out.update(evoke_metrics(ed.model, reqs))
        return {f"bench/{k}": v for k, v in out.items() if isinstance(v, (int, float))}

    def _finish(self, ed, tracker, reqs, rows, records) -> dict:
        from pipelines.tracking import plot_curves

        weights = read_weights(ed.lm, ed.applier.originals)
        n = sum(r["n"] for r in records)
        bench = self._benchmark_metrics(ed, reqs)
        if bench:
            rows[-1].update(bench)
            tracker.log_metrics(bench, step=n)
        result = {"config": self.cfg.to_dict(), "hparams": ed.cfg.to_dict(), "n_edits": n,
                  "pre": rows[0], "post": rows[-1], "curve": rows,
                  "seconds_per_edit": sum(r["seconds"] for r in records) / max(n, 1),
                  "weights_hash": tensors_hash(weights), "model_hash": ed.lm.fingerprint(),
                  "memory_digest": ed.memory.digest() if ed.memory is not None else None,
                  "memory_size": len(ed.memory) if ed.memory is not None else 0,
                  "zero3": ed.lm.zero3,
                  "perplexity_source": (ed.heldout(self.cfg.perplexity_texts).source
                                        if self.cfg.perplexity_texts else None),
                  "stats_throughput": self.stats_throughput,
                  "worker_recoveries": getattr(self.backend, "recoveries", 0) if self.backend else 0,
                  "eval_plan": (self._read_run_json() or {}).get("eval_plan"),
                  "batch_seconds": [{"edits": r["edits"], "n": r["n"], "seconds": r["seconds"]} for r in records]}
        mismatch = None
        if self.backend is not None:  # every replica must hold exactly the driver's weights
            driver = tensors_hash(dict(iter_full_state(ed.lm)))
            replicas = self.backend.gather("weights_hash")
            result["replicas_in_step"] = all(h == driver for h in replicas)
            result["replicas"] = self.backend.gather("describe")
            if not result["replicas_in_step"]:
                bad = [i for i, h in enumerate(replicas) if h != driver]
                mismatch = (f"EditWorker replica(s) {bad} hold weights that differ from the driver's "
                            f"(sha256 {driver[:12]}); the results in {self.out / 'metrics.json'} are marked "
                            "replicas_in_step=false; the checkpoints hold the driver's weights")
        atomic_write_text(self.out / "metrics.json", json.dumps(result, indent=1, default=str))
        table = self.out / "metrics.md"
        atomic_write_text(table, metrics_table(rows))
        png = plot_curves(rows, self.out / "curves.png", f"{self.cfg.method} on {self.cfg.model}")
        for f in (self.out / "metrics.json", table, png):
            tracker.log_artifact(f)
        if mismatch:
            from pipelines.workers import WorkerFailure

            raise WorkerFailure(mismatch)
        return result


# The columns of metrics.md: one line per (evaluation point, group).
TABLE_KEYS = ("n_requests", "efficacy_score", "paraphrase_score", "neighborhood_score", "score", "rewrite_acc",
              "paraphrase_acc", "neighborhood_acc", "locality", "rewrite_gen")


def metrics_table(rows: list[dict]) -> str:
    """metrics.md: the groups' main metrics at each evaluation point (every metric is in
    metrics.json), then perplexity, evaluation time and memory per point."""
    from pipelines.evaluation import GROUPS

    groups = [g for g in (*GROUPS, "probe") if any(k.startswith(g + "/") for r in rows for k in r)]
    keys = [k for k in TABLE_KEYS if any(f"{g}/{k}" in r for r in rows for g in groups)]
    fmt = lambda v: (f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}") if isinstance(v, float) else "-"  # noqa: E731
    lines = ["| edits | group | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for r in rows:
        for g in groups:
            if any(f"{g}/{k}" in r for k in keys):
                lines.append(f"| {r['edits']} | {g} | " + " | ".join(fmt(r.get(f"{g}/{k}")) for k in keys) + " |")
    extra = ["perplexity", "eval_seconds", "rss/driver_mb", "rss/driver_peak_mb", "rss/workers_mb",
             "rss/workers_peak_mb"]
    extra = [k for k in extra if any(k in r for r in rows)]
    if extra:
        lines += ["", "| edits | " + " | ".join(extra) + " |", "|---" * (len(extra) + 1) + "|"]
        lines += [f"| {r['edits']} | " + " | ".join(fmt(r.get(k)) for k in extra) + " |" for r in rows]
    return "\n".join(lines) + "\n"
