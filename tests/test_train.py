"""`kedit train` (pipelines/train_job.py): data-parallel on Ray Train reaches the parameters
of one worker with the same global batch; kill -9 mid-training then resume ends with the
parameters of an uninterrupted run; the curves read back from MLflow; the artifact it writes
drives `kedit edit --method mend --editor DIR`; bad input is refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]


def argv(out, *extra, workers=0, steps=4):
    return ["train", "--model", "tiny-random-llama", "--data", "builtin", "--steps", str(steps), "--batch-size", "4",
            "--workers", str(workers), "--val-every", "2", "--val-size", "4", "--checkpoint-every", "1",
            "--out", str(out), "--device", "cpu", "--set", "rank=8", "--set", "lr=1e-3", "--set", "lr_lr=1e-3", *extra]


def editor_tensors(out) -> dict:
    return load_file(str(Path(out) / "editor" / "editor.safetensors"))


def assert_same(a: dict, b: dict, exact: bool) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "single"
    assert cli(argv(out)) == 0
    return out


@pytest.mark.slow
def test_two_ray_workers_reach_the_parameters_of_one(single, tmp_path):
    ray = pytest.importorskip("ray")
    try:
        assert cli(argv(tmp_path / "two", workers=2)) == 0
    finally:
        ray.shutdown()
    a, b = editor_tensors(single), editor_tensors(tmp_path / "two")
    moved = [k for k in a if k.endswith(".u") and float(a[k].abs().max()) > 0]
    assert moved, "training did not move the editor"
    assert_same(a, b, exact=False)
    ra = json.loads((single / "result.json").read_text())
    rb = json.loads((tmp_path / "two" / "result.json").read_text())
    assert ra["steps"] == rb["steps"] == 4
    assert abs(ra["best_val"] - rb["best_val"]) < 1e-4


def test_sigkill_mid_training_then_resume_is_exact_and_curves_read_back(single, tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT))   # the same thread count as this process: same sums
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *argv(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = out / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ck.is_dir() and any(p.name == "step-00000002" for p in ck.iterdir())):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "editor").exists() and (out / "checkpoints" / "step-00000002").is_dir()
    assert cli(["train", "--resume", str(out)]) == 0
    assert_same(editor_tensors(single), editor_tensors(out), exact=True)
    art = json.loads((out / "editor" / "editor.json").read_text())
    assert art["steps"] == 4 and art["split"]["n_val"] > 0 and art["data"]["sha256"]

    from mlflow.tracking import MlflowClient

    rec = json.loads((out / "mlflow.json").read_text())
    client = MlflowClient(rec["uri"])
    steps = lambda k: sorted({m.step for m in client.get_metric_history(rec["run_id"], k)})  # noqa: E731
    assert steps("train/loss") == [1, 2, 3, 4]
    assert steps("val/loss") == [2, 4]
    assert client.get_run(rec["run_id"]).info.status == "FINISHED"


def test_editor_artifact_drives_an_edit_stream(single, tmp_path):
    out = tmp_path / "stream"
    assert cli(["edit", "--model", "tiny-random-llama", "--method", "mend", "--editor", str(single),
                "--data", "builtin", "--limit", "4", "--batch-size", "2", "--workers", "0", "--eval-every", "0",
                "--perplexity-texts", "0", "--out", str(out), "--device", "cpu"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_edits"] == 4 and m["weights_hash"]
    ck = sorted((out / "checkpoints").iterdir())[-1]
    assert json.loads((ck / "state.json").read_text())["method_state"]["method"]["editor_digest"] == \
        json.loads((single / "editor" / "editor.json").read_text())["digest"]


def test_bad_training_input_is_refused(single, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"case_id": 1, "prompt": "A is in", "subject": "A", "target_new": "B",
                                "ground_truth": "C"}]))
    assert cli(argv(tmp_path / "b1") [:4] + [str(bad)] + argv(tmp_path / "b1")[5:]) == 2
    assert "paraphrase" in capsys.readouterr().err
    assert cli(argv(tmp_path / "b2", "--batch-size", "3", workers=2)) == 2
    assert "divisible" in capsys.readouterr().err
    # a different run in an existing training directory: refused, nothing touched
    before = (single / "train.json").read_bytes()
    assert cli(argv(single, "--set", "rank=4")) == 2
    assert "another training run" in capsys.readouterr().err
    assert (single / "train.json").read_bytes() == before and (single / "editor" / "editor.json").is_file()


def test_shipped_training_jobs_validate():
    from pipelines.train_job import build_train_config

    jobs = sorted((ROOT / "cluster_configs" / "jobs" / "train").glob("*.yaml"))
    assert {j.stem for j in jobs} >= {"mend_smollm2", "mend_llama3_8b"}
    for j in jobs:
        cfg = build_train_config(str(j))
        assert cfg.method in ("mend", "ke", "serac") and cfg.out and cfg.batch_size % max(1, cfg.workers) == 0
