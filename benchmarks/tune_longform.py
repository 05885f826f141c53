"""AnyEdit's solve settings for a model, chosen on VALIDATION questions (never on the ones
`bench_longform.py` reports): EditEverything questions outside the benchmark's stratified pick
(taken round-robin over the categories, file order within each) and UnKE questions after its
first --bench-n. Each question is edited once per configuration (one per batch, the weights
restored after each, as the benchmark does); for each:

  z_loss      the window targets' mean final loss (deltas injected, before the solve)
  tf_nll      teacher-forced NLL per answer token of the EDITED model (question + answer)
  tf_acc      share of answer tokens the edited model predicts (argmax) under teacher forcing
  first_miss  the first answer token it misses: greedy generation leaves the answer there
  rougeL/bleu the benchmark's scores of the greedy answer (kedit_core.evaluate.longform)

Configurations that share the target settings reuse the window targets (AnyEdit memoises them
on the model), so a sweep over the solve (lambda, L2, ...) costs one target optimisation per
question. Rows are kept as they come (benchmarks/results/<name>.rows.json, atomic) and a rerun
resumes; the table is over the questions every configuration answered.

    python benchmarks/tune_longform.py --configs '{"m2000": {"base": "memit"},
        "m500": {"base": "memit", "mom2_update_weight": 500}}' --n 5
    OMP_NUM_THREADS=1 python benchmarks/tune_longform.py --configs ... --shard 0/2 &   # one core
    OMP_NUM_THREADS=1 python benchmarks/tune_longform.py --configs ... --shard 1/2 &   # each
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_longform import DATASETS, parse_shard, pick  # noqa: E402
from benchmarks.common import RESULTS, SHARED, machine, write  # noqa: E402

log = logging.getLogger("tune_longform")
SHOW = ["z_loss", "tf_nll", "tf_acc", "first_miss", "rougeL", "bleu", "minilm_cosine"]


def validation_questions(n: int, bench_n: int) -> dict[str, list]:
    """n EditEverything questions outside the benchmark's pick of bench_n (stratified over
    the categories as the benchmark picks) and UnKE's questions bench_n .. bench_n + n."""
    from kedit_core.data import read_dataset

    ee = [r for r in read_dataset(SHARED / DATASETS["editevery"]).requests if r.long_target]
    used = {r.case_id for r in pick(ee, bench_n, stratify=True)}
    uk = [r for r in read_dataset(SHARED / DATASETS["unke"]).requests if r.long_target]
    return {"editevery": pick([r for r in ee if r.case_id not in used], n, stratify=True),
            "unke": uk[bench_n:bench_n + n]}


def teacher_forced(lm, seq) -> dict:
    """NLL per answer token, argmax accuracy and the first missed answer token of the model
    as it is, on the question + answer ids AnyEdit edited on."""
    import torch
    import torch.nn.functional as F

    ids = torch.tensor([seq.ids], device=lm.device)
    with torch.no_grad():
        logits = lm.model(ids).logits[0, :-1].float()
    a = slice(seq.n_prompt - 1, len(seq.ids) - 1)
    tgt = ids[0, 1:][a]
    hit = logits[a].argmax(-1) == tgt
    miss = (~hit).nonzero()
    return {"tf_nll": F.cross_entropy(logits[a], tgt).item(), "tf_acc": hit.float().mean().item(),
            "first_miss": int(miss[0]) if len(miss) else int(hit.numel()), "n_answer": int(hit.numel())}


