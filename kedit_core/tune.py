"""Hyper-parameter search for a method on a new model: the objective, the search space and
the validation split (no Ray, no MLflow here: `pipelines.tune_job` runs the trials).

The objective (`objective`)
---------------------------
A trial is one sequential edit stream on validation records; at its end the metrics over ALL
its edits are read (efficacy, generalisation, locality) together with the held-out
perplexity of the edited and of the unedited model:

    S = weighted harmonic mean of (efficacy, generalisation, locality)
    penalty = min(1, (1 + tol) * ppl_unedited / ppl_edited) ** ppl_weight
    objective = S * penalty                           (in [0, 1], higher is better)

* efficacy: `efficacy_score` (CounterFact ES: P(new) > P(true) on the rewrite prompt), else
  `rewrite_acc` (zsRE-style token accuracy); generalisation: `paraphrase_score`, else
  `paraphrase_acc`; locality: `neighborhood_score` (NS: P(true) > P(new) on neighbours),
  else `locality`.
* Harmonic mean, as ROME / MEMIT's CounterFact "Score" (the unweighted case IS that score):
  it is dominated by the worst component, so a setting cannot buy efficacy by destroying the
  neighbourhood (ES 1.0, NS 0.2 scores 0.43, not the 0.73 of an arithmetic mean), and one
  component at 0 gives 0.
* Locality is absolute, not relative to the unedited model: the unedited NS is a ceiling
  every setting shares, so subtracting it would not change the ranking on one split.
* Perplexity: NS sees only the few neighbour prompts of the edited records; held-out
  perplexity catches damage elsewhere (the failure mode of a small L2 / lambda or a long
  stream). Up to `tol` (default 5%) of increase is free, beyond it the score is multiplied
  by the ratio (a 10% rise costs ~4.5%, doubling perplexity halves the score). A stream
  without perplexity (`perplexity_texts: 0`) gets no penalty, and the result says so.

The space (`parse_space`)
-------------------------
`NAME=KIND:ARGS`, one per hyper-parameter (CLI `--space`, or a YAML mapping NAME: "KIND:ARGS"):

    layers=choice:[4,5,6,7,8],[3,4,5,6,7]      one of these values (JSON; numbers, lists, strings)
    layers=shift:-2,-1,0,1,2                    the model's default layers moved by these offsets
                                                (windows that leave the model are dropped)
    L2=loguniform:0.5,50                        log-uniform float in [low, high]
    clamp_norm_factor=uniform:0.5,1.0           uniform float
    v_num_grad_steps=int:8,25                   uniform integer in [low, high]
    mom2_n_samples=2000                         a constant (every trial)

Grid search takes only choice / shift / constant dimensions. Each method may declare a
default space (`TUNE_SPACE` on its config class, e.g. AlphaEdit's: layers, L2, null-space
threshold, steps, clamp); names and values are checked against the method's typed config
before any trial runs.

The split (`split_requests`)
----------------------------
The validation records: a file, minus every record that also appears in an `exclude` file
(a benchmark's reported records; same subject, prompt and new target), then the first N or
N drawn with a seed (kept in file order). The chosen records are written as a file of the
same format, with the source file's sha256 and the record indices.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kedit_core.errors import BadInputError

# (component, metric keys in order of preference) of the objective.
COMPONENTS = (("efficacy", ("efficacy_score", "rewrite_acc")),
              ("generalisation", ("paraphrase_score", "paraphrase_acc")),
              ("locality", ("neighborhood_score", "locality")))


@dataclass(frozen=True)
class ObjectiveSpec:
    """Weights of the harmonic mean and the perplexity penalty (see the module docstring)."""

    efficacy: float = 1.0
    generalisation: float = 1.0
    locality: float = 1.0
    ppl_tolerance: float = 0.05
    ppl_weight: float = 1.0

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise BadInputError(f"must be a number >= 0, got {v!r}", field=f"objective.{f.name}")
        if self.efficacy + self.generalisation + self.locality <= 0:
            raise BadInputError("at least one metric weight must be above 0", field="objective")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _metric(row: dict, keys: tuple[str, ...]) -> float | None:
    for k in keys:
        for name in (f"all/{k}", k):
            v = row.get(name)
            if isinstance(v, (int, float)) and v == v:
                return float(v)
    return None


def objective(post: dict, pre: dict | None = None, spec: ObjectiveSpec | None = None) -> dict:
    """The objective of a finished stream from its final metrics row `post` (keys `all/...`
    or bare) and the unedited row `pre` (for the perplexity). Returns the parts:
    {objective, score, efficacy, generalisation, locality, ppl_ratio, ppl_penalty}."""
    spec = spec or ObjectiveSpec()
    parts: dict[str, Any] = {}
    num = den = 0.0
    zero = False
    for name, keys in COMPONENTS:
        w = getattr(spec, name)
        v = _metric(post, keys)
        parts[name] = v
        if w == 0:
            continue
        if v is None:
            raise BadInputError(f"the stream's metrics have no {name} ({' or '.join(keys)})", field="objective")
        v = min(max(v, 0.0), 1.0)
        if v == 0:
            zero = True
        else:
            num += w
            den += w / v
    score = 0.0 if zero else num / den
    ratio = penalty = None
    p1, p0 = post.get("perplexity"), (pre or {}).get("perplexity")
    if isinstance(p1, (int, float)) and isinstance(p0, (int, float)) and p0 > 0:
        ratio = float(p1) / float(p0) if math.isfinite(p1) else math.inf
        penalty = min(1.0, (1 + spec.ppl_tolerance) / ratio) ** spec.ppl_weight if ratio > 0 else 1.0
    parts.update(score=score, ppl_ratio=ratio, ppl_penalty=penalty,
                 objective=score * (penalty if penalty is not None else 1.0))
    return parts


# ----------------------------------------------------------------------------- the space
KINDS = ("choice", "shift", "uniform", "loguniform", "int", "const")


@dataclass(frozen=True)
class Dim:
    name: str
    kind: str
    values: tuple = ()            # choice / shift / const
    low: float | None = None      # uniform / loguniform / int
    high: float | None = None

    def describe(self) -> str:
        if self.kind == "const":
            return json.dumps(self.values[0])
        if self.kind in ("choice", "shift"):
            return f"{self.kind}:" + ",".join(json.dumps(v, separators=(",", ":")) for v in self.values)
        return f"{self.kind}:{self.low:g},{self.high:g}"

    def size(self) -> int | None:
        return len(self.values) if self.kind in ("choice", "shift", "const") else None


def _values(text: str, where: str) -> list:
    try:
        vals = json.loads(f"[{text}]")
    except json.JSONDecodeError:
        vals = [v.strip() for v in text.split(",") if v.strip()]
    if not vals:
        raise BadInputError("no values", field=where)
    return vals


def _field_types(config_cls) -> dict:
    return {f.name: f for f in fields(config_cls)}


def _check_value(config_cls, name: str, value, where: str):
    from kedit_core.methods.base import make_config

    try:
        return getattr(make_config(config_cls, None, {name: value}), name)
    except BadInputError as e:
        raise BadInputError(f"{e.reason} in the search space", field=where) from None
    except (TypeError, ValueError) as e:
        raise BadInputError(f"invalid value {value!r} ({' '.join(str(e).split())[:100]}) in the search space",
                            field=where) from None


def parse_dim(name: str, spec: Any, config_cls) -> Dim:
    """One dimension from `KIND:ARGS` (or a YAML list: a choice; a number: a constant),
    checked against the method's config."""
    types = _field_types(config_cls)
    where = f"space.{name}"
    if name not in types:
        raise BadInputError(f"unknown hyper-parameter for {config_cls.__name__} (known: {', '.join(types)})",
                            field=where)
    default = types[name].default
    if isinstance(spec, list):
        kind, vals = "choice", spec
    elif isinstance(spec, str) and ":" in spec and spec.split(":", 1)[0].strip() in KINDS:
        kind, rest = (s.strip() for s in spec.split(":", 1))
        vals = _values(rest, where)
    else:
        kind, vals = "const", [spec]
    if kind in ("choice", "const"):
        out = []
        for v in vals:
            c = _check_value(config_cls, name, v, where)
            out.append(list(c) if isinstance(c, tuple) else c)
        if len({json.dumps(v) for v in out}) != len(out):
            raise BadInputError("repeated values", field=where)
        return Dim(name, kind, tuple(out))
    if kind == "shift":
        if not isinstance(default, tuple):
            raise BadInputError("shift: applies to a list of layers only", field=where)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            raise BadInputError("shift: takes integer offsets, e.g. shift:-2,-1,0,1,2", field=where)
        if len(set(vals)) != len(vals):
            raise BadInputError("repeated values", field=where)
        return Dim(name, kind, tuple(vals))
    if len(vals) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        raise BadInputError(f"{kind}: takes two numbers LOW,HIGH, got {','.join(map(str, vals))}", field=where)
    low, high = float(vals[0]), float(vals[1])
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise BadInputError(f"{kind}: needs LOW < HIGH, got {low:g},{high:g}", field=where)
    if kind == "loguniform" and low <= 0:
        raise BadInputError(f"loguniform: needs LOW > 0, got {low:g}", field=where)
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        raise BadInputError(f"{kind}: applies to a number, not a {type(default).__name__}", field=where)
    if kind == "int" and not (low.is_integer() and high.is_integer()):
        raise BadInputError("int: takes integer bounds", field=where)
    if isinstance(default, int) and kind != "int":
        raise BadInputError(f"an integer hyper-parameter: use int:LOW,HIGH, not {kind}", field=where)
    for v in (low, high):
        _check_value(config_cls, name, int(v) if kind == "int" else v, where)
    return Dim(name, kind, low=low, high=high)


