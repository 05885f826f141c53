"""`kedit bench`: one command fills the methods x datasets table for a model.

Each cell is an edit stream (kedit's EditStream: the same batch size, limit and evaluation for
every cell) in its own directory OUT/cells/<method>__<dataset>, run as a Ray task with
`cpus_per_cell` CPUs (and `gpus_per_cell` GPUs), so cells spread over a cluster; with
`ray=False` they run one after another in this process. Resumable cell by cell: a finished
cell (its metrics.json) is read back, an interrupted one resumes from its own checkpoints
exactly, so `kedit bench` run again after a kill -9 continues where it stopped. MLflow: a
parent run (OUT/mlflow.json) and one child run per cell (`mlflow.parentRunId`). The report:
OUT/report.md (one table per benchmark family, with its metrics), OUT/report.csv (every
cell's final metrics), OUT/report.png (the main metrics per method and dataset), also logged to
the parent run.

Variants: a method written `NAME@LABEL` (e.g. `rome@lti`) is method NAME with the
hyper-parameters `--set NAME@LABEL.k=v` on top of NAME's own `--set` values, in its own cells
beside NAME's (ROME against ROME-LTI in one table). A bench directory grows: a later run with
the same shared settings (model, limit, batch size, evaluation, statistics corpus, dtype) and
more methods or datasets adds their cells, keeps the finished ones, and reports every cell the
directory holds; a cell asked for again with other hyper-parameters is refused.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kedit_core.errors import BadInputError
from kedit_core.io import atomic_write_text

log = logging.getLogger(__name__)

# Per benchmark family: (column title, metric key in the final evaluation row).
FAMILY_METRICS = {
    "counterfact": [("ES", "all/efficacy_score"), ("PS", "all/paraphrase_score"), ("NS", "all/neighborhood_score"),
                    ("Score", "all/score")],
    "zsre": [("efficacy", "all/rewrite_acc"), ("generalisation", "all/paraphrase_acc"), ("locality", "all/locality")],
    "mquake": [("multi-hop", "bench/multihop_acc"), ("single-hop", "bench/single_hop_acc"),
               ("hop-wise", "bench/hopwise_acc")],
    "evoke": [("efficacy AMS", "bench/efficacy_AMS"), ("paraphrase AMS", "bench/paraphrase_AMS"),
              ("multi-hop AMS", "bench/multihop_AMS"), ("multi-hop EOS", "bench/multihop_EOS"),
              ("distraction EOS", "bench/distraction_EOS"), ("rel-spec EOS", "bench/rel_spec_EOS"),
              ("subj-spec EOS", "bench/subj_spec_EOS"), ("overfit EOS mean", "bench/overfit_EOS_mean")],
    "other": [("ES", "all/efficacy_score"), ("rewrite acc", "all/rewrite_acc")],
}
FAMILY_OF_FORMAT = {"counterfact": "counterfact", "counterfact-flat": "counterfact", "knowedit": "counterfact",
                    "zsre": "zsre", "mquake": "mquake", "evoke": "evoke"}


@dataclass(kw_only=True)
class BenchConfig:
    model: str = "smollm2-135m"
    methods: list[str] = field(default_factory=list)
    data: list[str] = field(default_factory=list)
    limit: int | None = 100
    batch_size: int = 10
    eval_every: int = 0
    perplexity_texts: int = 50
    out: str = ""
    stats_corpus: str | None = None
    set: dict[str, dict[str, Any]] = field(default_factory=dict)   # per-method hyper-parameters
    tracking_uri: str | None = None
    experiment: str = "kedit-bench"
    ray: bool = True
    ray_address: str | None = None
    cpus_per_cell: float = 1.0
    gpus_per_cell: float = 0.0
    device: str = "auto"
    dtype: str = "fp32"
    skip_invalid: bool = True

    # settings every cell of a bench directory shares (methods, datasets and the per-method
    # hyper-parameters are per cell: see run_bench)
    IDENTITY = ("model", "limit", "batch_size", "eval_every", "perplexity_texts", "stats_corpus", "dtype")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def build_bench_config(file: str | None = None, **flags) -> BenchConfig:
    """A YAML job file's keys (BenchConfig's fields: `methods` and `data` as lists or comma
    strings, `set` as {method: {name: value}}), then the flags given (None: not given; a
    flag's `set` entries go on top of the file's). Names and types are checked: one-line
    errors naming the file and the key."""
    from pipelines.config import read_job_file

    values: dict[str, Any] = read_job_file(file, sorted(f.name for f in fields(BenchConfig))) if file else {}
    flag_set = flags.pop("set", None) or {}
    values.update({k: v for k, v in flags.items() if v is not None})
    cfg = BenchConfig()
    for k, v in values.items():
        default = getattr(cfg, k)
        try:
            if k in ("methods", "data"):
                items = v.split(",") if isinstance(v, str) else list(v)
                v = [str(x).strip() for x in items if str(x).strip()]
            elif k == "set":
                if not isinstance(v, dict) or not all(isinstance(x, dict) for x in v.values()):
                    raise TypeError
                # the same strings as `--set METHOD.NAME=VALUE` (a bench directory compares them)
                v = {str(m): {str(n): _as_flag(x) for n, x in kv.items()} for m, kv in v.items()}
            elif isinstance(default, bool):
                v = v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")
            elif k == "limit":
                v = None if v is None else int(v)
            elif isinstance(default, int):
                v = int(v)
            elif isinstance(default, float):
                v = float(v)
            elif v is not None:
                v = str(v)
        except (TypeError, ValueError, AttributeError):
            raise BadInputError(f"cannot read {v!r} as the type of {k}", file=file, field=k) from None
        setattr(cfg, k, v)
    for m, kv in flag_set.items():
        cfg.set.setdefault(m, {}).update(kv)
    return cfg


def _as_flag(v) -> str:
    """A YAML value as the command line writes it: true / false, 4,5,6, 2000."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ",".join(_as_flag(x) for x in v)
    return str(v)


