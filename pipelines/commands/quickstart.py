"""`kedit quickstart`: the README's main job.

Until the Ray pipeline lands it runs in one process: load the default model (dequantised
and cached on the first run), compute the second-moment statistics (cached after the first
run), apply built-in counterfactual edits in sequential batches, and show the completions
and metrics before and after."""

from __future__ import annotations

import time

from pipelines.commands import add_model_args


def add_parser(sub) -> None:
    p = sub.add_parser("quickstart", help="the main job: edit the default model with built-in facts")
    add_model_args(p)
    p.add_argument("--method", default="alphaedit", help="rome, memit or alphaedit (default: %(default)s)")
    p.add_argument("--edits", type=int, default=20, help="built-in edits to apply (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--show", type=int, default=6, help="facts to show (default: %(default)s)")
    p.add_argument("--stats-corpus", default=None)
    p.add_argument("--set", action="append", default=None, metavar="NAME=VALUE",
                   help="method hyper-parameters (default for alphaedit: L2=1, which edits the "
                        "built-in popular facts; see benchmarks/results/hparams_smollm2.md)")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from kedit_core import Editor, load_requests
    from kedit_core.generation import greedy

    from pipelines.commands.edit_local import parse_overrides

    console = Console()
    t_start = time.perf_counter()
    console.rule("[bold]kedit quickstart")
    sets = args.set if args.set is not None else (["L2=1"] if args.method == "alphaedit" else [])
    ed = Editor(args.model, args.method, args.stats_corpus, device=args.device, dtype=args.dtype,
                **parse_overrides(sets))
    lm = ed.lm
    console.print(f"model [bold]{args.model}[/] ({lm.arch.family}, {lm.n_layers} layers) from {lm.source}; "
                  f"method [bold]{args.method}[/], layers {list(ed.cfg.layers)}, statistics: {ed.corpus.id}")
    reqs = load_requests(limit=args.edits)
    shown = reqs[: args.show]
    before = greedy(lm, [r.text for r in shown], 5)
    pre = ed.evaluate(reqs)
    ed.edit(reqs, batch_size=args.batch_size)
    after = greedy(lm, [r.text for r in shown], 5)
    post = ed.evaluate(reqs)

    t = Table(title=f"{len(reqs)} edits, {len(ed.history)} sequential batches")
    for col in ("prompt", "before", "after", "target"):
        t.add_column(col)
    for r, b, a in zip(shown, before, after):
        t.add_row(r.text, b.strip().split("\n")[0], a.strip().split("\n")[0], r.target_new)
    console.print(t)
    m = Table(title="metrics over all edits")
    for col in ("metric", "before", "after"):
        m.add_column(col)
    for k in ("efficacy_score", "paraphrase_score", "neighborhood_score", "score", "locality"):
        if k in post:
            m.add_row(k, f"{pre.get(k, float('nan')):.3f}", f"{post[k]:.3f}")
    per_edit = sum(h["seconds"] for h in ed.history) / len(reqs)
    m.add_row("seconds per edit", "", f"{per_edit:.2f}")
    console.print(m)
    console.print(f"done in {time.perf_counter() - t_start:.0f}s. Next: "
                  "kedit edit-local --data FILE --limit 100 --out runs/first; "
                  "kedit generate \"The Eiffel Tower is located in the city of\"; kedit data inspect FILE")
    return 0
