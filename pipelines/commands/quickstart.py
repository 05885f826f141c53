"""`kedit quickstart`: the README's main job, on Ray.

Starts a local Ray instance (or uses RAY_ADDRESS), then runs the edit stream of
cluster_configs/jobs/quickstart.yaml: the default model, the built-in edit set, second
moments by StatsWorker actors (cached after the first run), a 100-edit AlphaEdit stream in
sequential batches of 10 over EditWorker actors with checkpoints and MLflow curves; then a
summary table (metrics before/after, seconds per edit, completions) and the next commands.
"""

from __future__ import annotations

import time
from pathlib import Path

JOB = Path(__file__).resolve().parents[2] / "cluster_configs" / "jobs" / "quickstart.yaml"


def add_parser(sub) -> None:
    p = sub.add_parser("quickstart", help="the main job: a 100-edit AlphaEdit stream on local Ray")
    p.add_argument("--config", default=str(JOB), help="job config (default: %(default)s)")
    p.add_argument("--out", default=None, help="run directory (default: runs/quickstart-<time>)")
    p.add_argument("--limit", type=int, default=None, help="edits (default: the config's 100)")
    p.add_argument("--workers", default=None,
                   help="EditWorker actors (default: the config's auto, chosen from the resources Ray reports)")
    p.add_argument("--model", default=None)
    p.add_argument("--method", default=None)
    p.add_argument("--show", type=int, default=5, help="edited facts to show (default: %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from kedit_core.data import load_requests
    from kedit_core.generation import greedy
    from pipelines.config import build
    from pipelines.edit_job import EditStream

    console = Console()
    t0 = time.perf_counter()
    console.rule("[bold]kedit quickstart")
    out = args.out or f"runs/quickstart-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = build(args.config, out=out, limit=args.limit, workers=args.workers, model=args.model, method=args.method)
    console.print(f"model [bold]{cfg.model}[/], method [bold]{cfg.method}[/], {cfg.limit} built-in edits in batches "
                  f"of {cfg.batch_size}, workers {cfg.workers}; run directory {out}")
    stream = EditStream(cfg)
    result = stream.run()
    if stream.worker_plan is not None:
        console.print(f"workers: {stream.worker_plan.reason}")
    post, pre = result["post"], result["pre"]

    m = Table(title=f"{result['n_edits']} edits, metrics over all of them")
    for col in ("metric", "before", "after"):
        m.add_column(col)
    for k in ("all/efficacy_score", "all/paraphrase_score", "all/neighborhood_score", "all/score",
              "all/rewrite_gen", "all/paraphrase_gen", "all/locality", "perplexity"):
        if k in post:
            m.add_row(k.replace("all/", ""), f"{pre.get(k, float('nan')):.3f}", f"{post[k]:.3f}")
    m.add_row("seconds per edit", "", f"{result['seconds_per_edit']:.2f}")
    console.print(m)
    if args.show and getattr(stream, "editor", None) is not None:
        reqs = load_requests(limit=args.show)
        from kedit_core.evaluate import starts_with_target

        t = Table(title="edited facts (greedy completions of the edited model)")
        for col in ("prompt", "after", "target", "rewrite_gen"):
            t.add_column(col)
        for r, a in zip(reqs, greedy(stream.editor.lm, [r.text for r in reqs], 6)):
            t.add_row(r.text, a.strip().split("\n")[0], r.target_new,
                      "yes" if starts_with_target(a, r.target_new) else "no")
        console.print(t)
    wall = time.perf_counter() - t0
    console.print(f"done in {wall:.0f}s. Next:\n"
                  f"  kedit ui --runs {Path(out).parent}            # degradation curves in MLflow (127.0.0.1:5000)\n"
                  f"  kedit export {out} --to exported        # the edited model in HF format\n"
                  f"  kedit edit --resume {out}               # continue / resume a stream\n"
                  "  ray start --head && RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 "
                  "--working-dir . -- kedit edit --config cluster_configs/jobs/quickstart.yaml   # token: ~/.ray/auth_token")
    (Path(out) / "quickstart.json").write_text(__import__("json").dumps({"wall_seconds": wall}))
    return 0
