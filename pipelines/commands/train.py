"""`kedit train`: train an editor (MEND) for a base model on Ray Train (pipelines/train_job.py);
the result is an artifact that `kedit edit --method mend --editor DIR` applies."""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train an editor (MEND, KnowledgeEditor, SERAC) for a base model on Ray Train")
    p.add_argument("--config", default=None, help="YAML job config with the same keys as the flags")
    p.add_argument("--resume", default=None, metavar="OUT", help="continue the training in OUT (its train.json)")
    p.add_argument("--method", default=None, help="mend, ke or serac")
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=None, help="training edits (CounterFact / zsRE / KnowEdit file; several: a,b)")
    p.add_argument("--limit", type=int, default=None, help="first N records only")
    p.add_argument("--skip-invalid", action="store_true", default=None,
                   help="skip invalid records (with a warning naming each) instead of failing")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=None, help="edits per optimiser step, over all workers")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (0: train in this process)")
    p.add_argument("--val-fraction", type=float, default=None)
    p.add_argument("--val-every", type=int, default=None)
    p.add_argument("--val-size", type=int, default=None)
    p.add_argument("--patience", type=int, default=None, help="early stop after N steps without a better val loss")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this much training time (a checkpoint, then the editor); 0: no limit")
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--keep-checkpoints", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default=None, help="training directory (checkpoints, editor/, result.json)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default=None)
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="editor hyper-parameter")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--experiment", default=None)
    p.add_argument("--ray-address", default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    from kedit_core.errors import BadInputError
    from pipelines.commands.edit_local import parse_overrides
    from pipelines.train_job import build_train_config, run_training

    flags = {k: getattr(args, k) for k in ("method", "model", "data", "limit", "steps", "batch_size", "workers",
                                           "val_fraction", "val_every", "val_size", "patience", "max_minutes", "checkpoint_every",
                                           "keep_checkpoints", "seed", "out", "dtype", "device", "tracking_uri",
                                           "experiment", "ray_address", "skip_invalid")}
    if args.set:
        flags["set"] = parse_overrides(args.set)
    config = args.config
    if args.resume:
        rec = Path(args.resume) / "train.json"
        if not rec.is_file():
            raise BadInputError("not a training directory (no train.json)", file=str(rec))
        saved = json.loads(rec.read_text())["config"]
        saved.update({k: v for k, v in flags.items()
                      if v is not None and k in ("workers", "ray_address", "device", "max_minutes")})
        flags = saved
        config = None
    cfg = build_train_config(config, **flags)
    res = run_training(cfg)
    c = Console()
    c.print(f"[bold]{cfg.method}[/] editor for {cfg.model}: {res['steps']} steps, best validation loss "
            f"{res['best_val']:.4f} at step {res['best_step']}")
    for k, v in sorted(res.get("validation", {}).items()):
        c.print(f"  val {k:<12} {v:.4f}")
    c.print(f"editor: {Path(cfg.out) / 'editor'} (digest {res.get('editor_digest', '')[:12]})")
    return 0
