"""Faults: an MLflow tracking server that dies mid-stream or is down for a whole stream
(real `mlflow server` processes killed by PID), a locked SQLite store, and Ray worker
processes killed repeatedly with SIGKILL (StatsWorker, EditWorker), a worker with the
wrong weights or a model path it cannot read, and replicas out of step at the end."""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from pipelines.checkpoint import CheckpointManager

ROOT = Path(__file__).resolve().parents[1]
SETS = ["layers=1,2", "v_num_grad_steps=3", "mom2_n_samples=64", "nullspace_threshold=1e-3"]
EVAL_STEPS = [0, 2, 4, 6, 8]     # --limit 8, --eval-every 2 (0: the unedited model)
EVAL_KEY = "probe/neighborhood_score"   # measured at every evaluation point (all/: the start and the end)
BATCH_STEPS = [2, 4, 6, 8]       # --batch-size 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    words = "paris tokyo rome knowledge editing model weights statistics shard merge ray actor".split()
    f = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    f.write_text("\n".join(" ".join(words[(i * 5 + j) % len(words)] for j in range(4 + i % 9))
                           for i in range(200)) + "\n")
    return f


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on a SQLite store as a child process (its own process group, so that
    killing it by its PID also ends the web workers it spawned)."""

    def __init__(self, tmp: Path, port: int):
        self.tmp, self.port, self.proc = tmp, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.tmp / 'server.db'}",
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        self.log = open(self.tmp / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.tmp, env=_env(), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.tmp / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise AssertionError("mlflow server did not start")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)   # the group of the process we started
            self.proc.wait()
        self.proc = None
        # The port is free again once nothing accepts on it.
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                time.sleep(0.1)
            except OSError:
                return


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path, _free_port())
    yield srv
    srv.kill()


def _stream_cmd(out, corpus, uri, job_yaml):
    a = [sys.executable, "-m", "pipelines.cli", "edit", "--config", str(job_yaml), "--model", "tiny-random-llama",
         "--method", "alphaedit", "--data", "builtin", "--limit", "8", "--batch-size", "2", "--workers", "0",
         "--eval-every", "2", "--perplexity-texts", "4", "--stats-corpus", str(corpus), "--out", str(out),
         "--device", "cpu", "--tracking-uri", uri]
    for s in SETS:
        a += ["--set", s]
    return a


def _job_yaml(tmp: Path, timeout_s: float, flush_s: float) -> Path:
    f = tmp / "job.yaml"
    f.write_text(f"tracking_timeout_s: {timeout_s}\ntracking_flush_s: {flush_s}\n")
    return f


def _steps(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


@pytest.mark.slow
def test_mlflow_server_killed_mid_stream_then_back(tmp_path, corpus, server):
    """The server is killed (SIGKILL) once the first checkpoint exists and restarted on the
    same port and store a few seconds later: the stream ends with exit 0, warns once for
    the outage, and the run holds every evaluation and every batch step exactly once."""
    server.start()
    out = tmp_path / "runs" / "s"
    # a 10 s call timeout: the killed server refuses at once, and a loaded machine's slow (but
    # answered) calls are not a second outage
    proc = subprocess.Popen(_stream_cmd(out, corpus, server.uri, _job_yaml(tmp_path, 10, 240)), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ck = out / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ck.is_dir() and any(p.name.startswith("ckpt-") for p in ck.iterdir())):
        assert proc.poll() is None
        time.sleep(0.02)
    server.kill()
    time.sleep(4)
    server.start()
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout[-3000:]
    assert stdout.count("is not answering") == 1, stdout[-3000:]   # once per outage, not per metric
    assert "answers again" in stdout
    assert "calls not sent" not in stdout
    rec = json.loads((out / "mlflow.json").read_text())
    assert rec["uri"] == server.uri
    assert _steps(server.uri, rec["run_id"], EVAL_KEY) == EVAL_STEPS
    assert _steps(server.uri, rec["run_id"], "seconds_per_edit") == BATCH_STEPS
    assert _steps(server.uri, rec["run_id"], "z_loss_mean") == BATCH_STEPS
    from mlflow.tracking import MlflowClient

    run = MlflowClient(server.uri).get_run(rec["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["method"] == "alphaedit"


@pytest.mark.slow
def test_mlflow_server_down_for_the_whole_stream_then_resume_relogs(tmp_path, corpus, server):
    """Nothing listens on the tracking URI for a whole stream: it still finishes (exit 0),
    says that its metrics were not sent, writes no mlflow.json; `kedit edit --resume` with
    the server up creates the run and logs every step once, and the artifacts."""
    out = tmp_path / "runs" / "down"
    job = _job_yaml(tmp_path, 10, 15)   # run.json keeps these for the resume (a loaded machine's first calls are slow)
    r = subprocess.run(_stream_cmd(out, corpus, server.uri, job), cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("is not answering") == 1
    assert "calls not sent" in r.stderr and f"kedit edit --resume {out}" in r.stderr
    assert (out / "metrics.json").is_file() and not (out / "mlflow.json").exists()

    server.start()
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "edit", "--resume", str(out)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "calls not sent" not in r.stderr
    rec = json.loads((out / "mlflow.json").read_text())
    assert _steps(server.uri, rec["run_id"], EVAL_KEY) == EVAL_STEPS
    assert _steps(server.uri, rec["run_id"], "seconds_per_edit") == BATCH_STEPS
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.uri)
    assert client.get_run(rec["run_id"]).info.status == "FINISHED"
    assert {"metrics.json", "metrics.md", "curves.png"} <= {a.path for a in client.list_artifacts(rec["run_id"])}
    # Resuming again logs nothing twice.
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "edit", "--resume", str(out)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0
    assert _steps(server.uri, rec["run_id"], EVAL_KEY) == EVAL_STEPS
    assert [a.path for a in client.list_artifacts(rec["run_id"])].count("metrics.json") == 1


@pytest.mark.slow
def test_locked_sqlite_store_does_not_stall_the_stream(tmp_path, corpus, caplog):
    """Another process holds an exclusive lock on the SQLite store from the first checkpoint
    until the stream's end: the stream still finishes, and once the lock is released the
    buffered metrics reach the run."""
    from pipelines.config import build
    from pipelines.edit_job import EditStream
    from pipelines.tracking import Tracker

    out = tmp_path / "runs" / "locked"
    db = tmp_path / "runs" / "mlflow.db"
    cfg = build(None, model="tiny-random-llama", method="alphaedit", data="builtin", limit=8, batch_size=2,
                workers=0, eval_every=2, perplexity_texts=4, stats_corpus=str(corpus), out=str(out), device="cpu",
                set={s.split("=")[0]: s.split("=")[1] for s in SETS}, tracking_timeout_s=30, tracking_flush_s=0)
    lock = {}

    def locker():
        ck = out / "checkpoints"
        while not (ck.is_dir() and any(p.name.startswith("ckpt-") for p in ck.iterdir())):
            time.sleep(0.01)
        # A separate process, as another writer would be.
        lock["proc"] = subprocess.Popen(
            [sys.executable, "-c", "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None);"
             " c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.read()", str(db)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        lock["line"] = lock["proc"].stdout.readline().strip()

    t = threading.Thread(target=locker, daemon=True)
    t.start()
    import logging

    stream = EditStream(cfg, show_progress=False)
    with caplog.at_level(logging.WARNING, logger="pipelines.tracking"):
        result = stream.run()
    t.join(timeout=60)
    assert lock.get("line") == "locked"
    assert result["n_edits"] == 8
    assert caplog.text.count("is not answering") == 1 and "calls not sent" in caplog.text
    lock["proc"].stdin.close()    # release the lock
    lock["proc"].wait(timeout=30)
    # In the CLI the driver's process has ended by now; in this test it lives on, and the call
    # that was in flight when the store locked completes once the lock is released: let it,
    # as a second driver would only start after the first one ended.
    assert stream.tracker.join(60)
    # The metrics the locked store missed are re-logged by a resume (the stream is finished).
    cfg.tracking_flush_s = 60
    EditStream(cfg, show_progress=False).run()
    tr = Tracker(out, None)
    tr.run_id = json.loads((out / "mlflow.json").read_text())["run_id"]
    assert sorted(s for s, _ in tr.history(EVAL_KEY)) == EVAL_STEPS
    assert sorted(s for s, _ in tr.history("seconds_per_edit")) == BATCH_STEPS


def test_fault_settings_in_the_job_schema(tmp_path):
    """The timeouts and the restart bound are job settings: read as numbers from YAML,
    non-positive timeouts and negative bounds refused naming the field."""
    from kedit_core.errors import BadInputError
    from pipelines.config import RunConfig, build

    d = RunConfig()
    assert (d.tracking_timeout_s, d.actor_start_timeout_s, d.actor_call_timeout_s, d.actor_max_restarts) == \
        (10.0, 600.0, 3600.0, 3)
    f = tmp_path / "job.yaml"
    f.write_text("tracking_timeout_s: 2.5\nactor_call_timeout_s: 90\nactor_max_restarts: 1\n")
    cfg = build(f)
    assert cfg.tracking_timeout_s == 2.5 and cfg.actor_call_timeout_s == 90.0 and cfg.actor_max_restarts == 1
    for bad, field in (("actor_start_timeout_s: 0", "actor_start_timeout_s"), ("actor_max_restarts: -1",
                       "actor_max_restarts"), ("tracking_timeout_s: soon", "tracking_timeout_s")):
        f.write_text(bad + "\n")
        with pytest.raises(BadInputError, match=f"job.yaml.*field '{field}'"):
            build(f)


# ------------------------------------------------------------------ Ray workers
ray = pytest.importorskip("ray")
MODEL = "tiny-random-llama"


@pytest.fixture(scope="module")
def ray_local():
    from pipelines.raycluster import init_ray

    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()


def _actor_pids(cls_name: str) -> list[int]:
    """PIDs of this test's Ray worker processes running a `cls_name` actor (the process
    title Ray gives them), only among the descendants of this process."""
    import psutil

    me = psutil.Process()
    out = []
    for p in me.children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith(f"ray::{cls_name}"):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


class Killer(threading.Thread):
    """SIGKILLs every new process of a `cls_name` actor as soon as it appears (once `when()`
    holds), up to `times` kills, until stopped."""

    def __init__(self, cls_name: str, times: int, when=lambda: True):
        super().__init__(daemon=True)
        self.cls_name, self.times, self.when = cls_name, times, when
        self.killed: list[int] = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set() and len(self.killed) < self.times:
            if self.when():
                for pid in _actor_pids(self.cls_name):
                    if pid not in self.killed and len(self.killed) < self.times:
                        os.kill(pid, signal.SIGKILL)
                        self.killed.append(pid)
            time.sleep(0.02)


@pytest.fixture(scope="module")
def stats_corpus(tmp_path_factory):
    from kedit_core.stats import SHARD_TEXTS

    words = "paris tokyo rome knowledge editing model weights statistics shard merge ray actor".split()
    f = tmp_path_factory.mktemp("stats") / "corpus.txt"
    f.write_text("\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 11))
                           for i in range(2 * SHARD_TEXTS + 40)) + "\n")   # three shards
    return f


@pytest.mark.slow
def test_stats_workers_killed_repeatedly(ray_local, stats_corpus, tmp_path):
    """A StatsWorker process SIGKILLed twice (max_restarts 3): the job finishes with exactly
    the undisturbed statistics. Killed more often than max_restarts allows: the job stops
    with a one-line WorkerFailure, the shard saved before is kept, and running it again
    finishes with exactly the undisturbed statistics."""
    import torch

    from kedit_core.models import load
    from kedit_core.stats import StatsStore, open_corpus
    from pipelines.stats_job import partials_dir, run_stats
    from pipelines.workers import WorkerFailure

    lm = load(MODEL, device="cpu")
    corpus = open_corpus(str(stats_corpus))
    sites = ["blocks.1.mlp.out", "blocks.3.mlp.out"]
    kw = dict(n_samples=600, max_length=16, model_spec=MODEL, device="cpu", show_progress=False, workers=1)
    ref = run_stats(lm, sites, corpus, store=StatsStore(tmp_path / "ref"), **kw)

    k = Killer("StatsWorker", times=2)
    k.start()
    got = run_stats(lm, sites, corpus, store=StatsStore(tmp_path / "killed"), max_restarts=3, **kw)
    k.stop.set()
    k.join()
    assert len(k.killed) == 2
    for s in sites:
        assert got[s].count == ref[s].count and torch.equal(got[s].sum, ref[s].sum)

    store = StatsStore(tmp_path / "gives-up")
    assert run_stats(lm, sites, corpus, store=store, stop_after_shards=1, **kw)["interrupted"]
    pdir = partials_dir(store, store.specs(lm, sites, corpus, n_samples=600, max_length=16))
    assert [p.name for p in pdir.glob("shard-*.safetensors")] == ["shard-00000.safetensors"]
    k = Killer("StatsWorker", times=10)
    k.start()
    with pytest.raises(WorkerFailure) as err:
        run_stats(lm, sites, corpus, store=store, max_restarts=1, **kw)
    k.stop.set()
    k.join()
    assert len(k.killed) >= 2
    msg = str(err.value)
    assert "\n" not in msg and "died" in msg and "actor_max_restarts" in msg and "resume" in msg
    assert [p.name for p in pdir.glob("shard-*.safetensors")] == ["shard-00000.safetensors"]
    done = run_stats(lm, sites, corpus, store=store, **kw)
    for s in sites:
        assert done[s].count == ref[s].count and torch.equal(done[s].sum, ref[s].sum)


def _cfg(out, corpus, workers, **extra):
    from pipelines.config import build

    return build(None, model=MODEL, method="alphaedit", data="builtin", limit=8, batch_size=2, workers=workers,
                 eval_every=4, perplexity_texts=4, stats_corpus=str(corpus), out=str(out), device="cpu",
                 set={s.split("=")[0]: s.split("=")[1] for s in SETS}, **extra)


@pytest.mark.slow
def test_edit_worker_killed_repeatedly_stops_cleanly_then_resumes_exactly(ray_local, tmp_path, corpus):
    """The EditWorker's process SIGKILLed again and again from the second batch on, more
    often than actor_max_restarts (1) allows: the stream stops with a one-line
    WorkerFailure, leaving complete checkpoints and no metrics.json; resuming it (default
    restarts) ends with exactly the weights of an undisturbed run."""
    from pipelines.edit_job import EditStream
    from pipelines.workers import WorkerFailure

    whole = EditStream(_cfg(tmp_path / "runs" / "whole", corpus, 1), show_progress=False).run()

    out = tmp_path / "runs" / "killed"
    stream = EditStream(_cfg(out, corpus, 1, actor_max_restarts=1), show_progress=False)
    # from the first complete checkpoint on (a kill during the first broadcast would stop the
    # stream before any checkpoint: a valid outcome, but not the one this test is about)
    k = Killer("EditWorker", times=10, when=lambda: getattr(stream, "backend", None) is not None
               and stream.backend.version >= 1 and bool(CheckpointManager(out).list()))
    k.start()
    with pytest.raises(WorkerFailure) as err:
        stream.run()
    k.stop.set()
    k.join()
    assert len(k.killed) >= 2
    msg = str(err.value)
    assert "\n" not in msg and "died" in msg and "actor_max_restarts" in msg
    assert not (out / "metrics.json").exists()
    latest = CheckpointManager(out).latest()
    assert latest is not None and 2 <= latest.n_edits < 8

    resumed = EditStream(_cfg(out, corpus, 1), show_progress=False).run()
    assert resumed["n_edits"] == 8 and resumed["replicas_in_step"] is True
    assert resumed["weights_hash"] == whole["weights_hash"]


def test_edit_worker_with_other_weights_or_unreadable_model_is_refused(ray_local, tmp_path):
    """An EditWorker whose weights' fingerprint differs from the driver's refuses to start
    (WorkerFailure naming both fingerprints); one that cannot read the model path raises
    the user's BadInputError (exit 2 in the CLI), not an endless restart loop."""
    from kedit_core.errors import BadInputError
    from kedit_core.models import load
    from pipelines.workers import WorkerFailure, start_edit_workers

    fp = load(MODEL, device="cpu").fingerprint()
    with pytest.raises(WorkerFailure, match=f"fingerprint {fp[:12]} .* driver has 000000000000"):
        start_edit_workers(1, MODEL, "fp32", "cpu", 8, fingerprint="0" * 64, start_timeout_s=300)
    with pytest.raises(BadInputError, match="no-such-model-dir"):
        start_edit_workers(1, str(tmp_path / "no-such-model-dir"), "fp32", "cpu", 8, start_timeout_s=300)
    workers = start_edit_workers(1, MODEL, "fp32", "cpu", 8, fingerprint=fp, start_timeout_s=300)
    assert ray.get(workers[0].ready.remote(), timeout=60) > 0
    ray.kill(workers[0])


