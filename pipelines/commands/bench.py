"""`kedit bench`: the methods x datasets table for a model, one edit stream per cell (a Ray
task each), resumable cell by cell, an MLflow parent run with a child run per cell, and a
report (markdown, CSV, PNG)."""

from __future__ import annotations

from pathlib import Path

from pipelines.commands import add_model_args


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="fill the methods x datasets table (one stream per cell, on Ray)")
    # every option may come from a YAML job file instead (--config; the flags given win), so
    # none has a default here: BenchConfig's are applied after the merge
    p.add_argument("--config", default=None,
                   help="YAML job config with the same keys (e.g. cluster_configs/jobs/bench/*.yaml)")
    add_model_args(p)
    p.set_defaults(model=None, dtype=None, device=None)
    p.add_argument("--methods", default=None, help="comma-separated methods, e.g. memit,alphaedit,ft-m,ike")
    p.add_argument("--data", default=None, help="comma-separated dataset files (or 'builtin')")
    p.add_argument("--limit", type=int, default=None, help="first N records of each dataset (default: 100)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 10")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N edits (default 0: start and end)")
    p.add_argument("--perplexity-texts", type=int, default=None, help="default: 50")
    p.add_argument("--stats-corpus", default=None)
    p.add_argument("--set", action="append", default=[], metavar="METHOD.NAME=VALUE",
                   help="a method's hyper-parameter, e.g. --set memit.layers=4,5,6")
    p.add_argument("--cpus-per-cell", type=float, default=None, help="default: 1")
    p.add_argument("--gpus-per-cell", type=float, default=None, help="default: 0")
    p.add_argument("--no-ray", action="store_true", default=None,
                   help="run the cells one after another in this process")
    p.add_argument("--ray-address", default=None)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--experiment", default=None, help="default: kedit-bench")
    p.add_argument("--out", default=None, help="bench directory (cells/, report.md, report.csv, report.png)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the report from the cells the directory holds; run nothing")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    from kedit_core.errors import BadInputError
    from pipelines.bench_job import build_bench_config, report_bench, run_bench
    from pipelines.commands import check_output_dir

    if args.report_only:
        if not args.out:
            raise BadInputError("required with --report-only", field="--out")
        report_bench(args.out)
        Console().print(Path(args.out, "report.md").read_text())
        return 0
    sets: dict = {}
    for item in args.set:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise BadInputError(f"expected METHOD.NAME=VALUE, got {item!r}", field="--set")
        key, value = item.split("=", 1)
        method, name = key.split(".", 1)
        sets.setdefault(method.strip(), {})[name.strip()] = value.strip()
    flags = {k: getattr(args, k) for k in ("model", "methods", "data", "limit", "batch_size", "eval_every",
                                           "perplexity_texts", "out", "stats_corpus", "tracking_uri", "experiment",
                                           "ray_address", "cpus_per_cell", "gpus_per_cell", "device", "dtype")}
    flags["ray"] = False if args.no_ray else None
    cfg = build_bench_config(args.config, set=sets, **flags)
    where = args.config
    for k in ("methods", "data", "out"):
        if not getattr(cfg, k):
            raise BadInputError(f"required (--{k}, or '{k}:' in the --config file), or --report-only",
                                file=where, field=k)
    for k in ("limit", "batch_size"):
        if getattr(cfg, k) is not None and getattr(cfg, k) < 1:
            raise BadInputError(f"must be at least 1, got {getattr(cfg, k)}", file=where, field=k)
    check_output_dir(cfg.out)
    res = run_bench(cfg)
    failed = [r["cell"] for r in res["rows"] if "error" in r]
    Console().print(Path(cfg.out, "report.md").read_text())
    if failed:
        Console(stderr=True).print(f"[red]failed cells: {', '.join(failed)}[/] (run the same command again to retry)")
        return 1
    return 0
