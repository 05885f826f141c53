"""IKE's efficacy per record and per model (issue 10's "IKE reaches efficacy >= 0.9").

For each model: IKE edits the first N records of counterfact_portability_gpt4.json in
sequential batches of B (every fact enters the retrieval memory; a query retrieves its
nearest fact and is asked after the 32 demonstrations), then every record's rewrite prompt is
scored: efficacy_score = mean NLL(o*) < mean NLL(o) (kedit_core.evaluate.metrics, the
reference's perplexity comparison). Beside it, the unedited model's mean NLL of the true
object without any context (how strongly the model already knows the old fact), as the
median over the records IKE fails on and over those it edits. Each model runs in a fresh
process.

    python benchmarks/bench_ike.py [--models smollm2-135m,gemma3-270m] [--n 100] [--batch-size 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import RESULTS, SHARED, peak_rss_mb, run_child, write  # noqa: E402

DATA = SHARED / "counterfact" / "counterfact_portability_gpt4.json"


def run_one(model: str, n: int, bs: int) -> dict:
    from kedit_core import Editor
    from kedit_core.data import read_dataset
    from kedit_core.edited import as_view

    reqs = read_dataset(DATA).requests[:n]
    ed = Editor(model, "ike", show_progress=False)
    prior = as_view(ed.lm).score([r.text for r in reqs], [r.target_true for r in reqs]).mean_nll
    ed.edit(reqs, batch_size=bs)
    t0 = time.perf_counter()
    s = ed.model.score([r.text for r in reqs for _ in (0, 1)], [a for r in reqs for a in (r.target_new, r.target_true)])
    score_s = time.perf_counter() - t0
    recs = [{"case_id": r.case_id, "prompt": r.text, "target_new": r.target_new, "target_true": r.target_true,
             "nll_new": float(s.mean_nll[2 * i]), "nll_true": float(s.mean_nll[2 * i + 1]),
             "prior_nll_true": float(prior[i]), "ok": float(s.mean_nll[2 * i]) < float(s.mean_nll[2 * i + 1])}
            for i, r in enumerate(reqs)]
    fail = [x for x in recs if not x["ok"]]
    ok = [x for x in recs if x["ok"]]
    return {"model": model, "n": n, "batch_size": bs, "efficacy_score": len(ok) / len(recs), "failures": len(fail),
            "prior_nll_true_failed": statistics.median(x["prior_nll_true"] for x in fail) if fail else None,
            "prior_nll_true_succeeded": statistics.median(x["prior_nll_true"] for x in ok) if ok else None,
            "score_s": score_s, "peak_rss_mb": peak_rss_mb(), "records": recs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(run_one(a.one, a.n, a.batch_size)))
        return
    rows = [run_child(__file__, ["--one", m, "--n", str(a.n), "--batch-size", str(a.batch_size)], m)
            for m in a.models.split(",")]
    name = f"ike_efficacy_{a.n}x{a.batch_size}"
    write(name, [{k: v for k, v in r.items() if k != "records"} for r in rows],
          ["model", "n", "batch_size", "efficacy_score", "failures", "prior_nll_true_failed",
           "prior_nll_true_succeeded", "score_s", "peak_rss_mb"],
          notes=f"IKE (32 demonstrations from counterfact-train.json, the retrieval memory of every edited fact) on "
                f"the first {a.n} records of {DATA.name} in sequential batches of {a.batch_size}; efficacy_score over "
                "all of them after the last batch. prior_nll_true_*: median mean-NLL of the true object under the "
                "unedited model with no context, over the records IKE fails on / succeeds on (lower = the model "
                "is surer of the old fact).")
    detail = json.loads((RESULTS / f"{name}.json").read_text())
    detail["records"] = {r["model"]: r["records"] for r in rows}
    (RESULTS / f"{name}.json").write_text(json.dumps(detail, indent=1))
    with (RESULTS / f"{name}.md").open("a") as fh:
        for r in rows:
            fh.write(f"\n## {r['model']}: the records IKE fails on\n\n| prompt | o* | o | NLL o* | NLL o | prior NLL o |\n"
                     "|---|---|---|---|---|---|\n")
            for x in r["records"]:
                if not x["ok"]:
                    fh.write(f"| {x['prompt']} | {x['target_new']} | {x['target_true']} | {x['nll_new']:.2f} | "
                             f"{x['nll_true']:.2f} | {x['prior_nll_true']:.2f} |\n")


if __name__ == "__main__":
    main()
