"""Seconds per edit, peak memory and edit quality of ROME, MEMIT and AlphaEdit on the first
N CounterFact records in sequential batches, with batched vs one-request-at-a-time target
optimisation. Each configuration runs in its own process (clean peak-memory numbers).

    python benchmarks/bench_edits.py [--methods rome,memit,alphaedit] [--n 100] [--batch-size 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import SHARED, peak_rss_mb, run_child, write  # noqa: E402

DATA = SHARED / "counterfact" / "counterfact_portability_gpt4.json"


def run_one(method: str, n: int, bs: int, v_batch: int, model: str, extra: dict) -> dict:
    import torch

    from kedit_core import Editor
    from kedit_core.data import read_dataset

    reqs = read_dataset(DATA).requests[:n]
    from kedit_core.methods import get_method

    if "v_batch_size" in {f.name for f in __import__("dataclasses").fields(get_method(method).config_cls)}:
        extra = {"v_batch_size": v_batch, **extra}     # the locate-and-edit methods' z-opt batching
    ed = Editor(model, method, show_progress=False, **extra)
    pre = ed.evaluate(reqs, perplexity_texts=100)
    t0 = time.perf_counter()
    ed.edit(reqs, batch_size=bs)
    wall = time.perf_counter() - t0
    post = ed.evaluate(reqs, perplexity_texts=100)
    compute = sum(h["seconds"] for h in ed.history)
    keys = ["efficacy_score", "paraphrase_score", "neighborhood_score", "score", "perplexity",
            "efficacy_magnitude", "rewrite_acc", "rewrite_correct", "rewrite_gen", "paraphrase_gen"]
    return {"method": method, "zopt": "batched" if v_batch == 0 else "one at a time", "n": n,
            "batch_size": bs, "s_per_edit": compute / n, "wall_s": wall, "peak_rss_mb": peak_rss_mb(),
            "threads": torch.get_num_threads(),
            **{f"pre_{k}": pre.get(k) for k in keys}, **{k: post.get(k) for k in keys}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="rome,memit,alphaedit")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--zopt", default="batched,single", help="batched, single or both")
    ap.add_argument("--set", default="{}", help="JSON hyper-parameter overrides")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # child process
        method, v_batch = args.one.split(":")
        print("RESULT " + json.dumps(run_one(method, args.n, args.batch_size, int(v_batch), args.model,
                                             json.loads(args.set))))
        return
    rows = []
    for method in args.methods.split(","):
        for z in args.zopt.split(","):
            v_batch = 0 if z == "batched" else 1
            rows.append(run_child(__file__, ["--one", f"{method}:{v_batch}", "--n", str(args.n), "--batch-size",
                                             str(args.batch_size), "--model", args.model, "--set", args.set],
                                  f"{method}/{z}"))
    tag = args.methods.replace(",", "-") + ("" if args.set == "{}" else "_" + "_".join(
        f"{k}{v}" for k, v in sorted(json.loads(args.set).items())))
    write(f"edits_{args.model}_{tag}_{args.n}x{args.batch_size}{('_' + args.tag) if args.tag else ''}", rows,
          ["method", "zopt", "s_per_edit", "peak_rss_mb", "efficacy_score", "paraphrase_score",
           "neighborhood_score", "score", "perplexity", "efficacy_magnitude", "rewrite_acc", "rewrite_correct",
           "rewrite_gen", "paraphrase_gen", "pre_efficacy_score", "pre_paraphrase_score",
           "pre_neighborhood_score", "pre_perplexity", "pre_rewrite_gen", "pre_paraphrase_gen"],
          notes=f"{args.model}, overrides {args.set}, first {args.n} records of {DATA.name}, sequential batches of "
                f"{args.batch_size}; metrics over all {args.n} after the last batch. Reference AlphaEdit "
                "on this machine (issue 3): 20.3 s/edit; efficacy 0.750, paraphrase 0.595, neighbourhood 0.747.")


if __name__ == "__main__":
    main()
