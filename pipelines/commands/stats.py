"""`kedit stats`: second-moment statistics as a Ray job (pipelines/stats_job.py)."""

from __future__ import annotations

from pipelines.commands import add_model_args


def add_parser(sub) -> None:
    p = sub.add_parser("stats", help="compute second-moment statistics with Ray StatsWorker actors")
    add_model_args(p)
    p.add_argument("--method", default="alphaedit", help="whose statistics (its edited layers)")
    p.add_argument("--layers", default=None, help="override the layers, e.g. 4,5,6,7,8")
    p.add_argument("--corpus", default=None, help="text/JSONL/parquet file(s), a directory or hf:NAME:SPLIT")
    p.add_argument("--samples", type=int, default=None, help="texts to use (default: the method's mom2_n_samples)")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--ray-address", default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    from kedit_core.errors import BadInputError
    from kedit_core.methods import get_method, make_config
    from kedit_core.models import load
    from kedit_core.stats import StatsStore, open_corpus, tokenize_corpus
    from kedit_core.stats.corpus import check_has_text
    from pipelines.raycluster import init_ray
    from pipelines.stats_job import run_stats

    # Everything the user can get wrong is checked before Ray starts.
    if args.workers < 1:  # unlike `kedit edit` (0: no actors), statistics need at least one actor
        raise BadInputError(f"must be at least 1 StatsWorker actor, got {args.workers}", field="workers")
    for name in ("samples", "max_length"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise BadInputError(f"must be at least 1, got {v}", field=name)
    method = get_method(args.method)
    corpus = open_corpus(args.corpus)
    check_has_text(corpus)
    lm = load(args.model, dtype=args.dtype, device=args.device)
    over = {"layers": args.layers} if args.layers is not None else {}
    cfg = make_config(method.config_cls, lm, over)
    sites = [k.site for k in method.required_stats(cfg, lm)]
    store = StatsStore()
    kw = dict(n_samples=args.samples or cfg.mom2_n_samples, max_length=args.max_length or cfg.mom2_max_length)
    # At least one text of 2+ tokens (reads up to the first): else one line naming the corpus.
    tokenize_corpus(lm, corpus.texts(), max_length=kw["max_length"], n_samples=1)
    init_ray(args.ray_address)
    res = run_stats(lm, sites, corpus, workers=args.workers, store=store, model_spec=args.model,
                    dtype=args.dtype, device=args.device, **kw)
    tp = res.get("_throughput")
    if tp:
        print(f"{tp['tokens']} tokens in {tp['seconds']:.1f}s = {tp['tokens_per_s']:.0f} tokens/s "
              f"with {args.workers} workers")
    specs = store.specs(lm, sites, corpus, **kw)
    for s in sites:
        print(f"{s}: {res[s].count} tokens -> {store.path(specs[s])}")
    return 0
