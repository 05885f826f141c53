"""`kedit edit-local`: edit in one process (no Ray): pre-edit metrics, sequential batches,
post-edit metrics over ALL requests, written to OUT/metrics.json; deltas and the edited
model saved under OUT."""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipelines.commands import add_model_args


def add_parser(sub) -> None:
    p = sub.add_parser("edit-local", help="edit a model in one process (no Ray) and write metrics")
    add_model_args(p)
    p.add_argument("--method", default="alphaedit", help="any registered method (`kedit methods`; default: %(default)s)")
    p.add_argument("--data", default="builtin", help="edit dataset file, or 'builtin' (default)")
    p.add_argument("--limit", type=int, default=None, help="first N requests only")
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--out", required=True, help="output directory (metrics.json, deltas, model)")
    p.add_argument("--stats-corpus", default=None,
                   help="text corpus for second moments (default: WikiText-2 test from ../shared, "
                        "else the standard library's docstrings)")
    p.add_argument("--skip-invalid", action="store_true", help="skip invalid records instead of failing")
    p.add_argument("--editor", default=None, metavar="DIR",
                   help="trained editor for MEND, KnowledgeEditor or SERAC (from `kedit train`): --set editor=DIR")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override a method hyper-parameter, e.g. --set layers=4,5,6 --set v_lr=0.1")
    p.add_argument("--perplexity-texts", type=int, default=100,
                   help="held-out texts for perplexity (0: skip; default: %(default)s)")
    p.add_argument("--perplexity-corpus", default=None,
                   help="held-out perplexity texts (default: the statistics corpus after the texts the "
                        "statistics used; the other built-in corpus when too few remain)")
    p.add_argument("--zsre-convention", default="mend", choices=["mend", "memit"],
                   help="zsRE files: 'mend' (alt is the new target; default) or 'memit' (answers[0])")
    p.add_argument("--no-export", action="store_true", help="write deltas only, not the HF model")
    p.add_argument("--strict", action="store_true", help="refuse duplicate case ids (by default a warning)")
    p.set_defaults(func=run)


def parse_overrides(items: list[str]) -> dict:
    from kedit_core.errors import BadInputError

    out = {}
    for item in items:
        if "=" not in item:
            raise BadInputError(f"expected NAME=VALUE, got {item!r}", field="--set")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def run(args) -> int:
    if getattr(args, "editor", None):
        args.set = [*args.set, f"editor={args.editor}"]
    from rich.console import Console

    from kedit_core import Editor
    from kedit_core.data import load_requests
    from kedit_core.errors import BadInputError

    from pipelines.commands import check_output_dir

    for name in ("batch_size",):
        if getattr(args, name) < 1:
            raise BadInputError(f"must be at least 1, got {getattr(args, name)}", field=name)
    for name in ("limit", "perplexity_texts"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise BadInputError(f"must be 0 or more, got {getattr(args, name)}", field=name)
    out = Path(args.out)
    check_output_dir(out)
    if (out / "metrics.json").exists():
        raise BadInputError("already holds a finished run (metrics.json); choose another --out",
                            file=str(out))
    console = Console()
    reqs = load_requests(None if args.data == "builtin" else args.data, limit=args.limit,
                         skip_invalid=args.skip_invalid, strict=args.strict, zsre_convention=args.zsre_convention)
    if not reqs:
        raise BadInputError("no edit requests to apply", file=args.data)
    ed = Editor(args.model, args.method, args.stats_corpus, device=args.device, dtype=args.dtype,
                perplexity_corpus=args.perplexity_corpus, **parse_overrides(args.set))
    console.print(f"[bold]{args.method}[/] on {args.model}: {len(reqs)} edits in batches of {args.batch_size}")
    # multi-hop cases (MQuAKE) whose every rewrite is among the edited requests
    cases = []
    if args.data != "builtin":
        from kedit_core.data import read_dataset

        edited = set(reqs)
        cases = [c for c in read_dataset(args.data, zsre_convention=args.zsre_convention).cases
                 if c.multi_hop_questions and all(r in edited for r in c.requests)]
    from kedit_core.evaluate.evoke import evoke_metrics, has_evoke_probes

    evoke = has_evoke_probes(reqs)          # EVOKE files: the overfitting metrics too
    pre = ed.evaluate(reqs, perplexity_texts=args.perplexity_texts)
    if cases:
        from kedit_core.evaluate.multihop import evaluate_cases

        pre.update(evaluate_cases(ed.model, cases))
    if evoke:
        pre.update(evoke_metrics(ed.model, reqs))
    t0 = time.perf_counter()
    batches = ed.edit(reqs, batch_size=args.batch_size)
    wall = time.perf_counter() - t0
    post = ed.evaluate(reqs, perplexity_texts=args.perplexity_texts)
    if cases:
        post.update(evaluate_cases(ed.model, cases))
    if evoke:
        post.update(evoke_metrics(ed.model, reqs))
    compute = sum(b["seconds"] for b in batches)
    result = {"model": args.model, "method": args.method, "data": args.data, "n_edits": len(reqs),
              "batch_size": args.batch_size, "config": ed.cfg.to_dict(), "pre": pre, "post": post,
              "seconds_per_edit": compute / len(reqs), "wall_seconds": wall, "batches": batches,
              "zsre_convention": args.zsre_convention,
              "perplexity_source": ed.heldout(args.perplexity_texts).source if args.perplexity_texts else None}
    ed.save(out, export_model=not args.no_export)
    from kedit_core.io import atomic_write_text

    atomic_write_text(out / "metrics.json", json.dumps(result, indent=1, default=str))
    keys = ["efficacy_score", "paraphrase_score", "neighborhood_score", "score", "rewrite_gen",
            "paraphrase_gen", "rewrite_acc", "neighborhood_acc", "locality", "multihop_acc", "single_hop_acc",
            "hop_acc", "efficacy_AMS", "paraphrase_AMS", "multihop_EOS", "multihop_AMS", "distraction_EOS",
            "rel_spec_EOS", "subj_spec_EOS", "overfit_EOS_mean", "perplexity"]
    for k in keys:
        if k in post:
            console.print(f"  {k:<20} {pre.get(k, float('nan')):8.3f} -> {post[k]:8.3f}")
    console.print(f"  seconds per edit     {compute / len(reqs):8.2f}")
    console.print(f"wrote {out / 'metrics.json'}")
    return 0
