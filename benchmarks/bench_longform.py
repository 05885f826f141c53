"""Long-form editing (AnyEdit, Jiang et al. 2025, arXiv 2502.05628): AnyEdit over AlphaEdit
and over MEMIT against the plain editors on N EditEverything and N UnKE questions, as the
reference evaluates (`experiments/evaluate_uns.py`): one question per batch, the weights
restored after each, greedy answers (the reference samples at T = 0.001) to the question
through the chat template, scored against the long answer before and after the edit: BLEU
(sacrebleu), ROUGE-L F1 and recall, MiniLM cosine (the reference's "Bert Score") and the
reference's character-level BLEU (kedit_core.evaluate.longform), overall and per category.

Methods (--methods, comma-separated):
  anyedit-alphaedit   AnyEdit over AlphaEdit (AlphaEdit_ARE)
  anyedit-memit       AnyEdit over MEMIT (MEMIT_ARE)
  memit, alphaedit    the reference's long-form MEMIT / AlphaEdit baselines (its `memit/`,
                      `AlphaEdit/`): one target vector for the whole answer at the last question
                      token, keys there only, the same loss and hyper-parameters - i.e. anyedit
                      with window_size=0 and preserve_context=false
EditEverything questions are taken round-robin over its categories (file order within each),
so that every category has rows; UnKE's first N. Rows are saved after every question
(benchmarks/results/longform_<model>_<n>[_tag].items.json) and a rerun resumes from them.

    python benchmarks/bench_longform.py --n 50                        # the acceptance table
    python benchmarks/bench_longform.py --n 2 --max-new-tokens 64 --tag smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, SHARED, machine, write  # noqa: E402

METHODS = {
    "anyedit-alphaedit": ("anyedit", {"base": "alphaedit"}),
    "anyedit-memit": ("anyedit", {"base": "memit"}),
    "memit": ("anyedit", {"base": "memit", "window_size": 0, "preserve_context": False}),
    "alphaedit": ("anyedit", {"base": "alphaedit", "window_size": 0, "preserve_context": False}),
}
DATASETS = {"editevery": "anyedit/editevery.json", "unke": "anyedit/UnKE_final_data_v2.json"}
SHOW = ["bleu", "rougeL", "rougeL_recall", "minilm_cosine", "anyedit_char_bleu"]


def pick(requests, n: int, stratify: bool) -> list:
    if not stratify:
        return list(requests[:n])
    groups: dict[str, list] = defaultdict(list)
    for r in requests:
        groups[r.category or "-"].append(r)
    out, k = [], 0
    while len(out) < n and any(len(g) > k for g in groups.values()):
        out += [g[k] for _, g in sorted(groups.items()) if len(g) > k][:n - len(out)]
        k += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50, help="questions per dataset")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--datasets", default="editevery,unke")
    ap.add_argument("--max-new-tokens", type=int, default=512, help="tokens per answer (reference: 512)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", default="{}", help="JSON hyper-parameter overrides for every method")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()

    import torch
    from tqdm.auto import tqdm

    from kedit_core import Editor
    from kedit_core.data import read_dataset
    from kedit_core.encoder import load_encoder
    from kedit_core.evaluate.longform import aggregate, answer_questions, text_scores
    from kedit_core.io import atomic_write_json
    from kedit_core.models import load

    methods = a.methods.split(",")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown methods {bad} (known: {', '.join(METHODS)})")
    name = f"longform_{a.model}_{a.n}{('_' + a.tag) if a.tag else ''}"
    items_path = RESULTS / f"{name}.items.json"
    items: dict[str, dict] = json.loads(items_path.read_text())["items"] if items_path.exists() else {}
    torch.manual_seed(0)
    lm = load(a.model, device=a.device)
    enc = load_encoder()
    data = {}
    for d in a.datasets.split(","):
        ds = read_dataset(SHARED / DATASETS[d])
        data[d] = pick([r for r in ds.requests if r.long_target], a.n, stratify=(d == "editevery"))

    def save():
        atomic_write_json(items_path, {"machine": machine(), "args": vars(a), "items": items})

    def score(view, r) -> dict:
        t0 = time.perf_counter()
        (pred,) = answer_questions(view, [r.text], a.max_new_tokens)
        row = text_scores([pred], [r.long_target], enc)[0]
        return {**row, "pred": pred[:2000], "gen_s": time.perf_counter() - t0}

    for m in methods:
        method, over = METHODS[m]
        ed = Editor(lm, method, show_progress=False, **(over | json.loads(a.set)))
        for d, reqs in data.items():
            for r in tqdm(reqs, desc=f"{m} {d}"):
                key = f"{m}|{d}|{r.case_id}"
                if key in items:
                    continue
                bkey = f"unedited|{d}|{r.case_id}"
                if bkey not in items:
                    items[bkey] = {"method": "unedited", "dataset": d, "category": r.category,
                                   **score(ed.model, r)}
                t0 = time.perf_counter()
                rec = ed.edit_batch([r])
                edit_s = time.perf_counter() - t0
                try:
                    items[key] = {"method": m, "dataset": d, "category": r.category, "edit_s": edit_s,
                                  "z_loss": rec.get("z_loss_mean"), **score(ed.model, r)}
                finally:
                    ed.revert()                       # the weights as loaded, for the next question
                save()

    rows, cat_rows = [], []
    for m in ["unedited", *methods]:
        for d in data:
            its = [v for k, v in items.items() if v["method"] == m and v["dataset"] == d
                   and k.split("|")[2] in {r.case_id for r in data[d]}]
            if not its:
                continue
            agg = aggregate([{k: it[k] for k in SHOW} for it in its], [it["category"] for it in its])
            row = {"method": m, "dataset": d, "n": agg["n"], **{k: agg[k] for k in SHOW}}
            if m != "unedited":
                row["edit_s"] = sum(it["edit_s"] for it in its) / len(its)
            row["gen_s"] = sum(it["gen_s"] for it in its) / len(its)
            rows.append(row)
            for c, g in agg.get("by_category", {}).items():
                cat_rows.append({"method": m, "dataset": d, "category": c, "n": g["n"], **{k: g[k] for k in SHOW}})
    notes = (f"{a.model}; {a.n} questions per dataset, one per batch, weights restored after each; greedy "
             f"answers of {a.max_new_tokens} tokens to the chat-templated question. `unedited` is before "
             "the edits. bleu = sacrebleu sentence BLEU; rougeL / rougeL_recall = rouge-score F1 / recall; "
             "minilm_cosine = the reference's 'Bert Score'; anyedit_char_bleu = the reference's nltk BLEU "
             "over characters. memit / alphaedit: the reference's long-form baselines (one vector for the "
             "whole answer). edit_s / gen_s: seconds per question.")
    write(name, rows, ["method", "dataset", "n", *SHOW, "edit_s", "gen_s"], notes)
    if cat_rows:
        write(name + "_by_category", cat_rows, ["method", "dataset", "category", "n", *SHOW],
              "Per category (EditEverything's own categories; UnKE has none).")


if __name__ == "__main__":
    main()
