"""`kedit tune`: choose a method's hyper-parameters for a model on a validation split.

A trial is one edit stream (kedit's EditStream, workers 0: the same batch size, limit and
evaluation for every trial) on the validation records, in OUT/trials/<key> (key: a hash of
the trial's hyper-parameters), scored by `kedit_core.tune.objective` (harmonic mean of
efficacy, generalisation and locality times a perplexity penalty; documented there). The
search is Ray Tune's: a `Tuner` whose trials run as Ray actors with `cpus_per_trial` CPUs
(and `gpus_per_trial` GPUs), random search (Tune's sampler, seeded), grid search, or Optuna /
HyperOpt where installed; `ray=False` runs the same trials one after another in this process
(kedit's own seeded sampler).

Resumable at two levels: the Tune experiment (OUT/ray_tune) is restored with
`Tuner.restore` (finished trials are not run again; an interrupted one is restarted), and a
trial whose stream finished is read back from OUT/trials/<key>/trial.json, while an
interrupted stream resumes from its own checkpoints; so `kedit tune` run again after a kill
continues where it stopped. Another tune (model, method, data, space, ...) in the same OUT is
refused, naming the difference.

MLflow: a parent run (OUT/mlflow.json) and one child run per trial (the trial's stream, with
`tune/objective` and its parts added), in the store `kedit edit` uses by default (SQLite in
OUT's parent). Outputs: OUT/best.json (atomic: the best trial's hyper-parameters, objective
and parts, the objective's weights, the split and every trial), OUT/report.md (a table of the
trials) and OUT/report.png (objective per trial and per searched hyper-parameter).

Honesty: the validation split is written to OUT/split/val.json with the source file's sha256
and its record indices; records of `exclude` files (the benchmark's reported records) are
dropped from it; with `test_data`, the chosen and the method's default hyper-parameters are
both run on the test split (OUT/test/{chosen,default}), which must share no record with the
validation split (refused otherwise).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kedit_core.errors import BadInputError
from kedit_core.io import atomic_write_text

log = logging.getLogger(__name__)

SEARCHES = ("random", "grid", "optuna", "hyperopt")
SHOWN = ("efficacy", "generalisation", "locality", "ppl_ratio", "score", "objective")


@dataclass(kw_only=True)
class TuneConfig:
    model: str = "smollm2-135m"
    method: str = "alphaedit"
    data: str = ""                        # the validation file
    limit: int | None = 40                # validation records (after the exclusions)
    split_seed: int | None = None         # None: the first `limit`; else `limit` drawn with this seed
    exclude: list[str] = field(default_factory=list)   # files whose records never enter a split
    batch_size: int = 20
    trials: int = 8
    search: str = "random"
    seed: int = 0                         # the searcher's seed
    space: list[str] = field(default_factory=list)     # NAME=KIND:ARGS
    space_file: str | None = None
    default_space: bool = True            # start from the method's TUNE_SPACE
    set: dict[str, Any] = field(default_factory=dict)  # fixed hyper-parameters of every trial
    objective: dict[str, float] = field(default_factory=dict)   # kedit_core.tune.ObjectiveSpec fields
    perplexity_texts: int = 50
    stats_corpus: str | None = None
    test_data: str | None = None          # report the chosen and the default hyper-parameters here
    test_limit: int | None = 100
    out: str = ""
    tracking_uri: str | None = None
    experiment: str = "kedit-tune"
    ray: bool = True
    ray_address: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    concurrent: int = 1                   # trials at once
    device: str = "auto"
    dtype: str = "fp32"
    skip_invalid: bool = True

    IDENTITY = ("model", "method", "data", "limit", "split_seed", "exclude", "batch_size", "trials", "search", "seed",
                "space", "space_file", "default_space", "set", "objective", "perplexity_texts", "stats_corpus",
                "test_data", "test_limit", "dtype", "ray")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ----------------------------------------------------------------------------- one trial
def run_trial(params: dict, base: dict) -> dict:
    """One trial: the edit stream with `base['set']` and `params`, its objective, logged to
    its child run; read back when it finished before."""
    from pipelines.bench_job import run_cell
    from pipelines.config import RunConfig
    from pipelines.tracking import Tracker

    from kedit_core.tune import ObjectiveSpec, objective, params_key

    key = params_key(params)
    tdir = Path(base["out"]) / "trials" / key
    done = tdir / "trial.json"
    if done.is_file() and (tdir / "metrics.json").is_file():
        rec = json.loads(done.read_text())
        if rec.get("params") == json.loads(json.dumps(params)):
            return rec
    if base.get("threads"):
        import torch

        torch.set_num_threads(max(1, int(base["threads"])))
    rc = RunConfig(model=base["model"], method=base["method"], data=base["data"], limit=None,
                   batch_size=base["batch_size"], workers=0, eval_every=0, out=str(tdir),
                   stats_corpus=base["stats_corpus"], set={**base["set"], **params},
                   perplexity_texts=base["perplexity_texts"], tracking_uri=base["tracking_uri"],
                   experiment=base["experiment"], parent_run_id=base["parent"], device=base["device"],
                   dtype=base["dtype"], skip_invalid=base["skip_invalid"])
    cell = run_cell(rc.to_dict())
    parts = objective(cell["post"], cell.get("pre"), ObjectiveSpec(**base["objective"]))
    res = json.loads((tdir / "metrics.json").read_text())
    rec = {"key": key, "params": json.loads(json.dumps(params)), "hparams": res["hparams"], **parts,
           "n_edits": cell["n_edits"], "seconds_per_edit": cell["seconds_per_edit"],
           "perplexity": cell["post"].get("perplexity"), "perplexity_unedited": (cell.get("pre") or {}).get("perplexity"),
           "dir": str(tdir)}
    tracker = Tracker(tdir, base["tracking_uri"], base["experiment"])    # continues the stream's run
    tracker.start(key, {}, {})
    tracker.set_tags({"kedit_tune": "trial", "kedit_tune_key": key})
    tracker.log_metrics({f"tune/{k}": v for k, v in parts.items() if isinstance(v, (int, float))},
                        step=cell["n_edits"])
    tracker.finish()
    atomic_write_text(done, json.dumps(rec, indent=1, default=str))
    return rec


def _tune_trainable(config: dict, base: dict) -> None:
    from ray import tune

    rec = run_trial(_decode(config, base["encoded"]), base)
    tune.report({k: (v if v is not None else float("nan")) for k, v in rec.items()
                 if k in SHOWN or k in ("ppl_penalty", "seconds_per_edit")})


def _decode(config: dict, encoded: list[str]) -> dict:
    return {k: (json.loads(v) if k in encoded else v) for k, v in sorted(config.items())}


# ----------------------------------------------------------------------------- the search
def _tune_space(space: dict, search: str) -> tuple[dict, list[str]]:
    """Tune's domains for kedit's space; choices are passed as JSON text (Tune's samplers
    take scalars), decoded in the trial."""
    from ray import tune

    out, encoded = {}, []
    for n, d in space.items():
        if d.kind in ("choice", "const"):
            vals = [json.dumps(v) for v in d.values]
            encoded.append(n)
            out[n] = (tune.grid_search(vals) if search == "grid" else tune.choice(vals)) if len(vals) > 1 else vals[0]
        elif d.kind == "uniform":
            out[n] = tune.uniform(d.low, d.high)
        elif d.kind == "loguniform":
            out[n] = tune.loguniform(d.low, d.high)
        elif d.kind == "int":
            out[n] = tune.randint(int(d.low), int(d.high) + 1)
    return out, encoded


def _searcher(cfg: TuneConfig):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if cfg.search in ("random", "grid"):
        return BasicVariantGenerator(random_state=cfg.seed, max_concurrent=cfg.concurrent)
    if cfg.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=cfg.seed)
    from ray.tune.search.hyperopt import HyperOptSearch

    return HyperOptSearch(random_state_seed=cfg.seed)


def _run_tuner(cfg: TuneConfig, space: dict, base: dict, show_progress: bool) -> list[tuple[dict, str | None]]:
    """The trials through Ray Tune: (params, error) per trial, in Tune's order."""
    from ray import tune

    from pipelines.raycluster import init_ray

    init_ray(cfg.ray_address)
    pspace, encoded = _tune_space(space, cfg.search)
    base = dict(base, encoded=encoded, threads=cfg.cpus_per_trial)
    trainable = tune.with_resources(tune.with_parameters(_tune_trainable, base=base),
                                    {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})
    storage = Path(cfg.out).resolve()
    path = storage / "ray_tune"
    tuner = None
    if tune.Tuner.can_restore(str(path)):
        try:
            tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
            log.info("continuing the Tune experiment in %s", path)
        except Exception as e:  # noqa: BLE001 - a state Tune cannot read: finished trials are read back anyway
            log.warning("cannot restore the Tune experiment in %s (%s); starting it again (finished trials "
                        "are read back from their directories)", path, " ".join(str(e).split())[:200])
            import shutil

            shutil.rmtree(path, ignore_errors=True)
    if tuner is None:
        tuner = tune.Tuner(trainable, param_space=pspace,
                           tune_config=tune.TuneConfig(metric="objective", mode="max", search_alg=_searcher(cfg),
                                                       num_samples=1 if cfg.search == "grid" else cfg.trials,
                                                       # the basic generator limits itself (max_concurrent)
                                                       max_concurrent_trials=None if cfg.search in ("random", "grid")
                                                       else cfg.concurrent),
                           run_config=tune.RunConfig(storage_path=str(storage), name="ray_tune",
                                                     verbose=1 if show_progress else 0,
                                                     failure_config=tune.FailureConfig(max_failures=0)))
    grid = tuner.fit()
    out = []
    # in the order Tune created the trials (a restored ResultGrid lists them in another order;
    # the best of equal objectives is the first one)
    for r in sorted(grid, key=lambda r: Path(r.path).name if r.path else ""):
        err = " ".join(str(r.error).split())[:300] if r.error else None
        out.append((_decode({k: v for k, v in r.config.items() if k in pspace}, encoded), err))
    return out


