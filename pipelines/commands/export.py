"""`kedit export RUN_DIR --to DIR`: the edited model of a run's last complete checkpoint in
HF format (or, with --deltas-only, deltas.safetensors + config.json)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write the edited model (or its deltas) of a run")
    p.add_argument("run_dir")
    p.add_argument("--to", required=True, help="output directory")
    p.add_argument("--deltas-only", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    import torch

    from kedit_core.apply import save_deltas
    from kedit_core.errors import BadInputError
    from kedit_core.models import load
    from kedit_core.types import WeightDelta
    from pipelines.checkpoint import CheckpointManager

    run_json = Path(args.run_dir) / "run.json"
    if not run_json.is_file():
        raise BadInputError("not a run directory (no run.json)", file=str(run_json))
    cfg = json.loads(run_json.read_text())["config"]
    ck = CheckpointManager(args.run_dir).latest()
    if ck is None:
        raise BadInputError("no complete checkpoint to export", file=str(Path(args.run_dir) / "checkpoints"))
    lm = load(cfg["model"], dtype=cfg.get("dtype", "fp32"), device="cpu")
    if ck.state["identity"].get("model_hash") not in (None, lm.fingerprint()):
        raise BadInputError("the model's weights differ from those the run edited", file=str(ck.path),
                            field="model")
    out = Path(args.to)
    arch, model = lm.arch, lm.model
    deltas = []
    with torch.no_grad():
        for site, w in ck.weights.items():
            p = arch.weight(model, site)
            deltas.append(WeightDelta(site, dense=arch.as_out_in(w.float() - p.detach().float()).contiguous()))
            p.copy_(w.to(p.dtype))
    meta = {"model": cfg["model"], "model_hash": lm.fingerprint(), "method": cfg["method"],
            "n_edits": ck.n_edits, "checkpoint": str(ck.path)}
    save_deltas(out, deltas, meta)
    if not args.deltas_only:
        model.save_pretrained(out / "model", safe_serialization=True)
        lm.tokenizer.save_pretrained(out / "model")
    print(f"exported {ck.n_edits} edits from {ck.path} to {out}" + ("" if args.deltas_only else " (deltas + model/)"))
    return 0