def parse_space(items: list[str] | dict | None, config_cls, *, use_default: bool = True) -> dict[str, Dim]:
    """The search space: the method's default space (`TUNE_SPACE`, when `use_default`),
    then the given dimensions (`NAME=KIND:ARGS` strings or a mapping), which replace
    defaults of the same name. A space without any dimension that varies is refused."""
    raw: dict[str, Any] = dict(getattr(config_cls, "TUNE_SPACE", {}) or {}) if use_default else {}
    given: dict[str, Any] = {}
    if isinstance(items, dict):
        given = {str(k): v for k, v in items.items()}
    else:
        for item in items or []:
            if "=" not in item:
                raise BadInputError(f"expected NAME=KIND:ARGS (e.g. L2=loguniform:1,100), got {item!r}", field="space")
            k, v = item.split("=", 1)
            if k.strip() in given:
                raise BadInputError("given twice", field=f"space.{k.strip()}")
            given[k.strip()] = v.strip()
    raw.update(given)
    space = {k: parse_dim(k, v, config_cls) for k, v in raw.items()}
    if not any(d.kind != "const" and (d.size() or 2) > 1 for d in space.values()):
        raise BadInputError(f"nothing to search for {config_cls.__name__}: give dimensions with --space NAME=KIND:ARGS "
                            "(e.g. L2=loguniform:1,100)", field="space")
    return space


