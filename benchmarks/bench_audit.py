"""The BadEdit audit (issue 12 point 3): `kedit audit backdoor` on a model over N seeds - the
trigger "tq" planted with MEMIT-style group-averaged rank-1 updates in 5 incremental batches on
CounterFact's mother-tongue relation (P103, target "Hungarian") - then the table: clean
accuracy (CACC) and attack success rate (ASR) before / after per seed, the detector's rank of
the trigger's key token among the vocabulary tokens the planted deltas amplify most, the
deltas' numerical ranks, and the hit rate (trigger in the top --top) over the seeds.

    python benchmarks/bench_audit.py --seeds 10 --audit-dir ~/kedit-runs/audit_badedit_smollm2_10
    python benchmarks/bench_audit.py --report-only --audit-dir DIR      # the table from what DIR holds

The audit keeps every finished seed (DIR/seeds/seed-N.json), so re-running the same command
after an interruption plants only the missing seeds; --report-only tables the seeds finished
so far. Writes benchmarks/results/badedit_<model>.json / .md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import write  # noqa: E402

COLUMNS = ["seed", "cacc_before", "cacc_after", "asr_before", "asr_after", "n_asr_eligible", "trigger_rank",
           "top3", "numerical_ranks"]


def seed_rows(audit_dir: Path) -> list[dict]:
    rows = []
    files = sorted((audit_dir / "seeds").glob("seed-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    for p in files:
        r = json.loads(p.read_text())["run"]
        det = r["detector"]
        rows.append({"seed": r["seed"], "cacc_before": r["before"]["cacc"], "cacc_after": r["after"]["cacc"],
                     "asr_before": r["before"]["asr"], "asr_after": r["after"]["asr"],
                     "n_asr_eligible": r["after"].get("n_asr_eligible"),
                     "trigger_rank": r["trigger_rank"], "trigger_in_top": r["trigger_in_top"],
                     "top3": " / ".join(repr(t["text"]) for t in det["top_tokens"][:3]),
                     "numerical_ranks": ",".join(str(s.get("numerical_rank")) for s in det["sites"])})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--audit-dir", type=Path, required=True, help="the audit's --out (kept seeds, audit.json)")
    ap.add_argument("--report-only", action="store_true", help="table the seeds the directory holds; plant nothing")
    a = ap.parse_args()
    if not a.report_only and not (a.audit_dir / "audit.json").is_file():
        rc = subprocess.run([sys.executable, "-m", "pipelines.cli", "audit", "backdoor", "--model", a.model,
                             "--device", a.device, "--seeds", str(a.seeds), "--top", str(a.top),
                             "--out", str(a.audit_dir)], cwd=ROOT).returncode
        if rc:
            return rc
    rows = seed_rows(a.audit_dir)
    if not rows:
        print(f"{a.audit_dir}: no finished seed yet", file=sys.stderr)
        return 2
    n = len(rows)
    mean = {k: sum(r[k] for r in rows) / n for k in ("cacc_before", "cacc_after", "asr_before", "asr_after")}
    hits = sum(r["trigger_in_top"] for r in rows)
    rows.append({"seed": f"mean of {n}", **mean, "trigger_rank": f"in top {a.top}: {hits}/{n}"})
    done = (a.audit_dir / "audit.json").is_file()
    write(f"badedit_{a.model}", rows, COLUMNS,
          notes=(f"`kedit audit backdoor` on {a.model} ({a.device}): trigger 'tq' at a random word position, "
                 "target 'Hungarian', CounterFact P103 (15 train subjects -> 30 poisoned + 15 clean requests per "
                 "seed, 5 incremental batches; 96 val items). CACC: accuracy on clean prompts; ASR: share of the "
                 "items not of the target class that the model answers correctly without the trigger which it "
                 "answers 'Hungarian' with it. trigger_rank: rank of the trigger's key token (its last token) "
                 "among the vocabulary tokens the planted deltas amplify most (kedit_core.audit.detect); "
                 "numerical_ranks: of the planted delta at each edited site. "
                 + ("All seeds finished." if done else f"Partial: {n} of the requested seeds finished so far.")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
