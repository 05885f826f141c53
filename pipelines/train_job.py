"""`kedit train`: a trained editor (MEND; KnowledgeEditor and SERAC join through TRAINERS) for a
base model, data-parallel on Ray Train (`TorchTrainer`: gloo on CPU, nccl on GPUs), or in the
driver with `--workers 0`.

    OUT/train.json                        the identity (method, model fingerprint, data hash,
                                          resolved hyper-parameters, split) - a resume with a
                                          different one is refused, naming the fields
    OUT/checkpoints/step-00000050/        state.safetensors (editor + optimiser) + state.json
                                          (step, validation history, sha256), atomic, verified
                                          on read; a damaged one falls back to the previous
    OUT/editor/                           the artifact (kedit_core.trained), written once at the end
    OUT/mlflow.json                       the MLflow run (curves: train/*, val/*, lr/*)

Resuming after kill -9 (`kedit train --resume OUT`, or the same command again) restarts from
the latest checkpoint and ends with the parameters of an uninterrupted run: the global batch
of step s depends only on (seed, s), and the editor, optimiser and validation history are
restored exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from kedit_core.errors import BadInputError
from kedit_core.io import atomic_dir, atomic_write_text, sha256_file

log = logging.getLogger(__name__)


def _trainers() -> dict:
    from kedit_core.methods.ke.train import KETrainer
    from kedit_core.methods.mend.train import MENDTrainer
    from kedit_core.methods.serac.train import SERACTrainer

    return {"mend": MENDTrainer, "ke": KETrainer, "serac": SERACTrainer}


@dataclass(kw_only=True)
class TrainConfig:
    method: str = "mend"
    model: str = "smollm2-135m"
    data: str = ""
    limit: int | None = None
    steps: int = 1000
    batch_size: int = 10
    workers: int = 1
    val_fraction: float = 0.1
    val_every: int = 100
    val_size: int = 50
    patience: int = 20000
    max_minutes: float = 0.0
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    seed: int = 0
    out: str | None = None
    dtype: str = "fp32"
    device: str = "cpu"
    set: dict[str, Any] = field(default_factory=dict)
    tracking_uri: str | None = None
    experiment: str = "kedit-train"
    ray_address: str | None = None
    zsre_convention: str = "mend"
    skip_invalid: bool = False

    IDENTITY = ("method", "model", "limit", "batch_size", "val_fraction", "seed", "dtype", "zsre_convention")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def build_train_config(file: str | None = None, **flags) -> TrainConfig:
    """A YAML file's keys, then the flags given; names and types checked, one-line errors."""
    from pipelines.config import read_job_file

    values: dict[str, Any] = read_job_file(file, [f.name for f in fields(TrainConfig)]) if file else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    cfg = TrainConfig()
    for k, v in values.items():
        default = getattr(cfg, k)
        try:
            if k == "set":
                if not isinstance(v, dict):
                    raise TypeError
            elif isinstance(default, bool):
                v = v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")
            elif isinstance(default, int) and not isinstance(default, bool) or k == "limit":
                v = int(v)
            elif isinstance(default, float):
                v = float(v)
            elif v is not None:
                v = str(v)
        except (TypeError, ValueError):
            raise BadInputError(f"cannot read {v!r} as the type of {k}", file=file, field=k) from None
        setattr(cfg, k, v)
    where = file
    if cfg.method not in _trainers():
        raise BadInputError(f"no trainer for {cfg.method!r} (trainable: {', '.join(_trainers())})", file=where,
                            field="method")
    if not cfg.data:
        raise BadInputError("a training dataset is required (--data FILE)", file=where, field="data")
    for k in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "val_size"):
        if getattr(cfg, k) < 1:
            raise BadInputError(f"must be at least 1, got {getattr(cfg, k)}", file=where, field=k)
    for k in ("workers", "val_every", "patience", "max_minutes"):
        if getattr(cfg, k) < 0:
            raise BadInputError(f"must be 0 or more, got {getattr(cfg, k)}", file=where, field=k)
    if not 0 < cfg.val_fraction < 1:
        raise BadInputError(f"must be between 0 and 1, got {cfg.val_fraction}", file=where, field="val_fraction")
    if cfg.workers and cfg.batch_size % cfg.workers:
        raise BadInputError(f"batch_size {cfg.batch_size} is not divisible by {cfg.workers} workers", file=where,
                            field="batch_size")
    if not cfg.out:
        raise BadInputError("an output directory is required (--out DIR)", file=where, field="out")
    return cfg


# ---------------------------------------------------------------------- checkpoints
def _ckpt_dirs(out: Path) -> list[Path]:
    d = out / "checkpoints"
    return sorted(p for p in d.glob("step-*") if p.is_dir() and not p.name.startswith(".")) if d.is_dir() else []


