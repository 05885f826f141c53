"""`kedit edit`: a sequential edit stream on Ray with checkpoints and MLflow curves
(pipelines/edit_job.py). Options come from --config FILE.yaml and flags (flags win)."""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("edit", help="run (or resume) an edit stream on Ray with checkpoints and MLflow")
    p.add_argument("--config", default=None, help="YAML job config with the same keys as the flags")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the stream in RUN_DIR (its run.json supplies the config)")
    p.add_argument("--model", default=None)
    p.add_argument("--method", default=None, help="rome, memit or alphaedit")
    p.add_argument("--data", default=None, help="edit dataset file, or 'builtin'")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", default=None,
                   help="EditWorker actors: auto (the default: one per GPU, else cores / threads from what Ray "
                        "reports) or N (0: edit in the driver)")
    p.add_argument("--zopt-chunk", type=int, default=None,
                   help="requests per chunk of a batch: one worker call, returning only d x d sums (default 64)")
    p.add_argument("--chunk-checkpoint-s", type=float, default=None,
                   help="a batch in progress saves its chunk sums at most this often (default 60; 0: every chunk)")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N edits")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="also evaluate all edits so far at every point, on at most N of them (O(edits) per point; "
                        "by default all edits are evaluated at the start and the end, `kedit evaluate` on demand)")
    p.add_argument("--eval-retention", type=int, default=None,
                   help="retention sample: N past edits, stratified over the stream (default 500)")
    p.add_argument("--eval-probe", type=int, default=None,
                   help="probe: N records the stream never edits (default 100; 0: none)")
    p.add_argument("--eval-tokens", type=int, default=None,
                   help="tokens per evaluation unit, the grain of sharding evaluation over workers (default 16384)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint every k batches")
    p.add_argument("--keep-checkpoints", type=int, default=None)
    p.add_argument("--out", default=None, help="run directory (checkpoints, metrics, run.json)")
    p.add_argument("--stats-corpus", default=None)
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default=None)
    p.add_argument("--editor", default=None, metavar="DIR",
                   help="trained editor for MEND, KnowledgeEditor or SERAC (from `kedit train`): --set editor=DIR")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="method hyper-parameter")
    p.add_argument("--perplexity-texts", type=int, default=None)
    p.add_argument("--perplexity-corpus", default=None,
                   help="held-out perplexity texts (default: the statistics corpus after the texts the "
                        "statistics used; the other built-in corpus when too few remain)")
    p.add_argument("--zsre-convention", default=None, choices=["mend", "memit"],
                   help="zsRE files: 'mend' (alt is the new target; default) or 'memit' (answers[0])")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: sqlite in the run dir's parent)")
    p.add_argument("--experiment", default=None)
    p.add_argument("--ray-address", default=None)
    p.add_argument("--skip-invalid", action="store_true", default=None)
    p.add_argument("--tracking-timeout-s", type=float, default=None,
                   help="wait at most this for one MLflow call before buffering it (default 10)")
    p.add_argument("--tracking-flush-s", type=float, default=None,
                   help="at the end, wait at most this for buffered MLflow calls (default 60)")
    p.add_argument("--actor-start-timeout-s", type=float, default=None,
                   help="a Ray actor must have loaded its model within this (default 600)")
    p.add_argument("--actor-call-timeout-s", type=float, default=None,
                   help="one actor call (a batch's share) must finish within this (default 3600)")
    p.add_argument("--actor-max-restarts", type=int, default=None,
                   help="a worker process that dies more often than this is given up (default 3)")
    p.add_argument("--strict", action="store_true", default=None,
                   help="refuse duplicate case ids in the dataset (by default a warning)")
    p.add_argument("--zero3", action="store_true", default=None,
                   help="load the driver's and the workers' models partitioned by DeepSpeed ZeRO-3 "
                        "(pip install 'kedit[deepspeed]'), for a replica larger than one GPU")
    p.add_argument("--ds-config", default=None, metavar="FILE.json",
                   help="DeepSpeed config for --zero3 (default: stage 3, parameters offloaded to CPU on GPUs)")
    p.set_defaults(func=run)