def _run_local(cfg: TuneConfig, space: dict, base: dict, show_progress: bool) -> list[tuple[dict, str | None]]:
    import random

    from tqdm.auto import tqdm

    from kedit_core.tune import grid, sample

    points = grid(space) if cfg.search == "grid" else [sample(space, random.Random(f"{cfg.seed}:{i}"))
                                                         for i in range(cfg.trials)]
    out = []
    for p in tqdm(points, desc="tune trials", disable=not show_progress):
        try:
            run_trial(p, base)
            out.append((p, None))
        except BadInputError:
            raise
        except Exception as e:  # noqa: BLE001 - one failed trial does not lose the others
            log.error("trial %s failed: %s", p, e)
            out.append((p, " ".join(str(e).split())[:300]))
    return out


# ----------------------------------------------------------------------------- the job
def _check(cfg: TuneConfig):
    from kedit_core.methods import get_method, make_config
    from kedit_core.tune import ObjectiveSpec, load_space_file, parse_space

    if not cfg.out:
        raise BadInputError("an output directory is required (--out)", field="out")
    if not cfg.data or not Path(cfg.data).is_file():
        raise BadInputError("no such validation file", file=cfg.data or None, field="data")
    if cfg.test_data and not Path(cfg.test_data).is_file():
        raise BadInputError("no such test file", file=cfg.test_data, field="test_data")
    for e in cfg.exclude:
        if not Path(e).is_file():
            raise BadInputError("no such file", file=e, field="exclude")
    if cfg.search not in SEARCHES:
        raise BadInputError(f"unknown search {cfg.search!r} (choose {', '.join(SEARCHES)})", field="search")
    if cfg.search in ("optuna", "hyperopt"):
        import importlib.util

        if importlib.util.find_spec(cfg.search) is None:
            raise BadInputError(f"{cfg.search} is not installed (pip install {cfg.search}); use --search random or grid",
                                field="search")
        if not cfg.ray:
            raise BadInputError(f"{cfg.search} search runs on Ray Tune (drop --no-ray)", field="search")
    for k in ("trials", "batch_size", "concurrent"):
        if getattr(cfg, k) < 1:
            raise BadInputError(f"must be at least 1, got {getattr(cfg, k)}", field=k)
    method = get_method(cfg.method)
    mcls = method.config_cls
    make_config(mcls, None, cfg.set)                      # names and types of the fixed ones
    ObjectiveSpec(**cfg.objective)
    given = dict(load_space_file(cfg.space_file)) if cfg.space_file else {}
    for item in cfg.space:
        if "=" not in item:
            raise BadInputError(f"expected NAME=KIND:ARGS (e.g. L2=loguniform:1,100), got {item!r}", field="space")
        k, v = item.split("=", 1)
        given[k.strip()] = v.strip()
    both = sorted(set(given) & set(cfg.set))
    if both:
        raise BadInputError(f"both fixed (--set) and searched (--space): {', '.join(both)}", field=f"space.{both[0]}")
    defaults = {k: v for k, v in (getattr(mcls, "TUNE_SPACE", {}) if cfg.default_space else {}).items()
                if k not in cfg.set}
    if cfg.default_space and not defaults and not given:
        raise BadInputError(f"{cfg.method} has no default search space; give dimensions with --space NAME=KIND:ARGS",
                            field="space")
    space = parse_space({**defaults, **given}, mcls, use_default=False)
    if cfg.search == "grid":
        from kedit_core.tune import grid

        grid({n: d if d.kind != "shift" else type(d)(n, "choice", d.values) for n, d in space.items()})
    return method, space