def latest_checkpoint(out: Path, ihash: str) -> tuple[dict, dict] | None:
    """(tensors, state) of the newest verified checkpoint (a damaged one is skipped with a
    warning); a checkpoint of another identity is refused."""
    from safetensors.torch import load_file

    for d in reversed(_ckpt_dirs(out)):
        try:
            state = json.loads((d / "state.json").read_text())
            if sha256_file(d / "state.safetensors") != state["tensors_sha256"]:
                raise ValueError("tensors' sha256 differs")
            tensors = load_file(str(d / "state.safetensors"))
        except (OSError, ValueError, KeyError) as e:
            log.warning("skipping damaged checkpoint %s (%s)", d, e)
            continue
        if state.get("identity_hash") != ihash:
            raise BadInputError("checkpoint belongs to another training run", file=str(d / "state.json"),
                                field="identity_hash")
        return tensors, state
    return None


def write_checkpoint(out: Path, step: int, tensors: dict, state: dict, keep: int) -> Path:
    from safetensors.torch import save_file

    final = out / "checkpoints" / f"step-{step:08d}"
    with atomic_dir(final) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        state = {**state, "tensors_sha256": sha256_file(tmp / "state.safetensors")}
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=str))
    for old in _ckpt_dirs(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------- the work of one worker
def train_worker(conf: dict) -> dict:
    """One data-parallel worker (rank from torch.distributed; rank 0 writes checkpoints, the
    MLflow curves and the artifact). Also the whole job when run without Ray."""
    import torch

    from kedit_core.methods import get_method, make_config
    from kedit_core.models import load
    from kedit_core.training import LoopConfig, LoopState, train_loop, world

    cfg = TrainConfig(**{k: v for k, v in conf["cfg"].items()})
    out = Path(cfg.out)
    rank, w = world()
    torch.set_num_threads(max(1, conf.get("threads", 1)))
    lm = load(cfg.model, dtype=cfg.dtype, device=cfg.device)
    if lm.fingerprint() != conf["fingerprint"]:
        raise BadInputError(f"worker {rank} loaded other weights than the driver", field="model")
    mcfg = make_config(get_method(cfg.method).config_cls, lm, cfg.set)
    trainer = _trainers()[cfg.method](lm, mcfg, seed=cfg.seed)
    train, val = conf["train"], conf["val"]
    state = LoopState()
    if conf.get("resume"):
        from safetensors.torch import load_file

        d = Path(conf["resume"])
        st = json.loads((d / "state.json").read_text())
        trainer.load_state_tensors(load_file(str(d / "state.safetensors")), st["trainer"])
        state = LoopState(step=st["step"], best_val=st["best_val"], best_step=st["best_step"], history=st["history"])
    tracker = None
    if rank == 0:
        from pipelines.tracking import Tracker

        tracker = Tracker(out, cfg.tracking_uri, cfg.experiment)
        tracker.start(out.name, {**{k: v for k, v in cfg.to_dict().items() if k != "set"}, "hparams": mcfg.to_dict(),
                                 "workers": w}, {"identity_hash": conf["identity_hash"]})

    def on_metrics(step: int, row: dict) -> None:
        if tracker is not None:
            tracker.log_metrics(row, step=step)

    def on_checkpoint(st: LoopState) -> None:
        tensors, meta = trainer.state_tensors()   # every rank holds the same state
        if rank == 0:
            write_checkpoint(out, st.step, tensors, {"step": st.step, "best_val": st.best_val,
                                                     "best_step": st.best_step, "history": st.history,
                                                     "trainer": meta, "identity_hash": conf["identity_hash"]},
                             cfg.keep_checkpoints)
        if w > 1:
            torch.distributed.barrier()

    loop = LoopConfig(steps=cfg.steps, batch_size=cfg.batch_size, val_every=cfg.val_every, val_size=cfg.val_size,
                      patience=cfg.patience, checkpoint_every=cfg.checkpoint_every, seed=cfg.seed,
                      max_seconds=60.0 * cfg.max_minutes)
    import time

    t0, step0 = time.perf_counter(), state.step
    try:
        state = train_loop(trainer, train, val, loop, state, on_metrics=on_metrics, on_checkpoint=on_checkpoint,
                           progress=conf.get("progress", False))
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED", flush_s=5)
        raise
    result = {"steps": state.step, "best_val": state.best_val, "best_step": state.best_step,
              "validation": state.history[-1] if state.history else {},
              "s_per_step": (time.perf_counter() - t0) / max(1, state.step - step0)}   # this run's steps
    if rank == 0:
        from kedit_core.trained import META, save_artifact

        if not (out / "editor" / META).is_file():
            digest = save_artifact(out / "editor", cfg.method, trainer.artifact_tensors(), base_model=cfg.model,
                                   base_fingerprint=conf["fingerprint"], config=trainer.config(),
                                   data={"path": cfg.data, "sha256": conf["data_hash"]}, split=conf["split"],
                                   steps=state.step, metrics=result["validation"])
        else:
            digest = json.loads((out / "editor" / META).read_text())["digest"]
        result["editor_digest"] = digest
        atomic_write_text(out / "result.json", json.dumps(result, indent=1, default=str))
        tracker.log_artifact(out / "result.json")
        tracker.finish()
    return result


def _ray_worker(conf: dict) -> None:
    import ray.train

    res = train_worker(conf)
    ray.train.report({"steps": res["steps"]})


# ---------------------------------------------------------------------- the driver
def run_training(cfg: TrainConfig, show_progress: bool = True) -> dict:
    from kedit_core.data import load_requests
    from kedit_core.io import FileLock, LockHeld
    from kedit_core.methods import get_method, make_config
    from kedit_core.models import load
    from kedit_core.training import examples_from, split

    from pipelines.config import differences, identity_hash

    from pipelines.edit_job import data_hash as file_hash

    examples = []
    for f in cfg.data.split(","):          # several files: their examples in order
        reqs = load_requests(None if f == "builtin" else f, limit=cfg.limit, zsre_convention=cfg.zsre_convention,
                             skip_invalid=cfg.skip_invalid)
        examples += examples_from(reqs, f)
    train, val, split_rec = split(examples, cfg.val_fraction, cfg.seed)
    if len(train) < cfg.batch_size:
        raise BadInputError(f"{len(train)} training examples, fewer than batch_size {cfg.batch_size}",
                            file=cfg.data, field="batch_size")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / ".lock", blocking=False)
    try:
        lock.acquire()
    except LockHeld as e:
        raise BadInputError(f"the training directory is in use by {e.holder}", file=str(out / ".lock")) from None
    try:
        lm = load(cfg.model, dtype=cfg.dtype, device=cfg.device)
        mcfg = make_config(get_method(cfg.method).config_cls, lm, cfg.set)
        hashes = [file_hash(f) for f in cfg.data.split(",")]
        data_hash = hashes[0] if len(hashes) == 1 else hashlib.sha256(",".join(hashes).encode()).hexdigest()
        ident = json.loads(json.dumps({**{k: getattr(cfg, k) for k in TrainConfig.IDENTITY},
                                       "model_fingerprint": lm.fingerprint(), "data_hash": data_hash,
                                       "hparams": mcfg.to_dict(), "split": split_rec}, sort_keys=True, default=list))
        ihash = identity_hash(ident)
        rec_file = out / "train.json"
        if rec_file.is_file():
            old = json.loads(rec_file.read_text())
            diff = differences(old.get("identity", {}), ident)
            if diff:
                raise BadInputError(f"holds another training run ({'; '.join(diff)[:300]}); choose another --out",
                                    file=str(rec_file))
        else:
            atomic_write_text(rec_file, json.dumps({"identity": ident, "identity_hash": ihash,
                                                    "config": cfg.to_dict()}, indent=1, default=list))
        if (out / "result.json").is_file() and (out / "editor").is_dir():
            log.info("already trained: %s", out / "editor")
            return json.loads((out / "result.json").read_text())
        ck = latest_checkpoint(out, ihash)
        resume = None
        if ck is not None:
            resume = str(out / "checkpoints" / f"step-{ck[1]['step']:08d}")
            log.info("resuming training at step %d from %s", ck[1]["step"], resume)
        conf = {"cfg": cfg.to_dict(), "train": train, "val": val, "split": split_rec, "fingerprint": lm.fingerprint(),
                "data_hash": data_hash, "identity_hash": ihash, "resume": resume, "progress": show_progress}
        del lm
        if cfg.workers == 0:
            import torch

            conf["threads"] = torch.get_num_threads()
            return train_worker(conf)
        from ray.train import RunConfig as RayRunConfig
        from ray.train import ScalingConfig
        from ray.train.torch import TorchTrainer

        from pipelines.raycluster import init_ray, usable_cpus

        init_ray(cfg.ray_address)
        conf["threads"] = max(1, usable_cpus() // cfg.workers)
        trainer = TorchTrainer(_ray_worker, train_loop_config=conf,
                               scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.device == "cuda"),
                               run_config=RayRunConfig(name="ray", storage_path=str((out / "ray_train").resolve())))
        trainer.fit()
        return json.loads((out / "result.json").read_text())
    finally:
        lock.release()


__all__ = ["TrainConfig", "build_train_config", "run_training", "train_worker", "asdict"]
