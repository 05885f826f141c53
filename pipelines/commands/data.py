"""`kedit data inspect FILE`: format, record count and the first problems of an edit file."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="inspect edit datasets")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    ip = dsub.add_parser("inspect", help="detect the format of FILE, count and validate its records")
    ip.add_argument("file", help="JSON, JSONL or parquet file, or 'builtin'")
    ip.add_argument("--max-problems", type=int, default=5, help="problems to print (default: %(default)s)")
    ip.add_argument("--strict", action="store_true",
                    help="refuse duplicate case ids (by default a warning)")
    ip.set_defaults(func=run_inspect)


def run_inspect(args) -> int:
    from kedit_core.data import load_builtin, read_dataset

    ds = load_builtin() if args.file == "builtin" else read_dataset(args.file, skip_invalid=True,
                                                                     strict=args.strict)
    reqs = ds.requests
    print(f"file:     {ds.path}")
    print(f"format:   {ds.format}")
    print(f"records:  {ds.records} ({len(ds.cases)} valid cases, {len(reqs)} edit requests)")
    if reqs:
        r = reqs[0]
        print(f"first:    {r.text!r} -> {r.target_new!r} (was {r.target_true!r})")
        print("material: " + ", ".join(f"{k} {n}" for k, n in [
            ("paraphrases", sum(len(x.paraphrase_prompts) for x in reqs)),
            ("neighbourhood", sum(len(x.neighborhood) for x in reqs)),
            ("portability", sum(len(x.portability) for x in reqs)),
            ("multi-hop questions", sum(len(c.multi_hop_questions) for c in ds.cases))]))
    if ds.warnings:
        print(f"warnings: {len(ds.warnings)} duplicate case id(s) (refused with --strict); the first "
              f"{min(args.max_problems, len(ds.warnings))}:")
        for line in ds.warnings[: args.max_problems]:
            print(f"  {line}")
    if ds.problems:
        print(f"problems: {len(ds.problems)} invalid record(s); the first {min(args.max_problems, len(ds.problems))}:")
        for line in ds.problems[: args.max_problems]:
            print(f"  {line}")
        return 2
    print("problems: none")
    return 0