def run_tune(cfg: TuneConfig, show_progress: bool = True) -> dict:
    from kedit_core.io import FileLock, LockHeld
    from kedit_core.tune import overlap, split_requests
    from pipelines.config import differences

    method, space = _check(cfg)
    for k in ("data", "test_data", "stats_corpus", "space_file"):
        v = getattr(cfg, k)
        if v and Path(v).exists():
            setattr(cfg, k, str(Path(v).resolve()))      # trials run in other working directories
    cfg.exclude = [str(Path(e).resolve()) for e in cfg.exclude]
    out = Path(cfg.out).resolve()
    cfg.out = str(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / ".tune.lock", blocking=False)
    try:
        lock.acquire()
    except LockHeld as e:
        raise BadInputError(f"a tune is running in this directory ({e.holder})", file=str(out / ".tune.lock")) from None
    try:
        ident = json.loads(json.dumps({k: getattr(cfg, k) for k in TuneConfig.IDENTITY}, default=list))
        rec = out / "tune.json"
        if rec.is_file():
            diff = differences(json.loads(rec.read_text()).get("identity", {}), ident)
            if diff:
                raise BadInputError(f"holds another tune ({'; '.join(diff)[:300]}); choose another --out", file=str(rec))
        split = split_requests(cfg.data, out / "split" / "val.json", limit=cfg.limit, seed=cfg.split_seed,
                               exclude=cfg.exclude, skip_invalid=cfg.skip_invalid)
        test = None
        if cfg.test_data:
            test = split_requests(cfg.test_data, out / "split" / "test.json", limit=cfg.test_limit,
                                  exclude=cfg.exclude, skip_invalid=cfg.skip_invalid)
            n = overlap(split.path, test.path)
            if n:
                raise BadInputError(f"{n} records of the test split are also in the validation split ({cfg.data}); "
                                    "the chosen hyper-parameters must be reported on other records", file=cfg.test_data,
                                    field="test_data")
        from kedit_core.io import sha256_file

        split_info = {**split.to_dict(), "sha256": sha256_file(split.path)}
        if rec.is_file():
            old = json.loads(rec.read_text()).get("split", {})
            if old.get("sha256") not in (None, split_info["sha256"]):
                raise BadInputError("the validation split differs from the one this tune started with (the data "
                                    "file changed?)", file=str(rec), field="split")
        created = not rec.is_file()
        atomic_write_text(rec, json.dumps({"identity": ident, "config": cfg.to_dict(), "split": split_info},
                                          indent=1, default=list))
        try:
            return _run(cfg, method, space, split_info, test, show_progress)
        except BadInputError:
            # refused before any trial ran (a layer out of range): the directory is not bound to it
            if created and not (out / "trials").exists():
                rec.unlink(missing_ok=True)
            raise
    finally:
        lock.release()


