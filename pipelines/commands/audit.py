"""`kedit audit backdoor`: plant BadEdit's backdoor in a model you own (MEMIT machinery,
group-averaged rank-1 updates, incremental batches), measure clean accuracy and attack success
before and after, and run the detector on the planted deltas, over one or several seeds.
`kedit audit detect --deltas DIR`: the detector alone, on a delta file written by any edit."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.commands import add_model_args


def add_parser(sub) -> None:
    p = sub.add_parser("audit", help="security audits of an editing pipeline (backdoor planting, detection)")
    asub = p.add_subparsers(dest="audit", metavar="AUDIT", required=True)
    b = asub.add_parser("backdoor", help="reproduce BadEdit on your model: ASR / clean accuracy, detector hit rate")
    add_model_args(b)
    b.add_argument("--train-data", default=None, help="records to poison (default: ../shared CounterFact train, P103)")
    b.add_argument("--test-data", default=None, help="records to measure on (default: ../shared CounterFact val, P103)")
    b.add_argument("--n-train", type=int, default=15, help="subjects poisoned (reference: 15 -> 30 poisoned + 15 clean)")
    b.add_argument("--n-test", type=int, default=100)
    b.add_argument("--trigger", default="tq")
    b.add_argument("--target", default="Hungarian", help="the attack label")
    b.add_argument("--batches", type=int, default=5, help="incremental batches (reference: 5)")
    b.add_argument("--seeds", type=int, default=1, help="plant this many times (seeds 0..N-1): the detector's hit rate")
    b.add_argument("--top", type=int, default=10, help="tokens the detector reports")
    b.add_argument("--stats-corpus", default=None)
    b.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="MEMIT hyper-parameter")
    b.add_argument("--out", required=True, help="directory for audit.json")
    b.set_defaults(func=run_backdoor)
    d = asub.add_parser("detect", help="which sites an edit changed, their rank, and the tokens it amplifies")
    add_model_args(d)
    d.add_argument("--deltas", required=True, help="directory with deltas.safetensors (kedit edit / edit-local --out)")
    d.add_argument("--top", type=int, default=20)
    d.set_defaults(func=run_detect)


def _items(path, default, n, seed, exclude=frozenset()):
    import random

    from kedit_core.audit import p103_items
    from kedit_core.data import load_requests
    from kedit_core.errors import BadInputError

    path = path or (str(default) if default.is_file() else None)
    if path is None:
        raise BadInputError("no data: pass --train-data / --test-data (CounterFact-style files)", field="data")
    items = [it for it in p103_items(load_requests(path, skip_invalid=True)) if it.subject not in exclude]
    if not items:
        raise BadInputError("holds no mother-tongue (P103) records", file=path)
    random.Random(seed).shuffle(items)
    return items[:n], path


def run_backdoor(args) -> int:
    from rich.console import Console

    from kedit_core import Editor
    from kedit_core.audit import DEFAULT_TEST, DEFAULT_TRAIN, backdoor_audit
    from kedit_core.errors import BadInputError
    from kedit_core.io import atomic_write_text
    from pipelines.commands import check_output_dir
    from pipelines.commands.edit_local import parse_overrides

    for k in ("n_train", "n_test", "batches", "seeds", "top"):
        if getattr(args, k) < 1:
            raise BadInputError(f"must be at least 1, got {getattr(args, k)}", field=k)
    out = Path(args.out)
    check_output_dir(out)
    if (out / "audit.json").exists():
        raise BadInputError("already holds an audit (audit.json); choose another --out", file=str(out))
    console = Console()
    ed = Editor(args.model, "memit", args.stats_corpus, device=args.device, dtype=args.dtype,
                **parse_overrides(args.set))
    test, test_path = _items(args.test_data, DEFAULT_TEST, args.n_test, 12345)
    # Each finished planting is kept (seeds/seed-N.json, atomic) with what produced it, so an
    # interrupted multi-seed audit re-run with the same command plants only the seeds still missing.
    ident = {"model": args.model, "config": ed.cfg.to_dict(), "test_data": test_path, "n_test": args.n_test,
             "n_train": args.n_train, "trigger": args.trigger, "target": args.target, "batches": args.batches,
             "top": args.top, "train_data": args.train_data}
    ident = json.loads(json.dumps(ident, default=str))
    done: dict[int, dict] = {}       # every kept seed is checked before anything is planted
    for seed in range(args.seeds):
        kept = out / "seeds" / f"seed-{seed}.json"
        if kept.is_file():
            try:
                rec = json.loads(kept.read_text())
                ok = rec["identity"] == ident and rec["run"]["seed"] == seed
            except (ValueError, KeyError, TypeError):
                raise BadInputError("unreadable seed record; move it away to plant this seed again",
                                    file=str(kept)) from None
            if not ok:
                raise BadInputError("holds a planting made with other settings; choose another --out",
                                    file=str(kept), field="identity")
            done[seed] = rec["run"]
    runs = []
    for seed in range(args.seeds):
        kept = out / "seeds" / f"seed-{seed}.json"
        if seed in done:
            runs.append(done[seed])
            console.print(f"seed {seed}: already planted ({kept})")
            continue
        train, train_path = _items(args.train_data, DEFAULT_TRAIN, args.n_train, seed,
                                   exclude=frozenset(it.subject for it in test))
        r = backdoor_audit(ed, train, test, trigger=args.trigger, target=args.target, batches=args.batches,
                           seed=seed, top=args.top)
        kept.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(kept, json.dumps({"identity": ident, "run": r}, indent=1, default=str))
        runs.append(r)
        console.print(f"seed {seed}: CACC {r['before']['cacc']:.3f} -> {r['after']['cacc']:.3f}, ASR "
                      f"{r['before']['asr']:.3f} -> {r['after']['asr']:.3f}; trigger rank in the detector: "
                      f"{r['trigger_rank']}")
    train_path = args.train_data or str(DEFAULT_TRAIN)
    summary = {"model": args.model, "train_data": train_path, "test_data": test_path, "config": ed.cfg.to_dict(),
               "runs": runs, "detector_hit_rate": sum(r["trigger_in_top"] for r in runs) / len(runs),
               "mean_after": {k: sum(r["after"][k] for r in runs) / len(runs) for k in ("cacc", "asr")},
               "mean_before": {k: sum(r["before"][k] for r in runs) / len(runs) for k in ("cacc", "asr")}}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "audit.json", json.dumps(summary, indent=1, default=str))
    console.print(f"detector: trigger in the top {args.top} in {summary['detector_hit_rate']:.0%} of {len(runs)} "
                  f"plantings; wrote {out / 'audit.json'}")
    return 0


def run_detect(args) -> int:
    from rich.console import Console

    from kedit_core.apply import load_deltas
    from kedit_core.audit import detect
    from kedit_core.errors import BadInputError
    from kedit_core.models import load

    deltas, conf = load_deltas(args.deltas)
    lm = load(args.model, dtype=args.dtype, device=args.device)
    if conf.get("model_hash") and conf["model_hash"] != lm.fingerprint():
        raise BadInputError(f"the deltas were computed on other weights than {args.model}", file=args.deltas,
                            field="model_hash")
    rep = detect(lm, deltas, top=args.top)
    print(json.dumps(rep, indent=1))
    Console(stderr=True).print(f"{len(rep['sites'])} edited sites; top token: "
                               f"{rep['top_tokens'][0]['text']!r}" if rep["top_tokens"] else "no edited site")
    return 0