def base_method(method: str) -> str:
    """The registered method of a bench entry: `rome@lti` -> `rome`."""
    return method.split("@", 1)[0]


def cell_set(cfg: "BenchConfig", method: str) -> dict:
    """A cell's hyper-parameters: the base method's --set values, then the variant's."""
    out = dict(cfg.set.get(base_method(method), {}))
    if method != base_method(method):
        out.update(cfg.set.get(method, {}))
    return out


def cell_name(method: str, data: str) -> str:
    stem = "builtin" if data == "builtin" else Path(data).name.rsplit(".", 1)[0]
    return f"{method}__{stem}"


def family(data: str) -> str:
    if data == "builtin":
        return "counterfact"
    from kedit_core.data.readers import detect_format, read_records

    try:
        return FAMILY_OF_FORMAT.get(detect_format(read_records(data)[:5], data), "other")
    except Exception:  # noqa: BLE001 - the cell itself reports a bad file
        return "other"


def unedited(rows: list[dict], data: str) -> dict | None:
    """The unedited model's row on a dataset: every cell's stream starts from it, so the first
    finished cell's `pre` row stands for all (methods without statistics read the same
    perplexity texts, and a memory method's unedited view is the bare model)."""
    return next((r["pre"] for r in rows if r["data"] == data and r.get("pre")), None)


def _cell_config(cfg: BenchConfig, method: str, data: str, parent: str | None) -> dict:
    from pipelines.config import RunConfig

    rc = RunConfig(model=cfg.model, method=base_method(method), data=data, limit=cfg.limit, batch_size=cfg.batch_size,
                   workers=0, eval_every=cfg.eval_every, out=str(Path(cfg.out) / "cells" / cell_name(method, data)),
                   stats_corpus=cfg.stats_corpus, set=cell_set(cfg, method), perplexity_texts=cfg.perplexity_texts,
                   tracking_uri=cfg.tracking_uri, experiment=cfg.experiment, parent_run_id=parent,
                   device=cfg.device, dtype=cfg.dtype, skip_invalid=cfg.skip_invalid)
    return rc.to_dict()


