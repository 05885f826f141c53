"""Thousand-edit streams (issue 13 point 2): `kedit edit` on Ray for each method on the flat
CounterFact file, N sequential edits in batches of B, the scalable evaluation every E edits
(latest / first / retention / probe / perplexity; all edits at the start and the end), with
the driver's and the workers' peak RSS and s/edit per evaluation point.

    python benchmarks/bench_stream.py --methods memit,alphaedit --edits 2000 --batch-size 100 --eval-every 200

Each stream runs in its own `kedit edit` process (clean memory readings; log in
RUN_DIR.log); its run directory is under --runs (default benchmarks/results/streams/,
ignored by git). Re-running the same command resumes every unfinished stream with `kedit
edit --resume` and skips finished ones; `--report-only` writes the results from what the
run directories hold (finished streams from metrics.json, unfinished ones up to their last
checkpoint). Writes benchmarks/results/stream_<model>_<N>x<B>[_tag].json / .md / .png: the
PNG overlays the methods' efficacy, generalisation, specificity and perplexity against
edits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import RESULTS, SHARED, _fmt, machine, save_figure  # noqa: E402

DATA = SHARED / "counterfact" / "counterfact-edit.json"
# The weight-changing methods that need no trained editor (mend / ke: --editor METHOD=DIR).
DEFAULT_METHODS = "memit,alphaedit"
# (panel title, solid curve, dashed curve)
PANELS = [("efficacy (ES)", "retention/efficacy_score", "latest/efficacy_score"),
          ("generalisation (PS)", "retention/paraphrase_score", "latest/paraphrase_score"),
          ("specificity (NS)", "retention/neighborhood_score", "probe/neighborhood_score"),
          ("held-out perplexity", "perplexity", None)]
COLUMNS = ["method", "edits", "s_per_edit", "latest_ES", "first_ES", "retention_ES", "retention_PS",
           "retention_NS", "probe_NS", "all_ES", "all_PS", "all_NS", "perplexity", "driver_rss_mb",
           "driver_peak_mb", "workers_peak_mb", "eval_s"]


def run_name(model: str, method: str, edits: int, bs: int, tag: str) -> str:
    return f"{model}_{method}_{edits}x{bs}" + (f"_{tag}" if tag else "")


def stream_argv(args, method: str, out: Path) -> list[str]:
    if (out / "run.json").is_file():     # started before: continue it (run.json holds the config)
        return ["edit", "--resume", str(out)]
    a = ["edit", "--model", args.model, "--method", method, "--data", str(args.data), "--limit", str(args.edits),
         "--batch-size", str(args.batch_size), "--eval-every", str(args.eval_every), "--workers", str(args.workers),
         "--eval-retention", str(args.retention), "--eval-probe", str(args.probe),
         "--perplexity-texts", str(args.perplexity_texts), "--out", str(out), "--device", args.device]
    for s in args.set:
        m, _, kv = s.partition(":")
        if m == method:
            a += ["--set", kv]
    for e in args.editor:
        m, _, d = e.partition("=")
        if m == method:
            a += ["--editor", d]
    return a


def run_stream(args, method: str, out: Path) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = stream_argv(args, method, out)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    log = out.with_suffix(".log")
    print(f"[{time.strftime('%H:%M:%S')}] {method}: kedit {' '.join(argv)}  (log {log})", flush=True)
    with open(log, "a") as fh:
        fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} kedit {' '.join(argv)}\n")
        fh.flush()
        rc = subprocess.call([sys.executable, "-m", "pipelines.cli", *argv], cwd=ROOT, env=env, stdout=fh,
                             stderr=subprocess.STDOUT)
    print(f"[{time.strftime('%H:%M:%S')}] {method}: exit {rc}", flush=True)
    return rc


def read_stream(out: Path) -> dict | None:
    """Rows and per-batch timings of a run directory: metrics.json when finished, else its
    last complete checkpoint."""
    if (out / "metrics.json").is_file():
        m = json.loads((out / "metrics.json").read_text())
        return {"finished": True, "rows": m["curve"], "batches": m.get("batch_seconds") or [],
                "seconds_per_edit": m["seconds_per_edit"], "n_edits": m["n_edits"],
                "replicas_in_step": m.get("replicas_in_step"), "eval_plan": m.get("eval_plan")}
    from pipelines.checkpoint import CheckpointManager

    ck = CheckpointManager(out).latest()
    if ck is None:
        return None
    st = ck.state
    return {"finished": False, "rows": st["metrics"], "n_edits": ck.n_edits,
            "batches": [{"edits": r["edits"], "n": r["n"], "seconds": r["seconds"]} for r in st["batches"]],
            "seconds_per_edit": sum(r["seconds"] for r in st["batches"]) / max(ck.n_edits, 1)}


def kept_streams(path: Path) -> dict[str, dict]:
    """The streams an earlier report wrote to `path` (results JSON), by method: a stream whose
    run directory was lost (a new machine) keeps its reported rows and curves rather than
    vanishing from the table when another method is reported."""
    if not path.is_file():
        return {}
    try:
        rec = json.loads(path.read_text())
        out = {}
        for m, summ in rec["summary"].items():
            prows = [r for r in rec["rows"] if r["method"] == m]
            out[m] = {"finished": summ["status"] == "finished", "rows": [r["groups"] for r in prows],
                      "n_edits": summ["n_edits"], "seconds_per_edit": summ["seconds_per_edit"],
                      "replicas_in_step": summ.get("replicas_in_step"), "point_rows": prows,
                      "eval_plan": (rec.get("eval_plan") or {}).get(m), "kept_from": path.name,
                      "kept_status": summ["status"] if "reported earlier" in summ["status"] else
                      f"{summ['status']}, reported earlier ({rec['machine'].get('date')}; run directory not here)"}
        return out
    except (ValueError, KeyError, TypeError) as e:
        print(f"{path}: unreadable earlier report ({e}); its streams are not carried over", file=sys.stderr)
        return {}


def point_rows(method: str, stream: dict) -> list[dict]:
    """One row per evaluation point; s_per_edit: the mean over the batches since the previous
    point."""
    out, prev = [], 0
    for r in stream["rows"]:
        window = [b for b in stream["batches"] if prev < b["edits"] <= r["edits"]]
        n = sum(b["n"] for b in window)
        row = {"method": method, "edits": r["edits"],
               "s_per_edit": sum(b["seconds"] for b in window) / n if n else None,
               "perplexity": r.get("perplexity"), "driver_rss_mb": r.get("rss/driver_mb"),
               "driver_peak_mb": r.get("rss/driver_peak_mb"), "workers_peak_mb": r.get("rss/workers_peak_mb"),
               "eval_s": r.get("eval_seconds")}
        for g in ("latest", "first", "retention", "probe", "all"):
            for short, key in (("ES", "efficacy_score"), ("PS", "paraphrase_score"), ("NS", "neighborhood_score")):
                if f"{g}/{key}" in r:
                    row[f"{g}_{short}"] = r[f"{g}/{key}"]
        row["groups"] = {k: v for k, v in r.items() if isinstance(v, (int, float))}
        out.append(row)
        prev = r["edits"]
    return out


def plot(streams: dict[str, dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 3, figsize=(15, 8))
    axes = list(grid.flat)
    for i, (method, s) in enumerate(streams.items()):
        colour = f"C{i}"
        # cost: the peak RSS of the largest worker (solid) and of the driver (dashed), and s/edit
        for key, style, what in (("rss/workers_peak_mb", "-", "workers"), ("rss/driver_peak_mb", "--", "driver")):
            pts = [(r["edits"], r[key] / 1024) for r in s["rows"] if isinstance(r.get(key), (int, float))]
            if pts:
                axes[4].plot(*zip(*pts), style, color=colour, marker="o", markersize=3, label=f"{method} ({what})")
        prows = s.get("point_rows") or point_rows(method, s)
        pts = [(r["edits"], r["s_per_edit"]) for r in prows if isinstance(r.get("s_per_edit"), (int, float))]
        if pts:
            axes[5].plot(*zip(*pts), "-", color=colour, marker="o", markersize=3, label=method)
        for ax, (name, solid, dashed) in zip(axes, PANELS):
            for key, style, what in ((solid, "-", solid.split("/")[0]), (dashed, "--", dashed and dashed.split("/")[0])):
                if key is None:
                    continue
                pts = [(r["edits"], r[key]) for r in s["rows"] if isinstance(r.get(key), (int, float))]
                if key == solid and key != "perplexity":   # the unedited model on the stream (all/ at 0)
                    base = s["rows"][0].get("all/" + key.split("/")[1]) if s["rows"] else None
                    if isinstance(base, (int, float)):
                        pts = [(0, base), *pts]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, style, color=colour, marker="o", markersize=3,
                            label=f"{method} ({what})" if key != "perplexity" else method)
    for ax, (name, _, _) in zip(axes, PANELS):
        ax.set_title(name), ax.set_xlabel("edits applied")
        if name != "held-out perplexity":
            ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    for ax, name in ((axes[4], "peak RSS (GB): largest worker, driver"), (axes[5], "s/edit (batches since the last point)")):
        ax.set_title(name), ax.set_xlabel("edits applied"), ax.set_ylim(bottom=0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return save_figure(fig, path, title)


def report(args, methods: list[str]) -> Path:
    from kedit_core.io import atomic_write_text

    name = f"stream_{args.model}_{args.edits}x{args.batch_size}" + (f"_{args.tag}" if args.tag else "")
    kept = kept_streams(RESULTS / f"{name}.json")
    streams, rows = {}, []
    # methods reported before and not run now stay in the report
    for method in [*methods, *(m for m in kept if m not in methods)]:
        s = read_stream(args.runs / run_name(args.model, method, args.edits, args.batch_size, args.tag))
        k = kept.get(method)
        if k is not None and (s is None or s["n_edits"] < k["n_edits"]):
            # the run directory is gone (or restarted and behind): the rows reported before stay
            where = "is absent" if s is None else f"holds only {s['n_edits']} edits"
            print(f"{method}: {k['n_edits']} edits as reported before in {name}.json (its run directory {where})",
                  flush=True)
            streams[method], s = k, None
            rows += k["point_rows"]
            continue
        if s is None:
            print(f"{method}: no results yet", flush=True)
            continue
        streams[method] = s
        rows += point_rows(method, s)
    RESULTS.mkdir(parents=True, exist_ok=True)
    notes = (f"{args.model}, {args.data.name}: the first {args.edits} records edited in sequential batches of "
             f"{args.batch_size}, evaluated every {args.eval_every} edits (Ray, {args.workers} EditWorker(s), "
             f"evaluation sharded over them). ES / PS / NS: CounterFact efficacy, paraphrase and neighbourhood "
             f"scores of the group: latest = the batch just applied, first = the first batch, retention = "
             f"{args.retention} past edits stratified over the stream, probe = {args.probe} never-edited records "
             "(their true fact and neighbourhood prompts against the counterfactual target), all = every edit "
             "(at 0: the unedited model on the stream's records; at the end). s_per_edit: mean over the batches "
             "since the previous point (edit computation only). RSS in MB: the driver now / at its peak, the "
             "largest worker's peak.")
    status = {m: s.get("kept_status") or ("finished" if s["finished"] else f"stopped at {s['n_edits']} edits")
              for m, s in streams.items()}
    summary = {m: {"seconds_per_edit": s["seconds_per_edit"], "n_edits": s["n_edits"], "status": status[m],
                   "replicas_in_step": s.get("replicas_in_step")} for m, s in streams.items()}
    atomic_write_text(RESULTS / f"{name}.json", json.dumps(
        {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
         "rows": rows, "eval_plan": {m: s.get("eval_plan") for m, s in streams.items()}}, indent=1))
    lines = [f"# {name}", "", notes, "",
             "Streams: " + ", ".join(f"{m} {status[m]} ({summary[m]['seconds_per_edit']:.2f} s/edit overall)"
                                     for m in streams), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    lines += ["", f"![curves]({name}.png)", "", f"machine: {json.dumps(machine())}", ""]
    atomic_write_text(RESULTS / f"{name}.md", "\n".join(lines))
    print("\n".join(lines), flush=True)
    if streams:
        plot(streams, RESULTS / f"{name}.png", f"{args.model}: {args.edits} CounterFact edits in batches of "
                                               f"{args.batch_size} (solid: retention sample; dashed: latest "
                                               "batch, for NS: the probe)")
    return RESULTS / f"{name}.md"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated (default: %(default)s)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--edits", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--workers", type=int, default=1, help="EditWorker actors per stream (default 1)")
    ap.add_argument("--retention", type=int, default=500)
    ap.add_argument("--probe", type=int, default=100)
    ap.add_argument("--perplexity-texts", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", action="append", default=[], metavar="METHOD:NAME=VALUE",
                    help="a hyper-parameter of one method")
    ap.add_argument("--editor", action="append", default=[], metavar="METHOD=DIR",
                    help="trained editor of mend / ke")
    ap.add_argument("--runs", type=Path, default=RESULTS / "streams", help="run directories (default: %(default)s)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--report-only", action="store_true", help="write the results from the run directories")
    args = ap.parse_args(argv)
    if not args.data.is_file():
        print(f"bench_stream: {args.data} is absent (the shared benchmark data is optional)", file=sys.stderr)
        return 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    failed = []
    if not args.report_only:
        for method in methods:
            out = args.runs / run_name(args.model, method, args.edits, args.batch_size, args.tag)
            if run_stream(args, method, out) != 0:
                failed.append(method)
    report(args, methods)
    if failed:
        print(f"unfinished: {', '.join(failed)} (see their .log; run the same command again to resume)",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
