"""MLflow tracking of edit streams: the only module that imports mlflow.

One stream = one MLflow run. Its id is kept in RUN_DIR/mlflow.json so that a resumed stream
continues the same run. Metrics are logged with step = number of edits applied so far.
The default store is SQLite in the output directory's parent (no server needed; MLflow 3
refuses the old file store), with artifacts beside it in `mlartifacts/`.

The store being down, slow or locked never stops or stalls a stream: see `Tracker` (every
call goes through a bounded background queue; what could not be sent is re-logged from the
checkpoints by a resumed stream).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


def default_uri(run_dir: str | Path) -> str:
    parent = Path(run_dir).resolve().parent
    return f"sqlite:///{parent / 'mlflow.db'}"


def artifact_root(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


class _Op:
    __slots__ = ("fn", "what", "done", "result", "error")

    def __init__(self, fn, what: str):
        self.fn, self.what = fn, what
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None


class Tracker:
    """MLflow for one stream, never allowed to kill or stall it.

    Every MLflow call is an operation on an ordered queue served by one background thread.
    The caller waits at most `timeout_s` for its own operation; when the store fails or does
    not answer in time the tracker goes offline (one warning per outage), the operation stays
    queued, and later calls return at once while the thread retries the head of the queue
    every `retry_s` until the store answers again, then sends the rest in order (one line when
    it is back). A call the store refuses (an invalid value, a deleted run) is dropped with a
    warning instead of blocking the queue. An operation leaves the queue only once the store accepted it, and a
    metric keeps the timestamp it was measured at, so a retry cannot log it twice. The run
    itself is created (or continued) by the first operation, so a store that is down at
    `start()` gets the run, and RUN_DIR/mlflow.json, when it comes back. `finish()` waits at
    most `flush_s` for the queue to drain and leaves what is left to the re-logging of a
    resumed stream (`kedit edit --resume RUN_DIR`), saying so. For an HTTP server, MLflow's
    own retries are turned off and its request timeout set to timeout_s
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES / MLFLOW_HTTP_REQUEST_TIMEOUT, unless already set).
    """

    def __init__(self, run_dir: str | Path, uri: str | None, experiment: str = "kedit", *,
                 timeout_s: float = 10.0, flush_s: float = 60.0, retry_s: float = 2.0):
        self.run_dir = Path(run_dir)
        self.uri = uri or default_uri(run_dir)
        self.experiment = experiment
        self.timeout_s, self.flush_s, self.retry_s = float(timeout_s), float(flush_s), float(retry_s)
        # A dead tracking server must fail fast: MLflow's HTTP client otherwise retries
        # for minutes (7 retries with exponential back-off, 120 s per request).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(round(self.timeout_s)))))
        logging.getLogger("alembic").setLevel(logging.WARNING)
        # MLflow logs a traceback for every failed SQLite call (a locked store): the tracker
        # reports an outage once instead.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        self.client = None
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self.offline = False
        self._queue: collections.deque[_Op] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._abandon = False   # finish() gave up waiting: send nothing more
        self._thread = threading.Thread(target=self._serve, name="kedit-mlflow", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------- the queue
    def _serve(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue or self._abandon:
                    return
                op = self._queue[0]
            try:
                op.result = op.fn()
            except Exception as e:  # noqa: BLE001 - the store is down, slow or locked
                op.error = e
                if getattr(e, "error_code", None) in _REFUSED:   # an answer, not an outage: retrying cannot help
                    log.warning("MLflow store %s refused %s (%s); dropped", self.uri, op.what,
                                " ".join(str(e).split())[:200])
                    with self._cv:
                        self._queue.popleft()
                        self._cv.notify_all()
                    op.done.set()
                    continue
                self._went_offline(f"{op.what}: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
                with self._cv:
                    if not self._abandon:
                        self._cv.wait(self.retry_s)
                continue
            with self._cv:
                self._queue.popleft()
                back = self.offline and not self._queue
                if back:
                    self.offline = False
                self._cv.notify_all()
            op.error = None
            op.done.set()
            if back:
                log.warning("MLflow store %s answers again: buffered metrics sent", self.uri)

    def _went_offline(self, why: str) -> None:
        with self._cv:
            first = not self.offline
            self.offline = True
        if first:
            log.warning("MLflow store %s is not answering (%s); the stream goes on, metrics are buffered "
                        "and sent when it answers again", self.uri, why)

    def _submit(self, fn, what: str, wait: bool = True):
        """Queue `fn`; when online wait at most timeout_s for it. Returns (done, result)."""
        op = _Op(fn, what)
        with self._cv:
            self._queue.append(op)
            offline = self.offline
            self._cv.notify_all()
        if not wait or offline:
            return False, None
        if op.done.wait(self.timeout_s):
            return True, op.result
        if not self.offline:
            self._went_offline(f"{what}: no answer within {self.timeout_s:g} s")
        return False, None

    def pending(self) -> int:
        with self._cv:
            return len(self._queue)

    def flush(self, timeout_s: float) -> int:
        """Wait at most timeout_s for the queued calls to reach the store; returns how many
        are still queued."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._queue and not self._abandon and time.monotonic() < deadline:
                self._cv.wait(min(1.0, max(0.0, deadline - time.monotonic())))
            return len(self._queue)

    # ------------------------------------------------------------- the run
    def _open(self, name: str, params: dict, tags: dict) -> str:
        import mlflow

        if self.client is None:
            self.client = mlflow.tracking.MlflowClient(self.uri)
        if self.experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
                self.experiment, artifact_location=artifact_root(self.uri))
        rec = self.run_dir / "mlflow.json"
        if self.run_id is None and rec.is_file():
            saved = json.loads(rec.read_text())
            if saved.get("uri") == self.uri:
                self.client.update_run(saved["run_id"], status="RUNNING")
                self.run_id = saved["run_id"]
                log.info("continuing MLflow run %s", self.run_id)
                return self.run_id
        if self.run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
            from pipelines.checkpoint import atomic_write_text

            atomic_write_text(rec, json.dumps({"uri": self.uri, "run_id": run.info.run_id,
                                               "experiment_id": self.experiment_id}))
            self.run_id = run.info.run_id
        # Params go in after mlflow.json names the run: a retry logs the same values again.
        flat = {k: (json.dumps(v, default=str) if isinstance(v, (dict, list, tuple)) else str(v))[:6000]
                for k, v in params.items()}
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        log.info("MLflow run %s in %s", self.run_id, self.uri)
        return self.run_id

    def start(self, name: str, params: dict, tags: dict) -> str | None:
        """Continue the run recorded in RUN_DIR/mlflow.json, or create one; None when the
        store does not answer (the run is then opened when it does)."""
        _, run_id = self._submit(lambda: self._open(name, params, tags), "opening the run")
        return run_id

    def start_parent(self, name: str, params: dict, tags: dict, wait_s: float = 120.0) -> str | None:
        """`start` for a run that child runs link to (kedit bench, kedit tune): their
        `mlflow.parentRunId` needs its id, so a slow store (a new SQLite file migrates first)
        is waited for up to wait_s; None (with a warning) when it still does not answer."""
        run_id = self.start(name, params, tags)
        if run_id is None:
            self.flush(wait_s)
            run_id = self.run_id
            if run_id is None:
                log.warning("MLflow store %s did not answer: child runs are not linked to a parent run", self.uri)
        return run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(_key(k), float(v), ts, step) for k, v in metrics.items()
              if isinstance(v, (int, float)) and v == v]

        def send():
            for i in range(0, len(ms), 500):
                self.client.log_batch(self.run_id, metrics=ms[i:i + 500])

        self._submit(send, f"metrics at step {step}")

    def set_tags(self, tags: dict[str, str]) -> None:
        """Tags on the run (queued like every call)."""
        def send():
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

        self._submit(send, "tags")

    def log_missing(self, series: list[tuple[dict, int]], probe: str) -> None:
        """Log each (metrics, step) of `series` whose step the run's history of `probe` does
        not hold yet (a resumed stream's metrics that an earlier driver could not send).
        Queued like every call, so it also works when the store is down now."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)

        def send():
            logged = {m.step for m in self.client.get_metric_history(self.run_id, _key(probe))}
            ms = [Metric(_key(k), float(v), ts, step) for metrics, step in series if step not in logged
                  for k, v in metrics.items() if isinstance(v, (int, float)) and v == v]
            for i in range(0, len(ms), 500):
                self.client.log_batch(self.run_id, metrics=ms[i:i + 500])
            return len({s for _, s in series} - logged)

        done, n = self._submit(send, f"re-logging {probe}")
        if done and n:
            log.info("re-logged %d missing steps of %s", n, probe)

    def log_artifact(self, path: str | Path, *, only_missing: bool = False) -> None:
        """Upload a file to the run (with only_missing: unless the run has one of that name)."""
        def send():
            if only_missing and Path(path).name in {a.path for a in self.client.list_artifacts(self.run_id)}:
                return
            self.client.log_artifact(self.run_id, str(path))

        self._submit(send, f"artifact {Path(path).name}")

    def finish(self, status: str = "FINISHED", *, flush_s: float | None = None) -> None:
        """Mark the run finished (or failed) and flush the queue for at most flush_s (default:
        the tracker's); what is still unsent is left to `kedit edit --resume`, which re-logs
        missing metrics and artifacts."""
        flush_s = self.flush_s if flush_s is None else flush_s
        self._submit(lambda: self.client.set_terminated(self.run_id, status=status), f"run status {status}",
                     wait=False)
        self.flush(flush_s)
        with self._cv:
            left = len(self._queue)
            self._closed = True
            self._abandon = bool(left)
            self._cv.notify_all()
        if left:
            log.warning("MLflow store %s still not answering after %g s: %d calls not sent (the run's "
                        "metrics are in the checkpoints; `kedit edit --resume %s` re-logs them)",
                        self.uri, flush_s, left, self.run_dir)

    def join(self, timeout_s: float) -> bool:
        """Wait for the queue's thread to end (after `finish`; a call already in flight when
        finish() gave up, blocked in a locked or dead store, may still complete). True when
        it ended."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def history(self, key: str) -> list[tuple[int, float]]:
        """The run's logged (step, value) of `key`, once the queued calls are sent (waiting
        at most flush_s), read straight from the store (raises when it does not answer)."""
        import mlflow

        self.flush(self.flush_s)
        client = self.client or mlflow.tracking.MlflowClient(self.uri)
        return [(m.step, m.value) for m in client.get_metric_history(self.run_id, _key(key))]


