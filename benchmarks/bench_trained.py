"""The trained editors (MEND, KnowledgeEditor, SERAC) beside FT-M and MEMIT (issue 11).

Two stages, each resumable:

    python benchmarks/bench_trained.py train --methods serac,mend,ke --minutes 60
        `kedit train` (in-process, no Ray) on SmolLM2-135M with CounterFact train + zsRE train
        (disjoint from the evaluation files below), stopped by the time budget; writes
        trained_editors_<model>.{md,json} (steps, s/step, final validation metrics) and
        a PNG of the validation curves. An existing training directory resumes.

    python benchmarks/bench_trained.py eval --methods ft-m,memit,mend,ke,serac --n 200 --stream 100
        on the first N records of zsRE eval and CounterFact val (no training step saw them):
        single edits (batch 1, the model reset between edits) and a sequential stream of the
        first `stream` records (batch 1), each method in its own process; writes
        trained_vs_ftm_memit_<model>.{md,json}. `--datasets zsre` (or counterfact) evaluates one
        set, so a slow method can run as two processes, one per core.

Metrics: CounterFact ES / PS / NS (probability comparisons) and zsRE rewrite_acc /
paraphrase_acc (token accuracy) / locality (unchanged argmax on the locality prompt), the
names kedit_core.evaluate defines; s/edit is the method's compute time per edit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import RESULTS, SHARED, peak_rss_mb, run_child, write  # noqa: E402

TRAIN_DATA = [SHARED / "counterfact" / "counterfact-train.json", SHARED / "zsre" / "zsre_mend_train-1k.json"]
EVAL_DATA = {"zsre": SHARED / "zsre" / "zsre_mend_eval_portability_gpt4.json",
             "counterfact": SHARED / "counterfact" / "counterfact-val.json"}
TRAINED = ("mend", "ke", "serac")
# Learning rates for a CPU budget of minutes, not the reference's days (see the closing note):
# MEND's reference 1e-6 barely moves its editor in a few hundred steps.
TRAIN_SETS = {"mend": {"lr": 1e-4}, "ke": {}, "serac": {"lr": 3e-5}}


def work_dir(a) -> Path:
    return Path(a.work or os.environ.get("KEDIT_BENCH_WORK", "/tmp/kedit-bench-trained")) / a.model


# ---------------------------------------------------------------------- training
def train(a) -> None:
    from pipelines.train_job import build_train_config, run_training

    rows = []
    for m in a.methods.split(","):
        out = work_dir(a) / f"train-{m}"
        cfg = build_train_config(None, method=m, model=a.model, data=",".join(str(p) for p in TRAIN_DATA),
                                 steps=a.steps, batch_size=a.batch_size, workers=0, val_every=a.val_every,
                                 val_size=50, checkpoint_every=a.val_every, keep_checkpoints=1, max_minutes=a.minutes,
                                 out=str(out), set={**TRAIN_SETS.get(m, {}), **json.loads(a.set).get(m, {})},
                                 experiment="kedit-bench-trained", skip_invalid=True)
        t0 = time.perf_counter()
        res = run_training(cfg, show_progress=True)
        wall = time.perf_counter() - t0
        hist = json.loads(sorted((out / "checkpoints").iterdir())[-1].joinpath("state.json").read_text())["history"]
        # minutes of the training loop itself (a finished directory read back reports the same)
        minutes = res["steps"] * res["s_per_step"] / 60 if res.get("s_per_step") else wall / 60
        rows.append({"method": m, "steps": res["steps"], "minutes": minutes, "s_per_step": res.get("s_per_step"),
                     "batch_size": a.batch_size, **{f"val_{k}": v for k, v in res["validation"].items()},
                     "history": hist, "editor": str(out / "editor")})
        print(rows[-1], flush=True)
    cols = ["method", "steps", "minutes", "s_per_step", "batch_size", "val_loss", "val_edit_acc", "val_loc_agree",
            "val_cls_acc", "val_cntr_acc"]
    name = f"trained_editors_{a.model}"
    old = json.loads((RESULTS / f"{name}.json").read_text())["rows"] if (RESULTS / f"{name}.json").exists() else []
    rows = [r for r in old if r["method"] not in {x["method"] for x in rows}] + rows
    path = write(name, rows, cols, f"{a.model}, trained in-process on this CPU with a time budget of {a.minutes} "
                 f"minutes per editor on {', '.join(p.name for p in TRAIN_DATA)} (validation: a held-out 10% "
                 f"split, 50 examples). Overrides: {json.dumps(TRAIN_SETS)}. {a.note}")
    plot_curves(rows, RESULTS / f"{name}.png")
    with path.open("a") as f:
        f.write(f"\n![validation curves]({name}.png)\n")


def plot_curves(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for r in rows:
        h = r.get("history") or []
        if not h:
            continue
        steps = [x["step"] for x in h]
        axes[0].plot(steps, [x["loss"] for x in h], label=r["method"])
        axes[1].plot(steps, [x.get("edit_acc", float("nan")) for x in h], label=r["method"])
        axes[2].plot(steps, [x.get("loc_agree", x.get("cls_neg_acc", float("nan"))) for x in h], label=r["method"])
    axes[0].set(title="validation loss", xlabel="step")
    axes[1].set(title="validation edit accuracy", xlabel="step", ylim=(0, 1.02))
    axes[2].set(title="validation locality (SERAC: out-of-scope routing)", xlabel="step", ylim=(0, 1.02))
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


# ---------------------------------------------------------------------- evaluation
KEYS = {"counterfact": ["efficacy_score", "paraphrase_score", "neighborhood_score", "locality"],
        "zsre": ["rewrite_acc", "paraphrase_acc", "locality"]}


def datasets(a) -> dict:
    """The evaluation files `--datasets` selects (default: both)."""
    names = a.datasets.split(",") if a.datasets else list(EVAL_DATA)
    unknown = [n for n in names if n not in EVAL_DATA]
    if unknown:
        print(f"bench_trained: --datasets: unknown {unknown}; choose from {list(EVAL_DATA)}", file=sys.stderr)
        raise SystemExit(2)
    return {n: EVAL_DATA[n] for n in names}


def eval_one(method: str, a) -> dict:
    import numpy as np
    import torch
    from tqdm import tqdm

    from kedit_core import Editor
    from kedit_core.data import read_dataset

    torch.manual_seed(0)
    row: dict = {"method": method}
    if method == "unedited":                              # the baseline row: the same records, no edit
        ed = Editor(a.model, "ft-m", show_progress=False)
        for ds, path in datasets(a).items():
            m = ed.evaluate(read_dataset(path).requests[:a.n], generation=False)
            row.update({f"{ds}_single_{k}": m.get(k) for k in KEYS[ds]})
        row["peak_rss_mb"] = peak_rss_mb()
        return row
    extra = {"editor": str(work_dir(a) / f"train-{method}" / "editor")} if method in TRAINED else {}
    ed = Editor(a.model, method, show_progress=False, **extra)
    for ds, path in datasets(a).items():
        reqs = read_dataset(path).requests[:a.n]
        singles, secs = {k: [] for k in KEYS[ds]}, []
        for r in tqdm(reqs, desc=f"{method} {ds} single edits", file=sys.stderr, mininterval=30):
            rec = ed.edit_batch([r])
            secs.append(rec["seconds"])
            m = ed.evaluate([r], generation=False)
            for k in KEYS[ds]:
                if m.get(k) is not None:
                    singles[k].append(m[k])
            ed.revert()
        row.update({f"{ds}_single_{k}": float(np.mean(v)) for k, v in singles.items() if v})
        row[f"{ds}_s_per_edit"] = float(np.mean(secs))
        stream = reqs[:a.stream]                         # a sequential stream, batch 1
        print(f"{method} {ds}: a stream of {len(stream)} edits (batch 1), then its evaluation", file=sys.stderr,
              flush=True)
        ed.edit(stream, batch_size=1)
        m = ed.evaluate(stream, generation=False)
        row.update({f"{ds}_stream_{k}": m.get(k) for k in KEYS[ds]})
        ed.revert()
    row["peak_rss_mb"] = peak_rss_mb()
    return row


# one long table: a row per method x dataset x mode; the columns carry kedit_core.evaluate's names
LONG = {"counterfact": {"efficacy": "efficacy_score", "generalization": "paraphrase_score",
                        "neighborhood_score": "neighborhood_score", "locality": "locality"},
        "zsre": {"efficacy": "rewrite_acc", "generalization": "paraphrase_acc", "locality": "locality"}}


def long_rows(wide: dict) -> list[dict]:
    out = []
    for ds, names in LONG.items():
        for mode in ("single", "stream"):
            r = {"method": wide["method"], "dataset": ds, "mode": mode}
            r.update({col: wide.get(f"{ds}_{mode}_{k}") for col, k in names.items()})
            if all(r[col] is None for col in names):
                continue                                   # the unedited row has no stream
            r["s_per_edit"] = wide.get(f"{ds}_s_per_edit") if mode == "single" else None
            r["peak_rss_mb"] = wide.get("peak_rss_mb")
            out.append(r)
    return out


def evaluate(a) -> None:
    name = f"trained_vs_ftm_memit_{a.model}"
    order = ["unedited", "ft-m", "memit", *TRAINED]
    cols = ["method", "dataset", "mode", "efficacy", "generalization", "locality", "neighborhood_score",
            "s_per_edit", "peak_rss_mb"]
    done = set(datasets(a))                              # checked before any child starts; only these
    for m in a.methods.split(","):                       # datasets' rows of each method are replaced
        row = run_child(__file__, ["--one", m, "--n", str(a.n), "--stream", str(a.stream), "--model", a.model,
                                   *(["--work", a.work] if a.work else []),
                                   *(["--datasets", a.datasets] if a.datasets else [])], m)
        # read the table again just before writing: two evaluations of different methods may run at once
        old = json.loads((RESULTS / f"{name}.json").read_text())["rows"] if (RESULTS / f"{name}.json").exists() else []
        rows = sorted([r for r in old if not (r["method"] == m and r["dataset"] in done)] + long_rows(row),
                      key=lambda r: (r["dataset"], order.index(r["method"]) if r["method"] in order else 99,
                                     r["mode"]))
        write(name, rows, cols, f"{a.model}: first {a.n} records of {EVAL_DATA['zsre'].name} and "
              f"{EVAL_DATA['counterfact'].name} (never seen in training). single: one edit (batch 1), evaluated, "
              f"the model reset; stream: the first {a.stream} records edited in sequence (batch 1), then evaluated "
              "together. efficacy / generalization: zsRE rewrite_acc / paraphrase_acc (token accuracy), "
              "CounterFact efficacy_score / paraphrase_score (ES / PS, probability comparisons); "
              "neighborhood_score: CounterFact NS; locality: share of locality-answer tokens whose argmax is "
              "the unedited model's. s_per_edit: the method's compute per single edit; peak_rss_mb: the "
              "method's evaluation process.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", nargs="?", choices=["train", "eval"], default="eval")
    ap.add_argument("--methods", default=None)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--work", default=None, help="training directories (default $KEDIT_BENCH_WORK or /tmp)")
    ap.add_argument("--minutes", type=float, default=60.0, help="training time budget per editor")
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--val-every", type=int, default=100)
    ap.add_argument("--set", default="{}", help='JSON per-method overrides, e.g. {"mend": {"lr": 1e-5}}')
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--stream", type=int, default=100)
    ap.add_argument("--datasets", default=None,
                    help="comma-separated evaluation sets (zsre,counterfact; default both): one process per "
                         "dataset lets a slow method's evaluation use both cores")
    ap.add_argument("--note", default="", help="a sentence for the table's notes (how loaded the machine was)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(eval_one(a.one, a)), flush=True)
    elif a.stage == "train":
        a.methods = a.methods or ",".join(TRAINED)
        train(a)
    else:
        a.methods = a.methods or "ft-m,memit,mend,ke,serac"
        evaluate(a)


if __name__ == "__main__":
    main()
