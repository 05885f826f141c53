"""The Ray pipeline on this machine: statistics tokens/s with 1 and 2 StatsWorker actors, and
seconds per edit of the edit stream single-process (workers=0) vs Ray with 1 and 2
EditWorker actors (same CounterFact records, AlphaEdit, sequential batches).

    python benchmarks/bench_pipeline.py [--texts 500] [--edits 20] [--batch-size 10]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import SHARED, run_child, write  # noqa: E402

DATA = SHARED / "counterfact" / "counterfact_portability_gpt4.json"


def stats_run(workers: int, texts: int) -> dict:
    import ray

    from kedit_core.models import load
    from kedit_core.stats import StatsStore, open_corpus
    from pipelines.raycluster import init_ray
    from pipelines.stats_job import run_stats

    init_ray(None)
    lm = load("smollm2-135m", device="cpu")
    sites = [lm.arch.mlp_out_site(l) for l in (4, 5, 6, 7, 8)]
    store = StatsStore(tempfile.mkdtemp(prefix="kedit-bench-stats-"))
    t0 = time.perf_counter()
    res = run_stats(lm, sites, open_corpus(None), n_samples=texts, max_length=128, workers=workers, store=store,
                    model_spec="smollm2-135m", device="cpu", show_progress=False)
    wall = time.perf_counter() - t0
    shutil.rmtree(store.root, ignore_errors=True)
    ray.shutdown()
    tp = res["_throughput"]
    return {"what": "statistics", "workers": workers, "tokens": tp["tokens"], "compute_s": tp["seconds"],
            "tokens_per_s": tp["tokens_per_s"], "wall_s_incl_actor_start": wall}


def edit_run(workers: int, edits: int, bs: int) -> dict:
    from pipelines.config import build
    from pipelines.edit_job import EditStream

    out = Path(tempfile.mkdtemp(prefix="kedit-bench-edit-")) / "run"
    cfg = build(None, model="smollm2-135m", method="alphaedit", data=str(DATA), limit=edits, batch_size=bs,
                workers=workers, eval_every=0, perplexity_texts=0, out=str(out), device="cpu")
    t0 = time.perf_counter()
    res = EditStream(cfg, show_progress=False).run()
    wall = time.perf_counter() - t0
    shutil.rmtree(out.parent, ignore_errors=True)
    return {"what": "edit stream", "workers": workers, "edits": edits, "batch_size": bs,
            "s_per_edit": res["seconds_per_edit"], "efficacy": res["post"].get("all/efficacy_score"),
            "wall_s_incl_eval_and_start": wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=500)
    ap.add_argument("--edits", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        kind, w = args.one.split(":")
        row = stats_run(int(w), args.texts) if kind == "stats" else edit_run(int(w), args.edits, args.batch_size)
        print("RESULT " + json.dumps(row))
        return
    rows = []
    for job in ["stats:1", "stats:2", "edit:0", "edit:1", "edit:2"]:
        rows.append(run_child(__file__, ["--one", job, "--texts", str(args.texts), "--edits", str(args.edits),
                                         "--batch-size", str(args.batch_size)], job))
    write("pipeline_smollm2-135m", rows,
          ["what", "workers", "tokens_per_s", "tokens", "compute_s", "s_per_edit", "edits", "efficacy",
           "wall_s_incl_actor_start", "wall_s_incl_eval_and_start"],
          notes=f"SmolLM2-135M fp32 on this machine (2 CPU cores); statistics: {args.texts} WikiText-2 texts, "
                f"layers 4-8; edits: the first {args.edits} CounterFact records, AlphaEdit, batches of "
                f"{args.batch_size}. workers=0 is the single-process driver (2 torch threads); each Ray worker "
                "gets cores/workers threads.")


if __name__ == "__main__":
    main()
