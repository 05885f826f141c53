"""Large batches through `kedit edit` (issue 13 points 3 and 5).

1. MEMIT and AlphaEdit, ONE batch of N CounterFact requests per run (N in --sizes): seconds
   per edit, peak RSS of the driver and of each EditWorker (the batch goes in chunks of
   --zopt-chunk requests that return only d x d sums, so memory should not grow with N),
   and efficacy / paraphrase / neighbourhood scores of the batch (all/*: a strided sample
   of --eval-limit of its requests). "vs 10" says how much batching pays: s/edit at the
   smallest size over s/edit at this size.
2. --stream: the quickstart's stream (built-in edits, AlphaEdit L2=1, batches of 10) as
   `edit-local` runs it (one process) and as the Ray stream runs it with workers=auto and
   with the old default of 2 workers, on the same edits.

Each configuration runs in a fresh process (clean timings and peak memory). Its run
directory is under --work (kept until its row is measured), and every finished row is kept in
benchmarks/results/<name>.rows.json: re-running the same command after an interruption skips
the rows already measured and resumes an unfinished batch from its run directory, where
`kedit edit` checkpoints the chunk sums computed so far (such a row says `resumed`; its
s/edit counts only the time spent in the run that finished it).

    python benchmarks/bench_batch.py --sizes 10,100,1000                 # the issue's table
    python benchmarks/bench_batch.py --sizes 10000 --data counterfact-edit.json   # the 10k batch
    python benchmarks/bench_batch.py --sizes 10,50 --stream --stream-edits 20     # a small run
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import RESULTS, SHARED, run_child, write  # noqa: E402
from kedit_core.io import atomic_write_text  # noqa: E402

DATA = SHARED / "counterfact" / "counterfact_portability_gpt4.json"   # 1,031 records
BIG = SHARED / "counterfact" / "counterfact-edit.json"                 # 10,000 records
SCORES = ("efficacy_score", "paraphrase_score", "neighborhood_score")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batch_run(method: str, n: int, a) -> dict:
    from pipelines.config import build
    from pipelines.edit_job import EditStream

    data = a.data or str(DATA if n <= 1031 else BIG)
    out = Path(a.work) / f"{a.model}_{method}_{n}" / "run"
    resumed = out.is_dir() and (out / "run.json").is_file()
    if resumed:
        print(f"resuming the batch in {out}", file=sys.stderr, flush=True)
    cfg = build(None, model=a.model, method=method, data=data, limit=n, batch_size=n, workers=a.workers,
                zopt_chunk=a.zopt_chunk, eval_every=0, eval_limit=a.eval_limit, perplexity_texts=0, out=str(out),
                device=a.device, set=dict(s.split("=", 1) for s in a.set))
    t0 = time.perf_counter()
    stream = EditStream(cfg, show_progress=False)
    res = stream.run()
    wall = time.perf_counter() - t0
    plan = json.loads((out / "worker_plan.json").read_text()) if (out / "worker_plan.json").is_file() else None
    post, pre = res["post"], res["pre"]
    workers_rss = [r.get("max_rss_mb") for r in res.get("replicas") or []]
    return {"method": method, "batch": n, "s_per_edit": res["seconds_per_edit"],
            "batch_s": res["seconds_per_edit"] * n,
            **{f"{k}": post.get(f"all/{k}") for k in SCORES},
            **{f"pre_{k}": pre.get(f"all/{k}") for k in SCORES},
            "driver_rss_mb": _rss_mb(), "worker_rss_mb": max(workers_rss) if workers_rss else None,
            "workers": plan["workers"] if plan else 0, "threads": plan["threads"] if plan else None,
            "zopt_chunk": a.zopt_chunk, "wall_s": wall, "data": Path(data).name, "resumed": resumed}


def stream_run(kind: str, a) -> dict:
    """The quickstart's edits: kind 'edit-local' (one process, as `kedit edit-local`), or
    'ray-auto' / 'ray-2' (the stream with workers=auto / 2)."""
    sets = {"L2": "1.0", **dict(s.split("=", 1) for s in a.set)}
    if kind == "edit-local":
        from kedit_core import Editor
        from kedit_core.data import load_requests

        reqs = load_requests(None, limit=a.stream_edits)
        ed = Editor(a.model, "alphaedit", None, device=a.device, show_progress=False, **sets)
        t0 = time.perf_counter()
        hist = ed.edit(reqs, batch_size=10)
        wall = time.perf_counter() - t0
        return {"path": kind, "edits": len(reqs), "s_per_edit": sum(b["seconds"] for b in hist) / len(reqs),
                "workers": 0, "threads": __import__("torch").get_num_threads(), "wall_s": wall,
                "driver_rss_mb": _rss_mb()}
    from pipelines.config import build
    from pipelines.edit_job import EditStream

    out = Path(tempfile.mkdtemp(prefix="kedit-bench-stream-")) / "run"
    cfg = build(None, model=a.model, method="alphaedit", data="builtin", limit=a.stream_edits, batch_size=10,
                workers="auto" if kind == "ray-auto" else 2, eval_every=0, perplexity_texts=0, out=str(out),
                device=a.device, set=sets)
    t0 = time.perf_counter()
    res = EditStream(cfg, show_progress=False).run()
    wall = time.perf_counter() - t0
    plan = json.loads((out / "worker_plan.json").read_text())
    shutil.rmtree(out.parent, ignore_errors=True)
    return {"path": kind, "edits": res["n_edits"], "s_per_edit": res["seconds_per_edit"], "workers": plan["workers"],
            "threads": plan["threads"], "wall_s": wall, "driver_rss_mb": _rss_mb(),
            "worker_rss_mb": max((r.get("max_rss_mb") or 0) for r in res.get("replicas") or [{}])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="memit,alphaedit")
    ap.add_argument("--sizes", default="10,100,1000", help="batch sizes (one batch each)")
    ap.add_argument("--data", default=None, help="edit dataset (default: CounterFact from ../shared: the "
                                                 "1,031-record file up to 1,031, else counterfact-edit.json)")
    ap.add_argument("--workers", default="auto")
    ap.add_argument("--zopt-chunk", type=int, default=64)
    ap.add_argument("--eval-limit", type=int, default=200, help="requests of the batch scored (a strided sample)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--stream", action="store_true", help="also: the quickstart's stream, edit-local vs Ray")
    ap.add_argument("--stream-edits", type=int, default=20)
    ap.add_argument("--no-batches", action="store_true", help="only the --stream comparison")
    ap.add_argument("--name", default=None, help="results file name (default from the options)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "kedit-bench-batch"),
                    help="run directories of the batches, kept until measured (default: %(default)s)")
    ap.add_argument("--report-only", action="store_true",
                    help="write the table from the rows measured so far (the others are listed as not measured)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        kind, *rest = a.one.split(":")
        row = batch_run(rest[0], int(rest[1]), a) if kind == "batch" else stream_run(rest[0], a)
        print("RESULT " + json.dumps(row))
        return
    argv = [x for x in sys.argv[1:]]
    sizes = [int(x) for x in a.sizes.split(",")]
    rows = []
    if not a.no_batches:
        name = a.name or f"batch_{a.model}_{'-'.join(map(str, sizes))}"
        kept_path = RESULTS / f"{name}.rows.json"
        ident = {k: getattr(a, k) for k in ("model", "data", "workers", "zopt_chunk", "eval_limit", "device", "set")}
        kept: dict[str, dict] = {}
        if kept_path.is_file():
            try:
                rec = json.loads(kept_path.read_text())
                same, kept = rec["identity"] == ident, rec["rows"]
            except (ValueError, KeyError, TypeError):
                print(f"{kept_path}: unreadable rows record; move it away to measure again", file=sys.stderr)
                raise SystemExit(2) from None
            if not same:
                print(f"{kept_path}: holds rows measured with other options ({rec['identity']}); "
                      "choose another --name", file=sys.stderr)
                raise SystemExit(2)
        missing = []
        for m in a.methods.split(","):
            for n in sizes:
                key = f"{m}:{n}"
                if key not in kept and a.report_only:
                    missing.append(f"{m} x {n}")
                    continue
                if key not in kept:
                    kept[key] = run_child(__file__, [*argv, "--one", f"batch:{m}:{n}"], f"{m} x {n}")
                    shutil.rmtree(Path(a.work) / f"{a.model}_{m}_{n}", ignore_errors=True)
                    atomic_write_text(kept_path, json.dumps({"identity": ident, "rows": kept}, indent=1))
                else:
                    print(f"{m} x {n}: measured before ({kept_path})", flush=True)
                rows.append(dict(kept[key]))
        for r in rows:
            base = next(x for x in rows if x["method"] == r["method"])
            r["speedup_vs_smallest"] = base["s_per_edit"] / r["s_per_edit"]
        if not rows:
            print(f"{kept_path}: no rows measured yet", file=sys.stderr)
            raise SystemExit(2)
        biggest = {m: max((r for r in rows if r["method"] == m), key=lambda r: r["batch"])
                   for m in a.methods.split(",") if any(r["method"] == m for r in rows)}
        pred = "; ".join(f"{m}: {r['s_per_edit'] * 10_000 / 3600:.1f} h for 10,000 at the s/edit of {r['batch']}"
                         for m, r in biggest.items())
        write(name, rows, ["method", "batch", "s_per_edit", "speedup_vs_smallest", "batch_s", *SCORES,
                           "driver_rss_mb", "worker_rss_mb", "workers", "threads", "zopt_chunk", "wall_s", "data", "resumed"],
              notes=f"{a.model} on {a.device}; one batch of N CounterFact requests per run through `kedit edit` "
                    f"(workers={a.workers}, chunks of {a.zopt_chunk} requests returning only K K^T / K R^T sums). "
                    f"Scores: all/* on a strided sample of {a.eval_limit} of the batch. RSS: peak of the driver "
                    f"process and of the largest EditWorker. speedup_vs_smallest = s/edit at the smallest batch / "
                    f"s/edit here. resumed: the batch was interrupted and finished from its checkpointed "
                    f"chunk sums. Prediction (s/edit is per request once the batch is a few chunks): {pred}."
                    + (f" Not measured: {', '.join(missing)}." if missing else ""))
    if a.stream:
        srows = [run_child(__file__, [*argv, "--one", f"stream:{k}"], k) for k in ("edit-local", "ray-auto", "ray-2")]
        local = srows[0]["s_per_edit"]
        for r in srows:
            r["vs_edit_local"] = r["s_per_edit"] / local
        write(a.name and f"{a.name}_stream" or f"batch_stream_{a.model}_{a.stream_edits}", srows,
              ["path", "edits", "s_per_edit", "vs_edit_local", "workers", "threads", "driver_rss_mb",
               "worker_rss_mb", "wall_s"],
              notes=f"The quickstart's edits ({a.stream_edits} built-in, AlphaEdit L2=1, batches of 10) on {a.device}: "
                    "edit-local (one process) vs the Ray stream with workers=auto (pipelines.workers.plan_workers) "
                    "and with 2 workers (the old quickstart default). vs_edit_local = s/edit / edit-local's.")


if __name__ == "__main__":
    main()
