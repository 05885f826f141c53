"""`kedit quickstart`: the README's main job.

Until the Ray pipeline lands it runs the single-process part: load the default model
(dequantised and cached on the first run), and show what it completes for built-in facts
and how many of the built-in edits' true answers it ranks first."""

from __future__ import annotations

from pipelines.commands import add_model_args


def add_parser(sub) -> None:
    p = sub.add_parser("quickstart", help="the main job on the default model and built-in edits")
    add_model_args(p)
    p.add_argument("--show", type=int, default=8, help="facts to complete (default: %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from kedit_core.data import load_builtin
    from kedit_core.generation import first_token_ranks, greedy
    from kedit_core.models import load

    console = Console()
    with console.status(f"loading {args.model} (the first run dequantises and caches it)"):
        lm = load(args.model, dtype=args.dtype, device=args.device)
    console.print(f"loaded [bold]{args.model}[/] ({lm.arch.family}, {lm.n_layers} layers) "
                  f"from {lm.source} in {lm.load_seconds:.1f}s")
    reqs = load_builtin().requests
    ranks = first_token_ranks(lm, [r.text for r in reqs], [r.target_true for r in reqs])
    shown = reqs[: args.show]
    t = Table(title="what the model completes (built-in facts)")
    for col in ("prompt", "completion", "true answer", "edit would write"):
        t.add_column(col)
    for r, c in zip(shown, greedy(lm, [r.text for r in shown], 6)):
        t.add_row(r.text, c.strip().split("\n")[0], r.target_true, r.target_new)
    console.print(t)
    known = sum(k == 0 for k in ranks)
    console.print(f"{known}/{len(reqs)} built-in edits: the model ranks the true answer first.")
    console.print("next: kedit generate \"The Eiffel Tower is located in the city of\"; "
                  "kedit data inspect builtin; kedit models")
    return 0