@pytest.mark.slow
def test_replicas_out_of_step_at_the_end_fail_the_command(ray_local, tmp_path, corpus, capsys):
    """A replica changed behind the driver's back just before the end: the stream writes
    metrics.json marked replicas_in_step=false and fails (WorkerFailure); `kedit edit
    --resume` of that run directory exits 1 with the message."""
    from pipelines.cli import main as cli
    from pipelines.edit_job import EditStream
    from pipelines.workers import WorkerFailure

    out = tmp_path / "runs" / "oos"
    stream = EditStream(_cfg(out, corpus, 1), show_progress=False)
    done = {}

    def tamper():
        while getattr(stream, "backend", None) is None or stream.backend.version < 4:
            time.sleep(0.005)
        site, w = next(iter(stream.editor.applier.originals.items()))
        done["v"] = ray.get(stream.backend.workers[0].load_weights.remote(4, {site: w + 1.0}), timeout=60)

    t = threading.Thread(target=tamper, daemon=True)
    t.start()
    with pytest.raises(WorkerFailure, match="differ from the driver"):
        stream.run()
    t.join(timeout=60)
    assert done["v"] == 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["replicas_in_step"] is False and metrics["n_edits"] == 8
    capsys.readouterr()
    assert cli(["edit", "--resume", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "replicas_in_step=false" in err
