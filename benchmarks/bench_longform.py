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
  memit-own,          the same baselines at their own settings, chosen on validation questions
  alphaedit-own       (tune_longform.py): 25 target steps, lambda 2000 / L2 10
EditEverything questions are taken round-robin over its categories (file order within each),
so that every category has rows; UnKE's first N. The questions go in turn (the datasets
alternating), each through every method before the next, and every answer is saved at once
(benchmarks/results/longform_<model>_<n>[_tag].items.json, atomic): a rerun resumes from them
(refused if they were made with another model, answer length or --set), and an interrupted
run reports the methods over the questions all of them have answered (--report-only writes
the tables from the saved answers without loading a model).

    python benchmarks/bench_longform.py --n 50                        # the acceptance table
    python benchmarks/bench_longform.py --n 2 --max-new-tokens 64 --tag smoke
    python benchmarks/bench_longform.py --n 50 --report-only         # tables of a partial run
    python benchmarks/bench_longform.py --n 50 --adopt \
        longform_smollm2-135m_50_defaults-2026-12-03:memit=memit-own,alphaedit=alphaedit-own

--adopt takes over a kept run's answers of one method as another's, only where both were made
with the same resolved hyper-parameters, model and answer length (checked; else exit 2): a
method whose settings equal an older run's does not answer those questions again.
    OMP_NUM_THREADS=1 python benchmarks/bench_longform.py --n 50 --shard 0/2 &   # one core each
    OMP_NUM_THREADS=1 python benchmarks/bench_longform.py --n 50 --shard 1/2 &   # (own files,
                                                      # read together by any later run)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, SHARED, machine, save_figure, write  # noqa: E402

log = logging.getLogger("bench_longform")