def read_run_json(run_dir: str | Path) -> dict:
    """The saved config of a run directory's run.json, refusing (one line naming the file
    and field) a missing, truncated, corrupt or foreign record."""
    from kedit_core.errors import BadInputError
    from pipelines.config import FIELDS

    run_json = Path(run_dir) / "run.json"
    if not run_json.is_file():
        raise BadInputError("not a run directory (no run.json)", file=str(run_json))
    try:
        record = json.loads(run_json.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise BadInputError(f"corrupt run record (not UTF-8 at byte offset {e.start})", file=str(run_json)) from e
    except json.JSONDecodeError as e:
        raise BadInputError(f"corrupt or truncated run record (line {e.lineno} column {e.colno}: {e.msg})",
                            file=str(run_json)) from e
    if not isinstance(record, dict):
        raise BadInputError("corrupt run record (expected a JSON object)", file=str(run_json))
    for key in ("config", "identity"):
        if not isinstance(record.get(key), dict):
            raise BadInputError("corrupt run record: missing or not an object", file=str(run_json), field=key)
    cfg = record["config"]
    for key in cfg:
        if key not in FIELDS:
            raise BadInputError("corrupt run record: unknown option", file=str(run_json), field=f"config.{key}")
    for key in ("model", "method"):
        if not isinstance(cfg.get(key), str):
            raise BadInputError("corrupt run record: missing or not a string", file=str(run_json),
                                field=f"config.{key}")
    return cfg


def config_from_args(args):
    from kedit_core.errors import BadInputError
    from pipelines.commands.edit_local import parse_overrides
    from pipelines.config import RunConfig, build, load_yaml

    flags = {k: getattr(args, k) for k in ("model", "method", "data", "limit", "batch_size", "workers",
                                           "eval_every", "eval_limit", "eval_retention", "eval_probe",
                                           "eval_tokens", "checkpoint_every", "keep_checkpoints",
                                           "out", "stats_corpus", "dtype", "device", "perplexity_texts",
                                           "perplexity_corpus", "zsre_convention",
                                           "tracking_uri", "experiment", "ray_address", "skip_invalid",
                                           "strict", "zero3", "ds_config", "tracking_timeout_s", "tracking_flush_s",
                                           "actor_start_timeout_s", "actor_call_timeout_s", "actor_max_restarts",
                                           "zopt_chunk", "chunk_checkpoint_s")}
    file = args.config
    if args.resume:
        saved = read_run_json(args.resume)
        if file:
            # A config given with --resume must describe the same stream: its identity
            # fields must equal the saved ones (other options, e.g. workers, may change).
            from_file = load_yaml(file)
            base = build(None, **saved)
            for k in RunConfig.IDENTITY:
                if k in from_file and from_file[k] != getattr(base, k):
                    raise BadInputError(
                        f"differs from the run being resumed ({getattr(base, k)!r} in "
                        f"{Path(args.resume) / 'run.json'}, {from_file[k]!r} here); resume without "
                        "--config or choose another --out", file=str(file), field=k)
            saved = {**saved, **{k: v for k, v in from_file.items() if k not in RunConfig.IDENTITY}}
        given = {k: v for k, v in flags.items() if v is not None}
        flags = {**saved, **given, "out": str(args.resume)}
        if args.set:
            flags["set"] = parse_overrides(args.set)
        return build(None, **flags)
    if args.set:
        flags["set"] = {**(build(file).set if file else {}), **parse_overrides(args.set)}
    return build(file, **flags)


def summary(console, result: dict, out: Path) -> None:
    pre, post = result["pre"], result["post"]
    console.print(f"\n[bold]{result['n_edits']} edits[/] ({result['config']['method']} on {result['config']['model']})")
    for k in ("all/efficacy_score", "all/paraphrase_score", "all/neighborhood_score", "all/rewrite_gen",
              "all/paraphrase_gen", "perplexity"):
        if k in post:
            console.print(f"  {k:<26} {pre.get(k, float('nan')):8.3f} -> {post[k]:8.3f}")
    console.print(f"  seconds per edit           {result['seconds_per_edit']:8.2f}")
    console.print(f"  final weights sha256       {result['weights_hash'][:16]}")
    console.print(f"wrote {out / 'metrics.json'}, {out / 'metrics.md'}, {out / 'curves.png'}")


def run(args) -> int:
    if getattr(args, "editor", None):
        args.set = [*args.set, f"editor={args.editor}"]
    from rich.console import Console

    from pipelines.edit_job import EditStream

    from kedit_core.data import read_dataset
    from kedit_core.errors import BadInputError
    from pipelines.commands import check_output_dir

    cfg = config_from_args(args)
    if not cfg.out:
        raise BadInputError("an output directory is required (--out)", field="out")
    check_output_dir(cfg.out)
    if cfg.stats_corpus:  # fail before Ray and the model start (texts too short: found later)
        from kedit_core.stats import open_corpus
        from kedit_core.stats.corpus import check_has_text

        check_has_text(open_corpus(cfg.stats_corpus))
    if cfg.strict and cfg.data != "builtin":
        read_dataset(cfg.data, skip_invalid=cfg.skip_invalid, strict=True)  # refuses duplicate case ids
    result = EditStream(cfg).run()
    summary(Console(), result, Path(cfg.out))
    return 0