def load_space_file(path: str | Path) -> dict:
    import yaml

    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise BadInputError("no such space file", file=str(p)) from None
    except yaml.YAMLError as e:
        raise BadInputError(f"not valid YAML ({' '.join(str(e).split())[:120]})", file=str(p)) from None
    if not isinstance(raw, dict):
        raise BadInputError("a search space is a mapping NAME: KIND:ARGS", file=str(p))
    return raw


def resolve_space(space: dict[str, Dim], default_cfg, n_layers: int | None) -> dict[str, Dim]:
    """Shifts become choices of concrete layer lists for this model (the method's default
    layers for it, moved; windows outside [0, n_layers) dropped); a choice of layers outside
    the model is refused."""
    out = {}
    for name, d in space.items():
        if d.kind == "shift":
            base = tuple(getattr(default_cfg, name))
            vals = [[l + s for l in base] for s in d.values]
            ok = [v for v in vals if n_layers is None or all(0 <= l < n_layers for l in v)]
            if not ok:
                raise BadInputError(f"every shift of {list(base)} leaves the {n_layers}-layer model",
                                    field=f"space.{name}")
            d = Dim(name, "choice", tuple(ok))
        if d.kind in ("choice", "const") and n_layers is not None:
            for v in d.values:
                if isinstance(v, list) and name == "layers" and not all(0 <= l < n_layers for l in v):
                    raise BadInputError(f"layers {v} out of range for a {n_layers}-layer model",
                                        field=f"space.{name}")
        out[name] = d
    return out