def summarise(rows: dict, configs: list[str]) -> list[dict]:
    """Mean of each score per configuration and dataset (and over both) over the questions
    that every configuration answered."""
    qs = {}
    for key, r in rows.items():
        qs.setdefault((r["dataset"], r["case"]), set()).add(r["config"])
    paired = sorted(q for q, cs in qs.items() if set(configs) <= cs)
    out = []
    for c in configs:
        for d in [*sorted({q[0] for q in paired}), "all"]:
            its = [rows[f"{c}|{q[0]}|{q[1]}"] for q in paired if d in ("all", q[0])]
            if its:
                out.append({"config": c, "dataset": d, "n": len(its),
                            **{k: sum(it[k] for it in its) / len(its) for k in SHOW}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", required=True, help="JSON {name: AnyEdit overrides}")
    ap.add_argument("--n", type=int, default=5, help="validation questions per dataset")
    ap.add_argument("--bench-n", type=int, default=50, help="questions per dataset the benchmark reports")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--name", default=None)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--shard", default=None, help="I/K: only every K-th validation question from the I-th "
                                                  "(0-based), into a rows file of its own; run K side by side "
                                                  "(OMP_NUM_THREADS=1 each); any later run reads them all")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        configs = asked = json.loads(a.configs)
        assert isinstance(configs, dict) and all(isinstance(v, dict) for v in configs.values())
    except (ValueError, AssertionError):
        print("--configs: expected a JSON object of {name: {hyper-parameter: value}}", file=sys.stderr)
        raise SystemExit(2) from None
    name = a.name or f"tune_longform_{a.model}_{a.n}"
    shard = parse_shard(a.shard)
    rows_path = RESULTS / (f"{name}.rows.json" if shard is None else f"{name}.rows.{shard[0]}of{shard[1]}.json")
    rows = {}
    for path in rows_files(name):      # the main file and every shard's: their union
        try:
            kept = json.loads(path.read_text())
            its, kc = kept["rows"], kept["configs"]
            clash = {c: kc[c] for c in configs if c in kc and kc[c] != configs[c]}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            print(f"{path}: unreadable ({e}); move it away to start again", file=sys.stderr)
            raise SystemExit(2) from None
        if clash:
            print(f"{path}: configurations {', '.join(clash)} were run with other settings "
                  f"({clash}); rename them", file=sys.stderr)
            raise SystemExit(2)
        rows.update(its)
        configs = kc | configs
    if not a.report_only:              # the configurations asked for (the table has all kept ones)
        run(a, asked, configs, rows, rows_path)
    table = summarise(rows, list(configs))
    notes = (f"{a.model}: AnyEdit configurations on validation questions (EditEverything outside the "
             f"benchmark's {a.bench_n}, UnKE after its first {a.bench_n}), one per batch, weights restored "
             "after each; means over the questions every configuration answered. z_loss: window targets' "
             "final loss; tf_*: teacher-forced on the edited model; first_miss: first answer token missed; "
             f"rougeL / bleu / minilm_cosine: the greedy answer of {a.max_new_tokens} tokens.\n\nConfigurations: "
             + "; ".join(f"`{c}` = {json.dumps(v)}" for c, v in configs.items()))
    write(name, table, ["config", "dataset", "n", *SHOW], notes)


def rows_files(name: str) -> list[Path]:
    """The kept rows of a sweep: its main file and the files of its shards."""
    main = RESULTS / f"{name}.rows.json"
    return [p for p in [main, *sorted(RESULTS.glob(f"{name}.rows.*of*.json"))] if p.exists()]


def run(a, asked: dict, configs: dict, rows: dict, rows_path: Path) -> None:
    import torch
    from tqdm.auto import tqdm

    from kedit_core import Editor
    from kedit_core.encoder import load_encoder
    from kedit_core.evaluate.longform import answer_questions, text_scores
    from kedit_core.io import atomic_write_json
    from kedit_core.methods.anyedit.method import longform_sequence
    from kedit_core.models import load

    torch.manual_seed(0)
    lm = load(a.model)
    enc = load_encoder()
    data = validation_questions(a.n, a.bench_n)
    order = [(d, qs[i]) for i in range(a.n) for d, qs in data.items() if i < len(qs)]
    shard = parse_shard(a.shard)
    if shard is not None:
        order = order[shard[0]::shard[1]]
    for d, r in tqdm(order, desc=f"validation questions ({len(configs)} configurations each)"):
        for c, over in asked.items():
            key = f"{c}|{d}|{r.case_id}"
            if key in rows:
                continue
            ed = Editor(lm, "anyedit", show_progress=False, **over)
            t0 = time.perf_counter()
            rec = ed.edit_batch([r])
            edit_s = time.perf_counter() - t0
            try:
                tf = teacher_forced(lm, longform_sequence(lm, r, ed.cfg))
                (pred,) = answer_questions(ed.model, [r.text], a.max_new_tokens)
                sc = text_scores([pred], [r.long_target], enc)[0]
            finally:
                ed.revert()
            rows[key] = {"config": c, "dataset": d, "case": r.case_id, "category": r.category,
                         "z_loss": rec.get("z_loss_mean"), **tf, **{k: sc[k] for k in ("rougeL", "bleu", "minilm_cosine")},
                         "edit_s": edit_s, "pred": pred[:1000]}
            log.info("%s %s %s: tf_acc %.3f first_miss %d rougeL %.3f", c, d, r.case_id, tf["tf_acc"],
                     tf["first_miss"], sc["rougeL"])
            atomic_write_json(rows_path, {"machine": machine(), "configs": configs, "rows": rows})


if __name__ == "__main__":
    main()