_REFUSED = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS"}


def _key(k: str) -> str:
    # MLflow keys: alphanumerics, _ - . space : / only.
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in k)


def log_to_run(run_dir: str | Path, metrics: dict[str, float], step: int, artifacts=(), *,
               timeout_s: float = 10.0, flush_s: float = 60.0) -> str | None:
    """Log metrics (at `step`) and artifacts to the MLflow run a stream recorded in
    RUN_DIR/mlflow.json, leaving its status as it is (`kedit evaluate`); bounded like every
    Tracker call. Returns the run id, or None when the directory names no run."""
    rec = Path(run_dir) / "mlflow.json"
    if not rec.is_file():
        return None
    saved = json.loads(rec.read_text())
    tr = Tracker(run_dir, saved["uri"], timeout_s=timeout_s, flush_s=flush_s)

    def attach():
        import mlflow

        tr.client = mlflow.tracking.MlflowClient(tr.uri)
        tr.run_id = saved["run_id"]
        return tr.run_id

    tr._submit(attach, "attaching to the run")
    tr.log_metrics(metrics, step=step)
    for a in artifacts:
        tr.log_artifact(a)
    left = tr.flush(flush_s)
    with tr._cv:
        tr._closed, tr._abandon = True, bool(left)
        tr._cv.notify_all()
    if left:
        log.warning("MLflow store %s did not take %d calls within %g s; the results are in %s", tr.uri, left,
                    flush_s, run_dir)
    return saved["run_id"]


