"""`kedit tune`: a method's hyper-parameters for a model, chosen on a validation split by Ray
Tune (one edit stream per trial), resumable, an MLflow parent run with a child run per trial,
OUT/best.json, report.md and report.png; optionally the chosen and the default
hyper-parameters reported on test records."""

from __future__ import annotations

from pathlib import Path

from pipelines.commands import add_model_args


def add_parser(sub) -> None:
    p = sub.add_parser("tune", help="choose a method's hyper-parameters on a validation split (Ray Tune)")
    add_model_args(p)
    p.add_argument("--method", default="alphaedit")
    p.add_argument("--data", required=True, help="validation file (never the records a benchmark reports)")
    p.add_argument("--limit", type=int, default=40, help="validation records per trial (default: %(default)s)")
    p.add_argument("--split-seed", type=int, default=None,
                   help="draw the validation records with this seed (default: the first --limit)")
    p.add_argument("--exclude", action="append", default=[], metavar="FILE",
                   help="drop the records this file also holds (e.g. a benchmark's reported records); repeatable")
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--trials", type=int, default=8, help="trials of random search (grid: every combination)")
    p.add_argument("--search", default="random", help="random, grid, optuna or hyperopt (the last two when installed)")
    p.add_argument("--seed", type=int, default=0, help="the searcher's seed")
    p.add_argument("--space", action="append", default=[], metavar="NAME=KIND:ARGS",
                   help="a searched hyper-parameter, e.g. L2=loguniform:1,100, layers=choice:[4,5,6],[3,4,5], "
                        "layers=shift:-1,0,1, v_num_grad_steps=int:8,25; replaces the method's default for NAME")
    p.add_argument("--space-file", default=None, help="YAML mapping NAME: KIND:ARGS")
    p.add_argument("--no-default-space", action="store_true", help="search only the given dimensions")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a hyper-parameter fixed for every trial (removed from the default space)")
    p.add_argument("--objective", action="append", default=[], metavar="NAME=VALUE",
                   help="objective weights: efficacy, generalisation, locality (1 each), ppl_tolerance (0.05), "
                        "ppl_weight (1)")
    p.add_argument("--perplexity-texts", type=int, default=50)
    p.add_argument("--stats-corpus", default=None)
    p.add_argument("--test-data", default=None, help="report the chosen and the default hyper-parameters on this file")
    p.add_argument("--test-limit", type=int, default=100)
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=0.0)
    p.add_argument("--concurrent", type=int, default=1, help="trials at once (default: %(default)s)")
    p.add_argument("--no-ray", action="store_true", help="run the trials one after another in this process")
    p.add_argument("--ray-address", default=None)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--experiment", default="kedit-tune")
    p.add_argument("--out", required=True, help="tune directory (trials/, best.json, report.md, report.png)")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    from kedit_core.errors import BadInputError
    from pipelines.commands import check_output_dir
    from pipelines.commands.edit_local import parse_overrides
    from pipelines.tune_job import TuneConfig, run_tune

    for k in ("limit", "test_limit", "perplexity_texts"):
        if getattr(args, k) < (0 if k == "perplexity_texts" else 1):
            raise BadInputError(f"must be at least {0 if k == 'perplexity_texts' else 1}, got {getattr(args, k)}",
                                field=k)
    objective = {}
    for k, v in parse_overrides(args.objective).items():
        try:
            objective[k] = float(v)
        except ValueError:
            raise BadInputError(f"not a number: {v!r}", field=f"objective.{k}") from None
    from kedit_core.tune import ObjectiveSpec

    try:
        ObjectiveSpec(**objective)
    except TypeError:
        raise BadInputError(f"unknown objective weight (known: {', '.join(ObjectiveSpec().to_dict())})",
                            field="objective") from None
    check_output_dir(args.out)
    cfg = TuneConfig(model=args.model, method=args.method, data=args.data, limit=args.limit, split_seed=args.split_seed,
                     exclude=list(args.exclude), batch_size=args.batch_size, trials=args.trials, search=args.search,
                     seed=args.seed, space=list(args.space), space_file=args.space_file,
                     default_space=not args.no_default_space, set=parse_overrides(args.set), objective=objective,
                     perplexity_texts=args.perplexity_texts, stats_corpus=args.stats_corpus, test_data=args.test_data,
                     test_limit=args.test_limit, out=args.out, tracking_uri=args.tracking_uri,
                     experiment=args.experiment, ray=not args.no_ray, ray_address=args.ray_address,
                     cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                     concurrent=args.concurrent, device=args.device, dtype=args.dtype)
    res = run_tune(cfg)
    Console().print(Path(args.out, "report.md").read_text())
    failed = [t for t in res["trials"] if t.get("error")]
    if failed or res["best"] is None:
        Console(stderr=True).print(f"[red]{len(failed)} trial(s) failed[/] (run the same command again to retry)")
        return 1
    return 0