def grid(space: dict[str, Dim]) -> list[dict]:
    """Every combination of a grid space (choice / constant dimensions only)."""
    import itertools

    bad = [n for n, d in space.items() if d.kind not in ("choice", "const")]
    if bad:
        raise BadInputError(f"grid search needs choice: dimensions; {', '.join(bad)} "
                            f"{'is' if len(bad) == 1 else 'are'} {space[bad[0]].kind}", field=f"space.{bad[0]}")
    names = list(space)
    return [dict(zip(names, combo)) for combo in itertools.product(*(space[n].values for n in names))]


def sample(space: dict[str, Dim], rng: random.Random) -> dict:
    """One random point (random search without Ray; the Ray job uses Tune's samplers)."""
    out = {}
    for n, d in space.items():
        if d.kind in ("choice", "const"):
            out[n] = d.values[rng.randrange(len(d.values))]
        elif d.kind == "uniform":
            out[n] = rng.uniform(d.low, d.high)
        elif d.kind == "loguniform":
            out[n] = math.exp(rng.uniform(math.log(d.low), math.log(d.high)))
        elif d.kind == "int":
            out[n] = rng.randint(int(d.low), int(d.high))
        else:
            raise BadInputError(f"unresolved {d.kind} dimension (resolve_space first)", field=f"space.{n}")
    return out


def params_key(params: dict) -> str:
    """A short stable name for a point of the space (its trial directory)."""
    import hashlib

    return hashlib.sha256(json.dumps(params, sort_keys=True, default=list).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- the split
def request_key(req) -> tuple[str, str, str]:
    return (req.subject, req.text, req.target_new)


@dataclass
class Split:
    path: str                     # the written subset file
    source: str
    source_sha256: str
    indices: list[int]            # record indices in the source file
    excluded: int = 0             # records dropped because an exclude file has them
    exclude: list[dict] = field(default_factory=list)    # [{file, sha256}]
    seed: int | None = None

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _record_index(req) -> int:
    return int(req.source.rsplit("#", 1)[1])


def split_requests(source: str | Path, out_file: str | Path, *, limit: int | None, seed: int | None = None,
                   exclude: list[str | Path] = (), skip_invalid: bool = False) -> Split:
    """Write the chosen records of `source` to `out_file` (atomic; JSON list of the raw
    records, so the format is the source's). Records that an `exclude` file also holds are
    dropped first; then the first `limit` (seed None) or `limit` drawn with `seed`."""
    from kedit_core.data import read_dataset, read_records
    from kedit_core.io import atomic_write_text, sha256_file

    source = str(source)
    ds = read_dataset(source, skip_invalid=skip_invalid)
    banned: set = set()
    ex_info = []
    for e in exclude:
        banned |= {request_key(r) for r in read_dataset(e, skip_invalid=True).requests}
        ex_info.append({"file": str(e), "sha256": sha256_file(e)})
    keep, dropped = [], 0
    for case in ds.cases:
        if any(request_key(r) in banned for r in case.requests):
            dropped += 1
            continue
        keep.append(_record_index(case.requests[0]))
    if limit is not None and limit < len(keep):
        keep = sorted(random.Random(seed).sample(keep, limit)) if seed is not None else keep[:limit]
    if not keep:
        raise BadInputError("no records left for the split (after the exclusions)", file=source)
    raw = read_records(source)
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_file, json.dumps([raw[i] for i in keep], ensure_ascii=False))
    return Split(path=str(out_file), source=source, source_sha256=sha256_file(source), indices=keep,
                 excluded=dropped, exclude=ex_info, seed=seed)


def overlap(a: str | Path, b: str | Path) -> int:
    """How many edit requests two files share (same subject, prompt and new target)."""
    from kedit_core.data import read_dataset

    ka = {request_key(r) for r in read_dataset(a, skip_invalid=True).requests}
    return sum(request_key(r) in ka for r in read_dataset(b, skip_invalid=True).requests)
