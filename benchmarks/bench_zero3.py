"""The DeepSpeed ZeRO-3 path against the plain path on a real model: the same edit stream
(SmolLM2-135M, built-in edits, AlphaEdit as in the quickstart) with the driver's model
plain, partitioned by ZeRO-3, and partitioned with one ZeRO-3 EditWorker; seconds per edit,
peak memory, the metrics, and how far the final edited weights are from the plain run's.

    python benchmarks/bench_zero3.py [--edits 20] [--batch-size 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import peak_rss_mb, run_child, write  # noqa: E402

JOBS = {"plain": dict(workers=0, zero3=False), "zero3": dict(workers=0, zero3=True),
        "zero3+1 worker": dict(workers=1, zero3=True)}


def one(job: str, edits: int, bs: int, out: Path) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from pipelines.config import build
    from pipelines.edit_job import EditStream

    cfg = build(None, model="smollm2-135m", method="alphaedit", data="builtin", limit=edits, batch_size=bs,
                eval_every=0, perplexity_texts=20, out=str(out), device="cpu", set={"L2": 1.0}, **JOBS[job])
    t0 = time.perf_counter()
    res = EditStream(cfg, show_progress=False).run()
    post = res["post"]
    return {"run": job, "edits": edits, "s_per_edit": res["seconds_per_edit"],
            "wall_s": time.perf_counter() - t0, "peak_rss_mb_driver": peak_rss_mb(),
            "efficacy": post.get("all/efficacy_score"), "paraphrase": post.get("all/paraphrase_score"),
            "neighbourhood": post.get("all/neighborhood_score"), "perplexity": post.get("perplexity"),
            "out": str(out)}


def final_weights(run_dir: str) -> dict:
    from safetensors.torch import load_file

    last = sorted((Path(run_dir) / "checkpoints").iterdir())[-1]
    return load_file(str(last / "weights.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--edits", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args.edits, args.batch_size, Path(args.out))))
        return
    tmp = Path(tempfile.mkdtemp(prefix="kedit-bench-zero3-"))
    rows = []
    for i, job in enumerate(JOBS):
        rows.append(run_child(__file__, ["--one", job, "--edits", str(args.edits), "--batch-size",
                                         str(args.batch_size), "--out", str(tmp / f"run{i}")], job))
    base = final_weights(rows[0]["out"])
    for r in rows:
        w = final_weights(r.pop("out"))
        r["weights_max_rel_diff_vs_plain"] = max(float((w[s] - base[s]).abs().max() / base[s].abs().max())
                                                 for s in base)
    shutil.rmtree(tmp, ignore_errors=True)
    write("zero3_smollm2-135m", rows,
          ["run", "edits", "s_per_edit", "wall_s", "peak_rss_mb_driver", "efficacy", "paraphrase",
           "neighbourhood", "perplexity", "weights_max_rel_diff_vs_plain"],
          notes=f"SmolLM2-135M fp32, this machine's CPU (no GPU, so no parameter offload); the first "
                f"{args.edits} built-in edits, AlphaEdit L2=1, batches of {args.batch_size}; metrics over all "
                "of them. DeepSpeed ZeRO-3 at world size 1 per process (kedit_core/models/zero3.py).")


if __name__ == "__main__":
    main()