def run_cell(conf: dict) -> dict:
    """One cell: an edit stream (resumes from its checkpoints when interrupted before). What
    the stream logs (resume, batches, evaluation points) goes to the cell's own `cell.log`,
    which a Ray task would otherwise swallow."""
    from pipelines.config import RunConfig
    from pipelines.edit_job import EditStream
    from pipelines.evaluation import reset_peak_rss, rss_mb

    # cells that share a process (ray=False) each report their own peak: the peak is reset
    # at the start of the cell; where the OS cannot reset it, the cell says its peak is the
    # process's so far
    scope = "cell" if reset_peak_rss() else "process"
    Path(conf["out"]).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(Path(conf["out"]) / "cell.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    roots = [logging.getLogger(n) for n in ("pipelines", "kedit_core")]
    levels = [r.level for r in roots]
    for r in roots:
        r.addHandler(handler)
        r.setLevel(logging.INFO)
    try:
        res = EditStream(RunConfig(**conf), show_progress=False).run()
    finally:
        for r, lv in zip(roots, levels):
            r.removeHandler(handler)
            r.setLevel(lv)
        handler.close()
    cell = {"pre": res["pre"], "post": res["post"], "seconds_per_edit": res["seconds_per_edit"], "n_edits": res["n_edits"],
            "peak_rss_mb": rss_mb()["peak_rss_mb"], "peak_rss_scope": scope}
    atomic_write_text(Path(conf["out"]) / "bench_cell.json", json.dumps(cell, default=str))
    return cell


def run_bench(cfg: BenchConfig, show_progress: bool = True) -> dict:
    from pipelines.config import differences
    from pipelines.tracking import Tracker

    if not cfg.out:
        raise BadInputError("an output directory is required (--out)", field="out")
    if not cfg.methods or not cfg.data:
        raise BadInputError("at least one method and one dataset", field="methods")
    from kedit_core.methods import get_method

    for m in cfg.methods:
        get_method(base_method(m))             # unknown names are refused before any work
        if "@" in m and not m.split("@", 1)[1]:
            raise BadInputError(f"a variant needs a label after '@', got {m!r}", field="methods")
    unused = sorted(k for k in cfg.set if k not in cfg.methods and k not in {base_method(m) for m in cfg.methods})
    if unused:
        log.warning("--set for %s, which is not among --methods: ignored", ", ".join(unused))
    for d in cfg.data:
        if d != "builtin" and not Path(d).is_file():
            raise BadInputError("no such dataset file", file=d, field="data")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ident = json.loads(json.dumps({k: getattr(cfg, k) for k in BenchConfig.IDENTITY}, default=list))
    rec = out / "bench.json"
    cells = [(m, d) for d in cfg.data for m in cfg.methods]
    known: dict[str, dict] = {}                 # every cell this directory holds, in the order added
    if rec.is_file():
        try:
            old = json.loads(rec.read_text())
        except ValueError as e:
            raise BadInputError(f"unreadable bench record ({e})", file=str(rec)) from None
        diff = differences({k: old.get("identity", {}).get(k) for k in BenchConfig.IDENTITY}, ident)
        if diff:
            raise BadInputError(f"holds another bench ({'; '.join(diff)[:300]}); choose another --out", file=str(rec))
        known = old.get("cells") or {               # a record written before cells were recorded
            cell_name(m, d): {"method": m, "data": d, "set": old.get("config", {}).get("set", {}).get(m, {})}
            for d in old.get("config", {}).get("data", []) for m in old.get("config", {}).get("methods", [])}
    for m, d in cells:
        want = json.loads(json.dumps(cell_set(cfg, m), default=list))
        have = known.get(cell_name(m, d))
        if have is not None and have.get("set", {}) != want:
            diff = differences(have.get("set", {}), want)
            raise BadInputError(f"cell {cell_name(m, d)} was run with other hyper-parameters ({'; '.join(diff)[:300]}); "
                                f"name a variant (METHOD@LABEL) or choose another --out", file=str(rec))
        known.setdefault(cell_name(m, d), {"method": m, "data": d, "set": want})
    atomic_write_text(rec, json.dumps({"identity": ident, "config": cfg.to_dict(), "cells": known}, indent=1,
                                      default=list))
    tracker = Tracker(out, cfg.tracking_uri, cfg.experiment)
    cfg.tracking_uri = tracker.uri           # the cells' child runs go to the parent's store
    parent = tracker.start_parent("bench", {k: v for k, v in cfg.to_dict().items() if k != "set"},
                                  {"kedit_bench": "parent"})
    results: dict[str, dict] = {}
    todo = []
    for m, d in cells:
        name = cell_name(m, d)
        done = out / "cells" / name / "bench_cell.json"
        if done.is_file() and (out / "cells" / name / "metrics.json").is_file():
            results[name] = json.loads(done.read_text())
            log.info("cell %s already finished", name)
        else:
            todo.append((m, d))
    from tqdm.auto import tqdm

    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="bench cells", disable=not show_progress)
    if todo and cfg.ray:
        import ray

        from pipelines.raycluster import init_ray

        init_ray(cfg.ray_address)
        # max_calls=1: every cell in a fresh worker process (its peak RSS is its own, and no
        # memory carries from one cell to the next)
        task = ray.remote(num_cpus=cfg.cpus_per_cell, num_gpus=cfg.gpus_per_cell, max_retries=0,
                          max_calls=1)(run_cell)
        refs = {task.remote(_cell_config(cfg, m, d, parent)): cell_name(m, d) for m, d in todo}
        log.info("%d cells queued on Ray (%s CPUs each); each cell logs to %s/cells/<cell>/cell.log",
                 len(todo), cfg.cpus_per_cell, out)
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            name = refs[ready[0]]
            try:
                results[name] = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 - one failed cell does not lose the others
                log.error("cell %s failed: %s", name, " ".join(str(e).split())[:300])
                results[name] = {"error": " ".join(str(e).split())[:300]}
            log.info("cell %s: %s", name, "failed" if "error" in results[name] else "finished")
            bar.update(1)
    else:
        for m, d in todo:
            name = cell_name(m, d)
            try:
                results[name] = run_cell(_cell_config(cfg, m, d, parent))
            except BadInputError:
                raise
            except Exception as e:  # noqa: BLE001
                log.error("cell %s failed: %s", name, e)
                results[name] = {"error": " ".join(str(e).split())[:300]}
            bar.update(1)
    bar.close()
    rows = collect_rows(out, known, results)
    paths = write_report(out, cfg, rows)
    for p in paths:
        tracker.log_artifact(p)
    for r in rows:
        for _, key in FAMILY_METRICS[r["family"]]:
            v = (r.get("post") or {}).get(key)
            if isinstance(v, (int, float)):
                tracker.log_metrics({f"{r['cell']}/{key}": v}, step=0)
    tracker.finish("FAILED" if any("error" in r for r in rows) else "FINISHED")
    return {"rows": rows, "report": [str(p) for p in paths]}


