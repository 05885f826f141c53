"""Multi-hop editing on MQuAKE-hard (Zhong et al. 2023, arXiv 2305.14795): the first N cases'
requested rewrites (4 per case) edited as a sequential stream of batches, then each case's
three multi-hop questions asked (kedit_core.evaluate.multihop) together with the single-hop
accuracy of the edited facts and the hop-wise accuracy over `new_single_hops`.

One fresh process per method (clean peak memory). The unedited row is the same
evaluation before any edit. For MeLLo the first cases' decomposition transcripts are kept.

    python benchmarks/bench_mquake.py --methods memit,alphaedit,ike,mello --cases 100
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, SHARED, peak_rss_mb, run_child, write  # noqa: E402

KEYS = ["multihop_acc", "multihop_acc_original", "single_hop_acc", "hop_acc", "hopwise_acc"]


def run_one(method: str, n_cases: int, bs: int, model: str, extra: dict, traces: int) -> dict:
    import torch

    from kedit_core import Editor
    from kedit_core.data import read_dataset
    from kedit_core.evaluate.multihop import evaluate_cases

    torch.manual_seed(0)
    ds = read_dataset(SHARED / "mquake" / "MQuAKE-hard.json")
    cases = [c for c in ds.cases if c.multi_hop_questions][:n_cases]
    reqs = [r for c in cases for r in c.requests]
    ed = Editor(model, "memit" if method == "unedited" else method, show_progress=True, **extra)
    row: dict = {"method": method, "cases": len(cases), "edits": len(reqs), "batch_size": bs}
    if method != "unedited":
        t0 = time.perf_counter()
        batches = ed.edit(reqs, batch_size=bs)
        row["s_per_edit"] = sum(b["seconds"] for b in batches) / len(reqs)
        row["edit_wall_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    view = ed.model
    row.update(evaluate_cases(view, cases))
    row["eval_s"] = time.perf_counter() - t0
    row["peak_rss_mb"] = peak_rss_mb()
    if getattr(view, "traces", None):
        per_case = len(cases[0].multi_hop_questions)
        row["traces"] = [{"case_id": c.case_id, "new_answer": c.new_answer.answer, "answer": c.answer.answer,
                          "trace": view.traces[i * per_case]} for i, c in enumerate(cases[:traces])]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="unedited,memit,alphaedit,ike,mello")
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=100, help="edits per sequential batch")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--set", default="{}", help="JSON hyper-parameter overrides (all methods)")
    ap.add_argument("--traces", type=int, default=5, help="MeLLo transcripts kept (first question of a case)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--fresh", action="store_true", help="drop the rows of an earlier run instead of merging")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        row = run_one(a.one, a.cases, a.batch_size, a.model, json.loads(a.set), a.traces)
        print("RESULT " + json.dumps(row), flush=True)
        return
    name = f"mquake_hard_{a.model}_{a.cases}{('_' + a.tag) if a.tag else ''}"
    methods = a.methods.split(",")
    order = ["unedited", "memit", "alphaedit", "ike", "mello"]
    rows, old_traces = [], []
    if (RESULTS / f"{name}.json").exists() and not a.fresh:   # keep the rows of methods not rerun now
        old = json.loads((RESULTS / f"{name}.json").read_text())
        rows = [r for r in old["rows"] if r["method"] not in methods]
        old_traces = [] if "mello" in methods else old.get("mello_traces", [])
    for m in methods:
        row = run_child(__file__, ["--one", m, "--cases", str(a.cases), "--batch-size", str(a.batch_size),
                                   "--model", a.model, "--set", a.set, "--traces", str(a.traces)], m)
        rows.append(row)
        rows.sort(key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))
        notes = (f"{a.model}, first {a.cases} cases of MQuAKE-hard.json (4 rewrites each), edited as sequential "
                 f"batches of {a.batch_size}; then every case's 3 multi-hop questions ('Q: {{q}} A:', greedy, "
                 "16 tokens; MeLLo answers by its own loop). multihop_acc: any answer matches new_answer or an "
                 "alias; multihop_acc_original: the pre-edit answer; single_hop_acc: the edited facts' prompts "
                 "completed with the new object; hop_acc / hopwise_acc: the new chain's single hops (each / all "
                 "of a case).")
        path = write(name, [{k: v for k, v in r.items() if k != "traces"} for r in rows],
                     ["method", "cases", "edits", "batch_size", *KEYS, "s_per_edit", "eval_s", "peak_rss_mb"], notes)
        tr = old_traces + [t for r in rows for t in r.get("traces", [])]
        if tr:
            with path.open("a") as f:
                f.write("\n## MeLLo decompositions (first question of the first cases)\n")
                for t in tr:
                    f.write(f"\ncase {t['case_id']}: new answer {t['new_answer']!r}, original {t['answer']!r}\n\n"
                            "```\n" + t["trace"].strip() + "\n```\n")
            (RESULTS / f"{name}.json").write_text(json.dumps({**json.loads((RESULTS / f'{name}.json').read_text()),
                                                              "mello_traces": tr}, indent=1))


if __name__ == "__main__":
    main()