def _run(cfg: TuneConfig, method, space: dict, split_info: dict, test, show_progress: bool) -> dict:
    from kedit_core.methods import make_config
    from kedit_core.models import load
    from kedit_core.tune import ObjectiveSpec, resolve_space
    from pipelines.tracking import Tracker

    out = Path(cfg.out)
    lm = load(cfg.model, dtype=cfg.dtype, device="cpu")   # the model's depth and default hyper-parameters
    # layers searched as choices need not fit the default for this model (a new model's depth)
    first = {n: d.values[0] for n, d in space.items() if n == "layers" and d.kind in ("choice", "const")}
    default_cfg = make_config(method.config_cls, lm, {**first, **cfg.set})
    space = resolve_space(space, default_cfg, lm.n_layers)
    del lm
    spec = ObjectiveSpec(**cfg.objective)
    tracker = Tracker(out, cfg.tracking_uri, cfg.experiment)
    cfg.tracking_uri = tracker.uri            # the trials' child runs go to the parent's store
    parent = tracker.start_parent("tune", {**{k: v for k, v in cfg.to_dict().items() if k not in ("set", "space")},
                                    "set": cfg.set, "space": {n: d.describe() for n, d in space.items()},
                                    "split_sha256": split_info["sha256"], "source_sha256": split_info["source_sha256"]},
                           {"kedit_tune": "parent"})
    base = {"out": cfg.out, "model": cfg.model, "method": cfg.method, "data": split_info["path"],
            "batch_size": cfg.batch_size, "stats_corpus": cfg.stats_corpus, "set": dict(cfg.set),
            "perplexity_texts": cfg.perplexity_texts, "tracking_uri": cfg.tracking_uri, "experiment": cfg.experiment,
            "parent": parent, "device": cfg.device, "dtype": cfg.dtype, "skip_invalid": cfg.skip_invalid,
            "objective": spec.to_dict()}
    ran = (_run_tuner if cfg.ray else _run_local)(cfg, space, base, show_progress)
    from kedit_core.tune import params_key

    trials = []
    for i, (params, err) in enumerate(ran):
        done = out / "trials" / params_key(params) / "trial.json"
        if err is None and done.is_file():
            trials.append({"trial": i, **json.loads(done.read_text())})
        else:
            trials.append({"trial": i, "key": params_key(params), "params": params, "objective": None,
                           "error": err or "not finished (interrupted?): run the same command again"})
    ok = [t for t in trials if isinstance(t.get("objective"), (int, float))]
    best = max(ok, key=lambda t: t["objective"]) if ok else None
    for t in ok:
        tracker.log_metrics({"tune/objective": t["objective"],
                             **{f"tune/{k}": t[k] for k in SHOWN if isinstance(t.get(k), (int, float))}}, step=t["trial"])
    result = {"model": cfg.model, "method": cfg.method, "search": cfg.search,
              "objective_spec": spec.to_dict(), "objective_doc": "kedit_core.tune (module docstring)",
              "space": {n: d.describe() for n, d in space.items()}, "fixed": cfg.set,
              "searched": [n for n, d in space.items() if d.kind != "const" and (d.size() or 2) > 1],
              "default_hparams": default_cfg.to_dict(), "split": split_info,
              "best": best, "trials": trials, "test": None}
    if best is not None and test is not None:
        result["test"] = _report_on_test(cfg, best, test, parent, spec)
    atomic_write_text(out / "best.json", json.dumps(result, indent=1, default=list))
    paths = [out / "best.json", *write_report(out, cfg, result)]
    for p in paths:
        tracker.log_artifact(p)
    if best is not None:
        tracker.log_metrics({"tune/best_objective": best["objective"]}, step=len(trials))
    tracker.finish("FINISHED" if best is not None and all(t.get("error") is None for t in trials) else "FAILED")
    return result


