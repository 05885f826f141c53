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
    from pathlib import Path

    import torch

    from kedit_core.apply import save_deltas
    from kedit_core.errors import BadInputError
    from kedit_core.models import load
    from kedit_core.types import WeightDelta
    from pipelines.checkpoint import CheckpointManager

    from pipelines.commands import check_output_dir
    from pipelines.commands.edit import read_run_json

    cfg = read_run_json(args.run_dir)
    out = Path(args.to)
    check_output_dir(out, field="to")
    ck = CheckpointManager(args.run_dir).latest()
    if ck is None:
        raise BadInputError("no complete checkpoint to export", file=str(Path(args.run_dir) / "checkpoints"))
    lm = load(cfg["model"], dtype=cfg.get("dtype", "fp32"), device="cpu")
    if ck.state["identity"].get("model_hash") not in (None, lm.fingerprint()):
        raise BadInputError("the model's weights differ from those the run edited", file=str(ck.path),
                            field="model")
    arch, model = lm.arch, lm.model
    deltas = []
    with torch.no_grad():
        for site, w in ck.weights.items():
            p = arch.weight(model, site)
            deltas.append(WeightDelta(site, dense=arch.as_out_in(w.float() - p.detach().float()).contiguous()))
            p.copy_(w.to(p.dtype))
    meta = {"model": cfg["model"], "model_hash": lm.fingerprint(), "method": cfg["method"],
            "n_edits": ck.n_edits, "checkpoint": str(ck.path)}
    existed = out.exists()
    try:
        save_deltas(out, deltas, meta)
        if not args.deltas_only:
            from kedit_core.editor import save_model

            save_model(lm, out / "model")     # atomic: a complete export or none
    except Exception as e:
        # A full or read-only disk: safetensors reports it as its own error type, not OSError.
        text = f"{type(e).__name__}: {e}"
        disk = isinstance(e, OSError) or any(m in text for m in (
            "No space left", "StorageFull", "os error 28", "Read-only file system", "os error 30",
            "Permission denied", "os error 13", "Disk quota"))
        if not disk:
            raise
        if not existed:  # remove the partial export this command created (never older files)
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[:160]
        raise BadInputError(f"cannot write the export ({reason})", file=str(out), field="to") from e
    print(f"exported {ck.n_edits} edits from {ck.path} to {out}" + ("" if args.deltas_only else " (deltas + model/)"))
    return 0
