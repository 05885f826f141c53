"""`kedit methods`: every registered editing method with its family, what it needs
(statistics, a trained editor, a sentence encoder) and its paper."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("methods", help="list the editing methods (family, needs, paper)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from kedit_core.methods import describe_methods

    rows = describe_methods()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title="kedit methods")
    for col in ("method", "family", "needs", "paper", "what it does"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], r["family"], ", ".join(r["needs"]) or "-", r["paper"], r["summary"])
    Console(width=160).print(t)
    return 0
