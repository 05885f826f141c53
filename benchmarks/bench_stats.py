"""Second-moment statistics throughput: kedit's one pass over all edited layers vs the
reference scheme (ROME/MEMIT `layer_stats`: one forward pass truncated after each layer).

    python benchmarks/bench_stats.py [--model smollm2-135m] [--layers 4,5,6,7,8] [--n-samples 2000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import SHARED, write  # noqa: E402
from kedit_core.models import load  # noqa: E402
from kedit_core.stats import collect_second_moments, open_corpus, tokenize_corpus  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", default="4,5,6,7,8")
    ap.add_argument("--n-samples", type=int, default=2000)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--corpus", default=str(SHARED / "wikitext" / "wiki.test.raw"))
    args = ap.parse_args()
    lm = load(args.model, device="auto")
    sites = [f"blocks.{l}.mlp.out" for l in args.layers.split(",")]
    toks = tokenize_corpus(lm, open_corpus(args.corpus).texts(), max_length=args.max_length,
                           n_samples=args.n_samples)
    n_tok = sum(len(t) for t in toks)
    rows = []
    t0 = time.perf_counter()
    one = collect_second_moments(lm, sites, toks)
    dt = time.perf_counter() - t0
    rows.append({"scheme": "kedit: one pass, all layers", "tokens": n_tok, "seconds": dt, "tokens_per_s": n_tok / dt})
    t0 = time.perf_counter()
    per = {}
    for s in sites:  # the reference scheme: a truncated pass per layer
        per.update(collect_second_moments(lm, [s], toks))
    dt = time.perf_counter() - t0
    rows.append({"scheme": "reference: one truncated pass per layer", "tokens": n_tok, "seconds": dt,
                 "tokens_per_s": n_tok / dt})
    diff = max(float((one[s].sum - per[s].sum).norm() / per[s].sum.norm()) for s in sites)
    for r in rows:
        r["speedup"] = rows[1]["seconds"] / r["seconds"]
    write("stats", rows, ["scheme", "tokens", "seconds", "tokens_per_s", "speedup"],
          notes=f"{args.model}, layers {args.layers}, {len(toks)} texts of <= {args.max_length} tokens "
                f"from {Path(args.corpus).name}; max relative difference between the schemes' sums: {diff:.1e}. "
                "Reference code on this machine (issue 3): 1,257 s for 207k tokens.")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
