"""`kedit bench`: the methods x datasets table for a model, one edit stream per cell (a Ray
task each), resumable cell by cell, an MLflow parent run with a child run per cell, and a
report (markdown, CSV, PNG)."""

from __future__ import annotations

from pathlib import Path

from pipelines.commands import add_model_args


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="fill the methods x datasets table (one stream per cell, on Ray)")
    add_model_args(p)
    p.add_argument("--methods", default=None, help="comma-separated methods, e.g. memit,alphaedit,ft-m,ike")
    p.add_argument("--data", default=None, help="comma-separated dataset files (or 'builtin')")
    p.add_argument("--limit", type=int, default=100, help="first N records of each dataset (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N edits (0: start and end)")
    p.add_argument("--perplexity-texts", type=int, default=50)
    p.add_argument("--stats-corpus", default=None)
    p.add_argument("--set", action="append", default=[], metavar="METHOD.NAME=VALUE",
                   help="a method's hyper-parameter, e.g. --set memit.layers=4,5,6")
    p.add_argument("--cpus-per-cell", type=float, default=1.0)
    p.add_argument("--gpus-per-cell", type=float, default=0.0)
    p.add_argument("--no-ray", action="store_true", help="run the cells one after another in this process")
    p.add_argument("--ray-address", default=None)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--experiment", default="kedit-bench")
    p.add_argument("--out", required=True, help="bench directory (cells/, report.md, report.csv, report.png)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the report from the cells the directory holds; run nothing")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    from kedit_core.errors import BadInputError
    from pipelines.bench_job import BenchConfig, report_bench, run_bench
    from pipelines.commands import check_output_dir

    if args.report_only:
        report_bench(args.out)
        Console().print(Path(args.out, "report.md").read_text())
        return 0
    for k in ("methods", "data"):
        if not getattr(args, k):
            raise BadInputError("required (or --report-only)", field=f"--{k}")

    for k in ("limit", "batch_size"):
        if getattr(args, k) < 1:
            raise BadInputError(f"must be at least 1, got {getattr(args, k)}", field=k)
    sets: dict = {}
    for item in args.set:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise BadInputError(f"expected METHOD.NAME=VALUE, got {item!r}", field="--set")
        key, value = item.split("=", 1)
        method, name = key.split(".", 1)
        sets.setdefault(method.strip(), {})[name.strip()] = value.strip()
    check_output_dir(args.out)
    cfg = BenchConfig(model=args.model, methods=[m.strip() for m in args.methods.split(",") if m.strip()],
                      data=[d.strip() for d in args.data.split(",") if d.strip()], limit=args.limit,
                      batch_size=args.batch_size, eval_every=args.eval_every, perplexity_texts=args.perplexity_texts,
                      out=args.out, stats_corpus=args.stats_corpus, set=sets, tracking_uri=args.tracking_uri,
                      experiment=args.experiment, ray=not args.no_ray, ray_address=args.ray_address,
                      cpus_per_cell=args.cpus_per_cell, gpus_per_cell=args.gpus_per_cell, device=args.device,
                      dtype=args.dtype)
    res = run_bench(cfg)
    failed = [r["cell"] for r in res["rows"] if "error" in r]
    Console().print(Path(args.out, "report.md").read_text())
    if failed:
        Console(stderr=True).print(f"[red]failed cells: {', '.join(failed)}[/] (run the same command again to retry)")
        return 1
    return 0