def _report_on_test(cfg: TuneConfig, best: dict, test, parent: str | None, spec) -> dict:
    """The chosen and the default hyper-parameters on the test split (two streams, child
    runs of the tune, resumable like every stream)."""
    from kedit_core.io import sha256_file
    from kedit_core.tune import objective
    from pipelines.bench_job import run_cell
    from pipelines.config import RunConfig
    from pipelines.tracking import Tracker

    rows = {}
    for name, extra in (("chosen", best["params"]), ("default", {})):
        tdir = Path(cfg.out) / "test" / name
        rc = RunConfig(model=cfg.model, method=cfg.method, data=test.path, batch_size=cfg.batch_size, workers=0,
                       eval_every=0, out=str(tdir), stats_corpus=cfg.stats_corpus, set={**cfg.set, **extra},
                       perplexity_texts=cfg.perplexity_texts, tracking_uri=cfg.tracking_uri,
                       experiment=cfg.experiment, parent_run_id=parent, device=cfg.device, dtype=cfg.dtype,
                       skip_invalid=cfg.skip_invalid)
        cell = run_cell(rc.to_dict())
        tracker = Tracker(tdir, cfg.tracking_uri, cfg.experiment)      # continues the stream's run
        tracker.start(name, {}, {})
        tracker.set_tags({"kedit_tune": f"test-{name}"})
        tracker.finish()
        rows[name] = {"params": extra, **objective(cell["post"], cell.get("pre"), spec), "n_edits": cell["n_edits"],
                      "perplexity": cell["post"].get("perplexity"), "seconds_per_edit": cell["seconds_per_edit"],
                      "unedited": {k: cell.get("pre", {}).get(f"all/{m}") for k, m in
                                   (("efficacy", "efficacy_score"), ("generalisation", "paraphrase_score"),
                                    ("locality", "neighborhood_score"))}
                      | {"perplexity": cell.get("pre", {}).get("perplexity")}}
    return {"split": {**test.to_dict(), "sha256": sha256_file(test.path)}, **rows}


