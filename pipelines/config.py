"""The configuration of an edit stream: one schema for `kedit edit` flags and YAML files
(cluster_configs/jobs/*.yaml). Flags override the file. The fields that decide the weights
form the run's identity; its hash is stored with every checkpoint, and resuming with a
different identity is refused, naming the fields that differ. `workers`, `device` and
`zero3` are not part of it: a resume may change them, and is then exact only up to
float32 rounding (another sharding of a batch sums in another order)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kedit_core.errors import BadInputError


@dataclass(kw_only=True)
class RunConfig:
    model: str = "smollm2-135m"
    method: str = "alphaedit"
    data: str = "builtin"                 # a dataset file, or "builtin"
    limit: int | None = None
    batch_size: int = 10
    workers: int | str = "auto"           # EditWorker actors: "auto" (from the resources Ray reports:
                                          # pipelines.workers.plan_workers), or N (0: no Ray, edit in the driver)
    eval_every: int = 10                  # evaluate every N edits (0: only at the start and end)
    eval_limit: int | None = None         # also evaluate "all edits so far" at every point, on at most N of
                                          # them (a strided sample; the old behaviour, O(edits) per point)
    eval_retention: int = 500             # the retention sample: this many past edits, stratified over the stream
    eval_probe: int = 100                 # the probe: this many records the stream never edits (0: none)
    eval_tokens: int = 16384              # evaluation unit (tokens scored), the grain of sharding over workers
    checkpoint_every: int = 1             # checkpoint every k batches
    keep_checkpoints: int = 3
    out: str | None = None
    stats_corpus: str | None = None
    stats_workers: int | None = None      # StatsWorker actors (default: workers, at least 1)
    dtype: str = "fp32"
    device: str = "auto"
    set: dict[str, Any] = field(default_factory=dict)   # method hyper-parameters
    perplexity_texts: int = 50
    perplexity_corpus: str | None = None  # held-out perplexity texts (default: the statistics corpus
                                          # after the texts the statistics used, else the other built-in)
    zsre_convention: str = "mend"         # zsRE files: "mend" (alt is the new target) or "memit" (answers[0])
    skip_invalid: bool = False
    strict: bool = False                  # refuse duplicate case ids in the dataset (default: a warning)
    zopt_chunk: int = 64                  # requests per chunk of a batch (one worker call; bounded memory)
    chunk_checkpoint_s: float = 60.0      # a batch in progress saves its running sums at most this often
                                          # (0: after every chunk; targets are saved for every chunk)
    tracking_uri: str | None = None       # default: sqlite in the output directory's parent
    experiment: str = "kedit"
    parent_run_id: str | None = None      # an MLflow parent run (kedit bench: one child run per cell)
    ray_address: str | None = None        # default: the cluster of a submitted job, else a local instance
    seed: int = 0
    zero3: bool = False                   # replicas partitioned by DeepSpeed ZeRO-3 (optional extra)
    ds_config: str | None = None          # DeepSpeed JSON for zero3 (default: kedit_core.models.zero3)
    # Faults: bounded waits everywhere (seconds), bounded actor restarts.
    tracking_timeout_s: float = 10.0      # wait at most this for one MLflow call, then buffer (store down/slow)
    tracking_flush_s: float = 60.0        # at the end, wait at most this for buffered MLflow calls
    actor_start_timeout_s: float = 600.0  # an actor must have loaded its model within this
    actor_call_timeout_s: float = 3600.0  # one actor call (a batch's share, a statistics shard)
    actor_max_restarts: int = 3           # a worker process that dies more often than this is given up

    # The fields that decide the edited weights: a resumed run must match them.
    IDENTITY = ("model", "method", "data", "limit", "batch_size", "stats_corpus", "dtype", "set",
                "skip_invalid", "zopt_chunk", "seed", "zsre_convention")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


FIELDS = {f.name: f for f in fields(RunConfig)}


def _coerce(name: str, value: Any, where: str | None) -> Any:
    f = FIELDS[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if value is None:
        return None
    try:
        if name == "workers":
            if isinstance(value, str) and value.strip().lower() == "auto":
                return "auto"
            if isinstance(value, bool):
                raise TypeError
            return int(value)
        if name == "set":
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
        if isinstance(default, bool):
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if isinstance(default, int) or name in ("limit", "eval_limit", "stats_workers"):
            if isinstance(value, bool):
                raise TypeError
            return int(value)
        return str(value)
    except (TypeError, ValueError) as e:
        raise BadInputError(f"cannot read {value!r} as the type of {name}", file=where, field=name) from e


def read_job_file(path: str | Path, known) -> dict[str, Any]:
    """The keys of a YAML job config (`-` read as `_`), each one of `known`: a missing file,
    invalid YAML, a non-mapping or an unknown key is a one-line error naming the file (and key).
    `kedit edit`, `kedit train` and `kedit bench` read their --config through it."""
    import yaml

    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError as e:
        raise BadInputError("no such config file", file=str(p)) from e
    except yaml.YAMLError as e:
        raise BadInputError(f"not valid YAML ({' '.join(str(e).split())[:120]})", file=str(p)) from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BadInputError("a job config is a mapping of option names to values", file=str(p))
    known = list(known)
    out = {}
    for k, v in raw.items():
        name = str(k).replace("-", "_")
        if name not in known:
            raise BadInputError(f"unknown option (known: {', '.join(known)})", file=str(p), field=str(k))
        out[name] = v
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The keys of a YAML job config, validated against RunConfig (unknown keys refused)."""
    return {k: _coerce(k, v, str(path)) for k, v in read_job_file(path, FIELDS).items()}


