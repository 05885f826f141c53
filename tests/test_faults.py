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
    proc = subprocess.Popen(_stream_cmd(out, corpus, server.uri, _job_yaml(tmp_path, 3, 240)), cwd=ROOT, env=_env(),
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
    assert _steps(server.uri, rec["run_id"], "all/efficacy_score") == EVAL_STEPS
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
    assert _steps(server.uri, rec["run_id"], "all/efficacy_score") == EVAL_STEPS
    assert _steps(server.uri, rec["run_id"], "seconds_per_edit") == BATCH_STEPS
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.uri)
    assert client.get_run(rec["run_id"]).info.status == "FINISHED"
    assert {"metrics.json", "metrics.md", "curves.png"} <= {a.path for a in client.list_artifacts(rec["run_id"])}
    # Resuming again logs nothing twice.
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "edit", "--resume", str(out)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0
    assert _steps(server.uri, rec["run_id"], "all/efficacy_score") == EVAL_STEPS
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

    with caplog.at_level(logging.WARNING, logger="pipelines.tracking"):
        result = EditStream(cfg, show_progress=False).run()
    t.join(timeout=60)
    assert lock.get("line") == "locked"
    assert result["n_edits"] == 8
    assert caplog.text.count("is not answering") == 1 and "calls not sent" in caplog.text
    lock["proc"].stdin.close()    # release the lock
    lock["proc"].wait(timeout=30)
    # The metrics the locked store missed are re-logged by a resume (the stream is finished).
    cfg.tracking_flush_s = 60
    EditStream(cfg, show_progress=False).run()
    tr = Tracker(out, None)
    tr.run_id = json.loads((out / "mlflow.json").read_text())["run_id"]
    assert sorted(s for s, _ in tr.history("all/efficacy_score")) == EVAL_STEPS
    assert sorted(s for s, _ in tr.history("seconds_per_edit")) == BATCH_STEPS