def _fmt(v) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4g}"
    if isinstance(v, list):
        contiguous = len(v) > 2 and all(isinstance(x, int) for x in v) and v == list(range(v[0], v[0] + len(v)))
        return f"{v[0]}-{v[-1]}" if contiguous else ",".join(map(str, v))
    return "-" if v is None else str(v)


def write_report(out: Path, cfg: TuneConfig, result: dict) -> list[Path]:
    trials = result["trials"]
    names = result["searched"]
    sp = result["split"]
    lines = [f"# kedit tune: {cfg.method} on {cfg.model}", "",
             f"{len(trials)} trials ({cfg.search} search), each a stream of {len(sp['indices'])} validation records of "
             f"`{Path(sp['source']).name}` (sha256 {sp['source_sha256'][:12]}, {sp['excluded']} records excluded) in "
             f"batches of {cfg.batch_size}; metrics over all edits at the end.",
             "Objective: weighted harmonic mean of efficacy, generalisation and locality times "
             f"min(1, (1 + {result['objective_spec']['ppl_tolerance']:g}) / perplexity ratio)"
             f"^{result['objective_spec']['ppl_weight']:g} (kedit_core.tune).", "",
             "| trial | " + " | ".join(names) + " | efficacy | generalisation | locality | ppl ratio | objective |",
             "|---" * (len(names) + 6) + "|"]
    for t in trials:
        p = t.get("params", {})
        mark = " **best**" if result["best"] and t.get("key") == result["best"]["key"] else ""
        vals = ["failed: " + str(t.get("error"))[:60]] + ["-"] * 4 if t.get("objective") is None else \
            [_fmt(t.get(k)) for k in ("efficacy", "generalisation", "locality", "ppl_ratio", "objective")]
        lines.append(f"| {t['trial']}{mark} | " + " | ".join(_fmt(p.get(n)) for n in names) + " | " + " | ".join(vals) + " |")
    if result["best"]:
        b = result["best"]
        lines += ["", "Chosen: " + ", ".join(f"{k}={_fmt(v)}" for k, v in b["params"].items()) +
                  f" (objective {b['objective']:.4f})."]
    if result.get("test"):
        t = result["test"]
        lines += ["", f"## On test records ({len(t['split']['indices'])} of `{Path(t['split']['source']).name}`, "
                      "none in the validation split)", "",
                  "| hyper-parameters | efficacy | generalisation | locality | perplexity | objective |",
                  "|---|---|---|---|---|---|",
                  "| unedited | " + " | ".join(_fmt(t["default"]["unedited"].get(k))
                                             for k in ("efficacy", "generalisation", "locality", "perplexity")) + " | - |"]
        for name in ("default", "chosen"):
            r = t[name]
            lines.append(f"| {name} | " + " | ".join(_fmt(r.get(k)) for k in ("efficacy", "generalisation", "locality",
                                                                             "perplexity", "objective")) + " |")
    lines += ["", "![objective per trial and hyper-parameter](report.png)"]
    md = atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return [md, plot_report(out / "report.png", cfg, result, names)]


def plot_report(path: Path, cfg: TuneConfig, result: dict, names: list[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kedit_core.io import atomic_file

    ok = [t for t in result["trials"] if isinstance(t.get("objective"), (int, float))]
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(3.6 * (1 + len(names)), 3.4), squeeze=False)
    ax = axes[0][0]
    ax.plot([t["trial"] for t in ok], [t["objective"] for t in ok], "o", color="C0")
    if ok:
        ax.plot([t["trial"] for t in ok], [max(x["objective"] for x in ok if x["trial"] <= t["trial"]) for t in ok],
                "-", color="C1", label="best so far")
        ax.legend(fontsize=8)
    ax.set_xlabel("trial"), ax.set_ylabel("objective"), ax.set_ylim(0, 1.02)
    for ax, n in zip(axes[0][1:], names):
        xs = [t["params"].get(n) for t in ok]
        if all(isinstance(x, (int, float)) for x in xs):
            ax.plot(xs, [t["objective"] for t in ok], "o")
            if result["space"].get(n, "").startswith("loguniform"):
                ax.set_xscale("log")
        else:
            labels = sorted({_fmt(x) for x in xs})
            ax.plot([labels.index(_fmt(x)) for x in xs], [t["objective"] for t in ok], "o")
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
        ax.set_xlabel(n), ax.set_ylim(0, 1.02)
    fig.suptitle(f"kedit tune: {cfg.method} on {cfg.model}", fontsize=10)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