def build(file: str | Path | None = None, **flags: Any) -> RunConfig:
    """File values, then flags that were given (None means not given)."""
    values = load_yaml(file) if file else {}
    for k, v in flags.items():
        if v is not None:
            values[k] = _coerce(k, v, None)
    cfg = RunConfig(**values)
    for name in ("tracking_timeout_s", "actor_start_timeout_s", "actor_call_timeout_s"):
        if not getattr(cfg, name) > 0:
            raise BadInputError("must be more than 0", file=str(file) if file else None, field=name)
    for name in ("tracking_flush_s", "actor_max_restarts"):
        if getattr(cfg, name) < 0:
            raise BadInputError("must be 0 or more", file=str(file) if file else None, field=name)
    where = str(file) if file else None
    for name in ("batch_size", "keep_checkpoints", "checkpoint_every", "eval_limit", "stats_workers", "eval_tokens"):
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise BadInputError(f"must be at least 1, got {v}", file=where, field=name)
    for name in ("workers", "limit", "eval_every", "perplexity_texts", "zopt_chunk", "chunk_checkpoint_s",
                 "eval_retention", "eval_probe"):
        v = getattr(cfg, name)
        if v is not None and v != "auto" and v < 0:
            raise BadInputError(f"must be 0 or more, got {v}", file=where, field=name)
    for name in ("model", "method", "data", "dtype", "device", "experiment"):
        if not str(getattr(cfg, name)).strip():
            raise BadInputError("must not be empty", file=where, field=name)
    if cfg.zsre_convention not in ("mend", "memit"):
        raise BadInputError("must be mend or memit", file=where, field="zsre_convention")
    return cfg


def identity(cfg: RunConfig, *, data_hash: str, hparams: dict) -> dict:
    """What a checkpoint must match: the identity fields, the dataset's content hash and the
    method's fully resolved hyper-parameters."""
    d = {k: getattr(cfg, k) for k in RunConfig.IDENTITY}
    d["data_hash"] = data_hash
    d["hparams"] = hparams
    return json.loads(json.dumps(d, sort_keys=True, default=list))


def config_identity(cfg: RunConfig, *, data_hash: str, corpus: dict) -> dict:
    """The part of the identity known before any model loads: the identity fields, the
    dataset's content hash and the statistics corpus the run resolves to (id and content
    hash: `stats_corpus: null` means WikiText-2 where ../shared is present, else the standard
    library's docstrings, so a resume on another machine must resolve to the same)."""
    d = {k: getattr(cfg, k) for k in RunConfig.IDENTITY}
    d["data_hash"] = data_hash
    d["corpus"] = corpus
    return json.loads(json.dumps(d, sort_keys=True, default=list))


def identity_hash(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'name: old -> new' for every field that differs (nested dicts flattened)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out
