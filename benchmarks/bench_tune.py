"""Choose a method's SmolLM2 hyper-parameters honestly (issue 13 point 6) and report them on
records that neither this tune nor the earlier choice of defaults saw.

    python benchmarks/bench_tune.py [--method alphaedit|memit] [--trials 6] [--limit 40] [--test-limit 100] [--out DIR]

`kedit tune` on ../shared/data/counterfact/counterfact-val.json (the first `--limit` records,
minus any of counterfact_portability_gpt4.json: the records the current defaults were chosen
on and the benchmarks report), streams in batches of 20; then the chosen and the current
default hyper-parameters on the first `--test-limit` records of counterfact-edit.json that
are not in counterfact_portability_gpt4.json, in batches of 20. Resumable: run the same
command again after an interruption (the tune directory keeps every finished trial and
stream). Writes benchmarks/results/tune_<model>_<method>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, SHARED, machine  # noqa: E402


# The searched space per method (--space overrides): around the papers' values and the current
# SmolLM2 defaults, on log scales where the value spans decades.
SPACES = {
    "alphaedit": ["L2=loguniform:1,30", "nullspace_threshold=loguniform:5e-3,2e-2", "v_num_grad_steps=int:8,20"],
    "memit": ["mom2_update_weight=loguniform:300,30000", "v_num_grad_steps=int:10,30",
              "clamp_norm_factor=uniform:0.5,1.0"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="alphaedit", choices=sorted(SPACES))
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--test-limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--space", action="append", default=None,
                    help="NAME=SPEC (default: SPACES[method])")
    ap.add_argument("--cpus-per-trial", type=float, default=2.0)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--out", default=None, help="tune directory (default /tmp/kedit-bench-tune-<method>)")
    args = ap.parse_args()
    args.out = args.out or f"/tmp/kedit-bench-tune-{args.method}"
    cf = SHARED / "counterfact"
    for f in ("counterfact-val.json", "counterfact-edit.json", "counterfact_portability_gpt4.json"):
        if not (cf / f).is_file():
            raise SystemExit(f"../shared/data/counterfact/{f} is absent")
    space = args.space or SPACES[args.method]
    from pipelines.tune_job import TuneConfig, run_tune

    cfg = TuneConfig(model=args.model, method=args.method, data=str(cf / "counterfact-val.json"), limit=args.limit,
                     exclude=[str(cf / "counterfact_portability_gpt4.json")], batch_size=args.batch_size,
                     trials=args.trials, space=space, default_space=False, test_data=str(cf / "counterfact-edit.json"),
                     test_limit=args.test_limit, out=args.out, ray=not args.no_ray, cpus_per_trial=args.cpus_per_trial,
                     device="cpu")
    res = run_tune(cfg)
    name = f"tune_{args.model}_{args.method}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": machine(), "config": cfg.to_dict(), **res},
                                                     indent=1, default=list))
    report = (Path(args.out) / "report.md").read_text().replace("![objective per trial and hyper-parameter](report.png)",
                                                               f"![objective per trial and hyper-parameter]({name}.png)")
    shutil.copyfile(Path(args.out) / "report.png", RESULTS / f"{name}.png")
    (RESULTS / f"{name}.md").write_text(report + f"\nmachine: {json.dumps(machine())}\n")
    print(report)


if __name__ == "__main__":
    main()
