"""`kedit evaluate RUN_DIR`: every edit of a run's latest checkpoint evaluated on demand
(pipelines/evaluation.py: evaluate_run), written to RUN_DIR/evaluations/ and logged to the
run's MLflow run."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a run's latest checkpoint on all its edits (JSON + MLflow)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--workers", type=int, default=0,
                   help="shard the evaluation over N EditWorker actors on Ray (default 0: this process)")
    p.set_defaults(func=run)


def run(args) -> int:
    from kedit_core.errors import BadInputError
    from pipelines.evaluation import evaluate_run

    if args.workers < 0:
        raise BadInputError(f"must be 0 or more, got {args.workers}", field="workers")
    res = evaluate_run(args.run_dir, workers=args.workers)
    m = res["metrics"]
    print(f"{res['n_edits']} edits of {res['checkpoint']} ({res['eval_seconds']:.1f} s"
          f"{', sharded over %d workers' % args.workers if res['sharded'] else ''})")
    for k in ("all/efficacy_score", "all/paraphrase_score", "all/neighborhood_score", "all/score", "all/rewrite_acc",
              "all/locality", "probe/neighborhood_score", "perplexity"):
        if k in m:
            print(f"  {k:<26} {m[k]:8.3f}")
    print(f"wrote {res['path']}")
    return 0