# The curves of plot_curves: (metric key, label, style).
CURVES = [("latest/efficacy_score", "efficacy, latest batch", "-"),
          ("first/efficacy_score", "efficacy, first batch", "-"),
          ("retention/efficacy_score", "efficacy, retention sample", "-"),
          ("retention/paraphrase_score", "paraphrase, retention sample", "--"),
          ("retention/neighborhood_score", "neighbourhood, retention sample", ":"),
          ("probe/neighborhood_score", "probe (never-edited facts)", "-."),
          ("all/efficacy_score", "efficacy, all edits", "none")]


def plot_curves(rows: list[dict], out_png: Path, title: str) -> Path:
    """Degradation curves (metric vs edits applied) as one PNG: the evaluation groups
    (pipelines.evaluation) on the left, perplexity on the right; `all` (measured at the
    start and the end) as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, label, style in CURVES:
        pts = [(r["edits"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            xs, ys = zip(*pts)
            axes[0].plot(xs, ys, linestyle=style, marker="o" if style != "none" else "s", markersize=4,
                         label=label)
    axes[0].set_xlabel("edits applied"), axes[0].set_ylabel("score"), axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7), axes[0].set_title(title)
    pts = [(r["edits"], r["perplexity"]) for r in rows if isinstance(r.get("perplexity"), (int, float))]
    if pts:
        xs, ys = zip(*pts)
        axes[1].plot(xs, ys, marker="o", color="C3")
    axes[1].set_xlabel("edits applied"), axes[1].set_ylabel("held-out perplexity")
    fig.tight_layout()
    from kedit_core.io import atomic_file

    with atomic_file(out_png) as tmp:      # a reader never sees half a PNG
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out_png


def serve_ui(uri: str, port: int = 5000) -> int:
    """`mlflow ui` on the store, bound to 127.0.0.1 (blocks until interrupted)."""
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    root = artifact_root(uri)
    if root:
        cmd += ["--default-artifact-root", root]
    print(f"MLflow UI on http://127.0.0.1:{port}  (store {uri}); Ctrl-C to stop", flush=True)
    return subprocess.call(cmd, env=dict(os.environ))