METHODS = {
    "anyedit-alphaedit": ("anyedit", {"base": "alphaedit"}),
    "anyedit-memit": ("anyedit", {"base": "memit"}),
    "memit": ("anyedit", {"base": "memit", "window_size": 0, "preserve_context": False}),
    "alphaedit": ("anyedit", {"base": "alphaedit", "window_size": 0, "preserve_context": False}),
    # the same baselines at their own settings, chosen on validation questions
    # (tune_longform_smollm2-135m_5_baselines.md: 25 target steps and the stiffer solve give
    # greedy answers closer to the reference than AnyEdit's 75 steps, lambda 500 / L2 1);
    # L2 is unused by the MEMIT solve and mom2_update_weight by AlphaEdit's: pinned so that the resolved
    # settings equal those of the 2026-12-03 run, whose answers --adopt can take over
    "memit-own": ("anyedit", {"base": "memit", "window_size": 0, "preserve_context": False,
                              "v_num_grad_steps": 25, "mom2_update_weight": 2000.0, "L2": 10.0}),
    "alphaedit-own": ("anyedit", {"base": "alphaedit", "window_size": 0, "preserve_context": False,
                                  "v_num_grad_steps": 25, "L2": 10.0, "mom2_update_weight": 2000.0}),
}
DATASETS = {"editevery": "anyedit/editevery.json", "unke": "anyedit/UnKE_final_data_v2.json"}
IDENTITY = ("model", "max_new_tokens", "set")   # options an answer depends on
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
    ap.add_argument("--report-only", action="store_true", help="write the tables from the kept answers")
    ap.add_argument("--shard", default=None, help="I/K: answer only every K-th question from the I-th (0-based), "
                                                  "into a file of its own; run K of them side by side (one core "
                                                  "each); any later run reads them all")
    ap.add_argument("--adopt", default=None, help="RUN:old=new[,old=new...]: take over the kept run RUN's "
                                                  "answers of `old` as `new`'s (same resolved settings only)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from kedit_core.data import read_dataset

    methods = a.methods.split(",")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown methods {bad} (known: {', '.join(METHODS)})")
    name = f"longform_{a.model}_{a.n}{('_' + a.tag) if a.tag else ''}"
    shard = parse_shard(a.shard)
    items_path = RESULTS / (f"{name}.items.json" if shard is None else f"{name}.items.{shard[0]}of{shard[1]}.json")
    items: dict[str, dict] = {}
    a.configs = None                   # the resolved hyper-parameters of each method's answers
    for path in kept_files(name):      # the main file and every shard's: their union
        try:
            kept = json.loads(path.read_text())
            its, was = kept["items"], kept["args"]
            confs = was.get("configs") or {}
            items.update(its)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            print(f"{path}: unreadable ({e}); move it away to start again", file=sys.stderr)
            raise SystemExit(2) from None
        if a.configs is not None and config_clash(a.configs, confs):
            print(f"{path}: its answers were made with other hyper-parameters than the other kept files'",
                  file=sys.stderr)
            raise SystemExit(2)
        a.configs = (a.configs or {}) | confs
        diff = [k for k in IDENTITY if k in was and was[k] != getattr(a, k)]
        if a.report_only:              # the tables say what the answers were made with
            for k in IDENTITY:
                if k in was:
                    setattr(a, k, was[k])
        elif diff:
            print(f"{path}: its answers were made with other {', '.join(diff)} "
                  f"({', '.join(f'{k}={was[k]!r}' for k in diff)}); use another --tag", file=sys.stderr)
            raise SystemExit(2)
    data = {}
    for d in a.datasets.split(","):
        ds = read_dataset(SHARED / DATASETS[d])
        data[d] = pick([r for r in ds.requests if r.long_target], a.n, stratify=(d == "editevery"))
    if not a.report_only:
        run(a, methods, data, items, items_path)
    report(a, name, methods, data, items)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """--shard I/K: this process answers the questions whose place in the order is I mod K."""
    if not text:
        return None
    try:
        i, k = (int(x) for x in text.split("/"))
        assert 0 <= i < k
    except (ValueError, AssertionError):
        print(f"--shard: expected I/K with 0 <= I < K, not {text!r}", file=sys.stderr)
        raise SystemExit(2) from None
    return i, k


def kept_files(name: str) -> list[Path]:
    """The kept answers of a run: its main file and the files of its shards."""
    main = RESULTS / f"{name}.items.json"
    return [p for p in [main, *sorted(RESULTS.glob(f"{name}.items.*of*.json"))] if p.exists()]


def config_clash(kept: dict, configs: dict) -> dict[str, list[str]]:
    """The methods whose kept answers were made with other resolved hyper-parameters than
    `configs` (a changed default included), each with the names that differ."""
    return {m: sorted(k for k in set(configs[m]) | set(kept[m]) if kept[m].get(k) != configs[m].get(k))
            for m in sorted(configs) if m in kept and kept[m] != configs[m]}


def adopt(spec: str, configs: dict, a, items: dict) -> int:
    """--adopt RUN:old=new,...: copy RUN's kept answers of `old` into `items` as `new`'s
    (marked `adopted_from`) where `new` has none yet - only if RUN made them with the same
    model, answer length, --set and resolved hyper-parameters as `new` has here (exit 2
    naming the difference otherwise). Returns the number of answers taken over."""
    try:
        run_name, pairs = spec.split(":", 1)
        mapping = dict(p.split("=") for p in pairs.split(","))
    except ValueError:
        print(f"--adopt: expected RUN:old=new[,old=new...], not {spec!r}", file=sys.stderr)
        raise SystemExit(2) from None
    files = kept_files(run_name)
    if not files:
        print(f"--adopt: no kept answers of {run_name!r} in {RESULTS}", file=sys.stderr)
        raise SystemExit(2)
    n = 0
    for path in files:
        try:
            kept = json.loads(path.read_text())
            its, was = kept["items"], kept["args"]
            confs = was["configs"]
        except (ValueError, KeyError, TypeError) as e:
            print(f"{path}: unreadable ({e})", file=sys.stderr)
            raise SystemExit(2) from None
        for old, new in mapping.items():
            if new not in configs:
                print(f"--adopt: {new!r} is not one of the methods run here", file=sys.stderr)
                raise SystemExit(2)
            same = [k for k in IDENTITY if was.get(k) != getattr(a, k)]
            diff = config_clash({new: confs.get(old, {})}, {new: configs[new]}) if old in confs else {new: ["all"]}
            if same or diff:
                print(f"{path}: its answers of {old} were made with other "
                      f"{', '.join(same + [k for ks in diff.values() for k in ks])} than {new} here",
                      file=sys.stderr)
                raise SystemExit(2)
            for key, it in its.items():
                m, d, c = key.split("|", 2)
                if m == old and f"{new}|{d}|{c}" not in items:
                    items[f"{new}|{d}|{c}"] = {**it, "method": new, "adopted_from": f"{run_name}:{old}"}
                    n += 1
    log.info("adopted %d answers from %s", n, run_name)
    return n


def run(a, methods, data, items, items_path) -> None:
    import torch
    from tqdm.auto import tqdm

    from kedit_core import Editor
    from kedit_core.encoder import load_encoder
    from kedit_core.evaluate.longform import answer_questions, text_scores
    from kedit_core.io import atomic_write_json
    from kedit_core.models import load

    torch.manual_seed(0)
    lm = load(a.model, device=a.device)
    enc = load_encoder()

    def save():
        atomic_write_json(items_path, {"machine": machine(), "args": vars(a), "items": items})

    def score(view, r) -> dict:
        t0 = time.perf_counter()
        (pred,) = answer_questions(view, [r.text], a.max_new_tokens)
        row = text_scores([pred], [r.long_target], enc)[0]
        return {**row, "pred": pred[:2000], "gen_s": time.perf_counter() - t0}

    editors = {m: Editor(lm, METHODS[m][0], show_progress=False, **(METHODS[m][1] | json.loads(a.set)))
               for m in methods}
    # every resolved hyper-parameter is part of the answers' identity (a changed default too)
    configs = {m: json.loads(json.dumps(dataclasses.asdict(ed.cfg), default=str)) for m, ed in editors.items()}
    kept = vars(a).get("configs") or {}
    diff = config_clash(kept, configs)
    if diff:
        which = "; ".join(m + ": " + ", ".join(ks) for m, ks in diff.items())
        print(f"{items_path}: its answers of {', '.join(diff)} were made with other hyper-parameters "
              f"({which}); use another --tag", file=sys.stderr)
        raise SystemExit(2)
    a.configs = kept | configs
    if a.adopt:
        adopt(a.adopt, configs, a, items)
        save()
    # questions outer, methods inner: an interrupted run has every method on the same questions
    # (a paired comparison), and a rerun goes on from the first question some method lacks
    # the datasets alternate, so that a partial run has rows of both
    order = [(d, reqs[i]) for i in range(max(map(len, data.values()))) for d, reqs in data.items() if i < len(reqs)]
    shard = parse_shard(a.shard)
    if shard is not None:
        order = order[shard[0]::shard[1]]
    for d, r in tqdm(order, desc=f"questions ({len(methods)} methods each)"):
        for m, ed in editors.items():
            key = f"{m}|{d}|{r.case_id}"
            if key in items:
                continue
            bkey = f"unedited|{d}|{r.case_id}"
            if bkey not in items:
                items[bkey] = {"method": "unedited", "dataset": d, "category": r.category,
                               **score(ed.model, r)}
            log.info("%s %s %s: editing", d, r.case_id, m)
            t0 = time.perf_counter()
            rec = ed.edit_batch([r])
            edit_s = time.perf_counter() - t0
            info = rec.get("method_info", {})
            # the second base editor of a pair reuses the first one's window targets (AnyEdit's
            # memo): on its own it would also have paid for their optimisation
            alone = edit_s + (info.get("targets_s", 0.0) if info.get("targets_reused") else 0.0)
            try:
                items[key] = {"method": m, "dataset": d, "category": r.category, "edit_s": edit_s,
                              "edit_alone_s": alone, "targets_reused": bool(info.get("targets_reused")),
                              "z_loss": rec.get("z_loss_mean"), **score(ed.model, r)}
            finally:
                ed.revert()                       # the weights as loaded, for the next question
            save()


def report(a, name, methods, data, items) -> None:
    """The tables over the questions that every method (and the unedited model) has answered,
    so that a partial run still compares the methods on the same questions."""
    from kedit_core.evaluate.longform import aggregate

    rows, cat_rows, paired = [], [], {}
    for d, reqs in data.items():
        paired[d] = [r.case_id for r in reqs
                     if all(f"{m}|{d}|{r.case_id}" in items for m in ["unedited", *methods])]
    for m in ["unedited", *methods]:
        for d in data:
            its = [items[f"{m}|{d}|{c}"] for c in paired[d]]
            if not its:
                continue
            agg = aggregate([{k: it[k] for k in SHOW} for it in its], [it["category"] for it in its])
            row = {"method": m, "dataset": d, "n": agg["n"], **{k: agg[k] for k in SHOW}}
            if m != "unedited":
                row["edit_s"] = sum(it["edit_s"] for it in its) / len(its)
                alone = [it["edit_alone_s"] for it in its if "edit_alone_s" in it]   # older answers lack it
                row["edit_alone_s"] = sum(alone) / len(alone) if alone else None
            row["gen_s"] = sum(it["gen_s"] for it in its) / len(its)
            rows.append(row)
            for c, g in agg.get("by_category", {}).items():
                cat_rows.append({"method": m, "dataset": d, "category": c, "n": g["n"], **{k: g[k] for k in SHOW}})
    done = ", ".join(f"{d}: {len(paired[d])} of {len(data[d])}" for d in data)
    used = [items[f"{m}|{d}|{c}"] for m in methods for d in data for c in paired[d]]
    srcs = {it["adopted_from"] for it in used if "adopted_from" in it}
    adopted = sum("adopted_from" in it for it in used)
    notes = (f"{a.model}; {a.n} questions per dataset ({done} answered by every method; the tables are "
             "over those), one per batch, weights restored after each; greedy "
             f"answers of {a.max_new_tokens} tokens to the chat-templated question. `unedited` is before "
             "the edits. bleu = sacrebleu sentence BLEU; rougeL / rougeL_recall = rouge-score F1 / recall; "
             "minilm_cosine = the reference's 'Bert Score'; anyedit_char_bleu = the reference's nltk BLEU "
             "over characters. memit / alphaedit: the reference's long-form baselines (one vector for the "
             "whole answer, AnyEdit's hyper-parameters); memit-own / alphaedit-own: the same at their own "
             "settings chosen on validation questions (25 target steps, lambda 2000 / L2 10)"
             + (f"; {adopted} of their answers were taken over (--adopt) from {', '.join(sorted(srcs))}, "
                "made with the same resolved settings" if adopted else "")
             + ". edit_s / gen_s: seconds per question; the second base editor of each pair reuses the "
             "first one's window targets (they do not depend on the solve), so its edit_s is its solve; "
             "edit_alone_s adds what the targets cost, i.e. the method run on its own (answers kept from "
             "before 2026-12-04 05:00 lack it).")
    write(name, rows, ["method", "dataset", "n", *SHOW, "edit_s", "edit_alone_s", "gen_s"], notes)
    if cat_rows:
        write(name + "_by_category", cat_rows, ["method", "dataset", "category", "n", *SHOW],
              "Per category (EditEverything's own categories; UnKE has none).")
    if rows:
        plot(rows, RESULTS / f"{name}.png", f"{a.model}: long-form edits ({done})")


def plot(rows: list[dict], path: Path, title: str) -> Path:
    """Grouped bars: ROUGE-L F1 and MiniLM cosine per dataset, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    w = 0.8 / len(methods)
    for ax, key in zip(axes, ("rougeL", "minilm_cosine")):
        for i, m in enumerate(methods):
            ys = [next((r[key] for r in rows if r["method"] == m and r["dataset"] == d), float("nan"))
                  for d in datasets]
            ax.bar([j + i * w for j in range(len(datasets))], ys, w, color=f"C{i}", label=m)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(datasets))], datasets)
        ax.set_title(key), ax.set_ylim(0, 1)
    axes[1].legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    return save_figure(fig, path, title)


if __name__ == "__main__":
    main()
