"""MLflow tracking of edit streams: the only module that imports mlflow.

One stream = one MLflow run. Its id is kept in RUN_DIR/mlflow.json so that a resumed stream
continues the same run. Metrics are logged with step = number of edits applied so far.
The default store is SQLite in the output directory's parent (no server needed; MLflow 3
refuses the old file store), with artifacts beside it in `mlartifacts/`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def default_uri(run_dir: str | Path) -> str:
    parent = Path(run_dir).resolve().parent
    return f"sqlite:///{parent / 'mlflow.db'}"


def artifact_root(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


class Tracker:
    def __init__(self, run_dir: str | Path, uri: str | None, experiment: str = "kedit"):
        import mlflow

        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.mlflow = mlflow
        self.run_dir = Path(run_dir)
        self.uri = uri or default_uri(run_dir)
        self.client = mlflow.tracking.MlflowClient(self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
            experiment, artifact_location=artifact_root(self.uri))
        self.run_id: str | None = None

    def start(self, name: str, params: dict, tags: dict) -> str:
        """Continue the run recorded in RUN_DIR/mlflow.json, or create one."""
        rec = self.run_dir / "mlflow.json"
        if rec.is_file():
            saved = json.loads(rec.read_text())
            if saved.get("uri") == self.uri:
                self.run_id = saved["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                log.info("continuing MLflow run %s", self.run_id)
                return self.run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.run_id = run.info.run_id
        from pipelines.checkpoint import atomic_write_text

        atomic_write_text(rec, json.dumps({"uri": self.uri, "run_id": self.run_id,
                                           "experiment_id": self.experiment_id}))
        flat = {k: (json.dumps(v, default=str) if isinstance(v, (dict, list, tuple)) else str(v))[:6000]
                for k, v in params.items()}
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        log.info("MLflow run %s in %s", self.run_id, self.uri)
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(_key(k), float(v), ts, step) for k, v in metrics.items()
              if isinstance(v, (int, float)) and v == v]
        for i in range(0, len(ms), 500):
            self.client.log_batch(self.run_id, metrics=ms[i:i + 500])

    def log_artifact(self, path: str | Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self.client.set_terminated(self.run_id, status=status)

    def history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, _key(key))]


def _key(k: str) -> str:
    # MLflow keys: alphanumerics, _ - . space : / only.
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in k)


def plot_curves(rows: list[dict], out_png: Path, title: str) -> Path:
    """Degradation curves (metric vs edits applied) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["edits"] for r in rows]
    for key, label in [("all/efficacy_score", "efficacy (all edits)"),
                       ("all/paraphrase_score", "paraphrase (all)"),
                       ("all/neighborhood_score", "neighbourhood (all)"),
                       ("first/efficacy_score", "efficacy (first batch)"),
                       ("latest/efficacy_score", "efficacy (latest batch)")]:
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            axes[0].plot(steps, [y if y is not None else float("nan") for y in ys], marker="o", label=label)
    axes[0].set_xlabel("edits applied"), axes[0].set_ylabel("score"), axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8), axes[0].set_title(title)
    ppl = [r.get("perplexity") for r in rows]
    if any(p is not None for p in ppl):
        axes[1].plot(steps, [p if p is not None else float("nan") for p in ppl], marker="o", color="C3")
    axes[1].set_xlabel("edits applied"), axes[1].set_ylabel("held-out perplexity")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
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