def collect_rows(out: Path, known: dict[str, dict], results: dict[str, dict]) -> list[dict]:
    """A report row per cell this directory knows (this run's results, else the cell's
    bench_cell.json, else unfinished), in the order the cells were added."""
    rows = []
    families = {d: family(d) for d in dict.fromkeys(c["data"] for c in known.values())}   # one read per dataset
    for name, c in known.items():
        r = results.get(name)
        if r is None:
            done = out / "cells" / name / "bench_cell.json"
            try:
                r = json.loads(done.read_text()) if done.is_file() else {"unfinished": True}
            except ValueError as e:
                raise BadInputError(f"unreadable cell result ({e})", file=str(done)) from None
        rows.append({"method": c["method"], "data": c["data"], "family": families[c["data"]], "cell": name,
                     "set": c.get("set", {}), **r})
    return rows


def report_bench(out: str | Path) -> dict:
    """`kedit bench --report-only`: rewrite report.md / .csv / .png from what a bench
    directory holds (every cell recorded in bench.json), running nothing."""
    out = Path(out)
    rec_path = out / "bench.json"
    if not rec_path.is_file():
        raise BadInputError("holds no bench (bench.json); run kedit bench first", file=str(out), field="out")
    try:
        rec = json.loads(rec_path.read_text())
        known, conf = rec["cells"], rec["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise BadInputError(f"unreadable bench record ({e})", file=str(rec_path)) from None
    names = {f.name for f in fields(BenchConfig)}
    cfg = BenchConfig(**{k: v for k, v in conf.items() if k in names})
    rows = collect_rows(out, known, {})
    return {"rows": rows, "report": [str(p) for p in write_report(out, cfg, rows)]}


def write_report(out: Path, cfg: BenchConfig, rows: list[dict]) -> list[Path]:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    datasets = list(dict.fromkeys(r["data"] for r in rows))
    lines = [f"# kedit bench: {cfg.model}", "",
             f"{len(methods)} methods x {len(datasets)} datasets ({len(rows)} cells), first {cfg.limit} records each, "
             f"sequential batches of {cfg.batch_size}; metrics over all edits at the end of each stream.", ""]
    variants = {r["method"]: r for r in rows if "@" in r["method"]}
    if variants:
        lines += ["Variants: " + "; ".join(f"`{m}` = {base_method(m)} with {json.dumps(r.get('set', {}))}"
                                           for m, r in variants.items()), ""]
    csv_rows, shared_peak = [], False
    for fam in dict.fromkeys(r["family"] for r in rows):
        cols = FAMILY_METRICS[fam]
        lines += [f"## {fam}", "", "| method | data | " + " | ".join(c for c, _ in cols)
                  + " | perplexity (before -> after) | s/edit | peak RSS MB |", "|---" * (len(cols) + 5) + "|"]
        for d in dict.fromkeys(x["data"] for x in rows if x["family"] == fam):
            pre = unedited(rows, d)
            if pre:
                vals = [f"{pre[k]:.3f}" if isinstance(pre.get(k), (int, float)) else "-" for _, k in cols]
                ppl = f"{pre['perplexity']:.2f}" if isinstance(pre.get("perplexity"), (int, float)) else "-"
                lines.append(f"| (unedited) | {Path(d).name} | " + " | ".join(vals) + f" | {ppl} | - | - |")
        for r in (x for x in rows if x["family"] == fam):
            post = r.get("post") or {}
            vals = [f"{post[k]:.3f}" if isinstance(post.get(k), (int, float)) else "-" for _, k in cols]
            if "error" in r or r.get("unfinished"):
                vals = ["failed" if "error" in r else "not run yet"] + ["-"] * (len(cols) - 1)
            spe = f"{r['seconds_per_edit']:.2f}" if isinstance(r.get("seconds_per_edit"), (int, float)) else "-"
            rss = f"{r['peak_rss_mb']:.0f}" if isinstance(r.get("peak_rss_mb"), (int, float)) else "-"
            if rss != "-" and r.get("peak_rss_scope") == "process":
                rss += " (process)"
                shared_peak = True
            a, b = (r.get("pre") or {}).get("perplexity"), post.get("perplexity")
            ppl = f"{a:.2f} -> {b:.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else "-"
            lines.append(f"| {r['method']} | {Path(r['data']).name} | " + " | ".join(vals) + f" | {ppl} | {spe} | {rss} |")
        lines.append("")
    if shared_peak:
        lines += ["peak RSS \"(process)\": the cell ran in a process shared with the cells before it (`--no-ray`) "
                  "without the peak reset at its start (an OS that cannot reset it, or a cell run before kedit did): the "
                  "process's peak so far, not the cell's own.", ""]
    for r in rows:
        post = r.get("post") or {}
        cell = {"method": r["method"], "data": r["data"], "family": r["family"],
                "seconds_per_edit": r.get("seconds_per_edit"), "peak_rss_mb": r.get("peak_rss_mb"),
                "peak_rss_scope": r.get("peak_rss_scope", ""), "error": r.get("error", "")}
        # the end point's own seconds_per_edit is its last batch's; the cell's is the stream's mean
        csv_rows.append({**cell, **{(f"last_batch/{k}" if k in cell else k): v for k, v in post.items()
                                    if isinstance(v, (int, float))}})
    md = out / "report.md"
    lines.append("![main metrics](report.png)")
    atomic_write_text(md, "\n".join(lines) + "\n")
    keys = list(dict.fromkeys(k for r in csv_rows for k in r))
    tmp = out / ".report.csv.tmp"
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(csv_rows)
    tmp.replace(out / "report.csv")
    png = plot_report(out / "report.png", cfg, rows)
    return [md, out / "report.csv", png]


def plot_report(path: Path, cfg: BenchConfig, rows: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    datasets = list(dict.fromkeys(r["data"] for r in rows))
    # One colour per method in every panel, one legend for the figure (outside the axes, so it
    # hides no bar); a cell without a value for a metric draws no bar there (not a zero).
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cmap = plt.get_cmap("tab20")        # its greys (14, 15) are left out: grey is the unedited model's
    palette = [cmap(i) for i in (0, 2, 4, 6, 8, 10, 12, 16, 18, 1, 3, 5, 7, 9, 11, 13, 17, 19)]
    colour = {"(unedited)": "0.75", **{m: palette[i % len(palette)] for i, m in enumerate(methods)}}
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets) + 1.6, 3.6), squeeze=False)
    handles: dict[str, object] = {}
    for ax, d in zip(axes[0], datasets):
        sub = [r for r in rows if r["data"] == d and r.get("post")]
        pre = unedited(rows, d)
        bars = ([("(unedited)", pre)] if pre else []) + [(r["method"], r["post"]) for r in sub]
        fam = next(r["family"] for r in rows if r["data"] == d)
        cols = [(c, k) for c, k in FAMILY_METRICS[fam]
                if any(isinstance(v.get(k), (int, float)) for _, v in bars)] or FAMILY_METRICS[fam]
        x = np.arange(len(cols))
        w = 0.8 / max(1, len(bars))
        for i, (name, vals) in enumerate(bars):
            hs = [vals.get(k) if isinstance(vals.get(k), (int, float)) else float("nan") for _, k in cols]
            handles[name] = ax.bar(x + i * w, hs, w, label=name, color=colour[name])
        ax.set_xticks(x + w * (len(bars) - 1) / 2, [c for c, _ in cols], rotation=20, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_title(Path(d).name if d != "builtin" else "built-in", fontsize=9)
    order = [m for m in ["(unedited)", *methods] if m in handles]
    fig.legend([handles[m] for m in order], order, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(f"kedit bench: {cfg.model}, {cfg.limit} edits in batches of {cfg.batch_size}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / fig.get_figwidth(), 1))
    tmp = path.with_name(".report.png.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
