"""The method interface, typed configs with per-architecture defaults, and the registry.

One protocol serves every family of editor (DESIGN.md section 3):

    family          compute() yields             sequential state         needs
    closed-form     weight deltas                K_p K_p^T (AlphaEdit)    statistics
    gradient        weight deltas                -                        -
    hyper-network   weight deltas                the trained editor       a trained editor
    memory          a memory update              (the memory)             an encoder
    memory+model    a memory update              (the memory)             editor + encoder

A method is a class registered by name with
  name, config_cls, info (MethodInfo: family, needs, paper)
  required_stats(cfg, lm)            -> [StatKey]           (statistics it needs; may be [])
  prepare(lm, cfg, stats)            -> state               (once, before the first batch)
  compute(lm, requests, state, backend=None, memory=None) -> (EditResult, state)
                                        deltas and/or memory entries; leaves `lm` unchanged
                                        (`memory`: the Editor's memory as it is, read-only)
  state_dict(state) -> (tensors, meta)   and   load_state_dict(state, tensors, meta) -> state
                                        the sequential state as safetensors + JSON (optional:
                                        a stateless method inherits `Stateless`'s)
  wrap(base, state, memory) -> EditedModel
                                        what evaluation, generation and export see (optional:
                                        the base model with its deltas, `Stateless.wrap`)
The caller (kedit_core.editor.Editor, the Ray stream driver) applies the deltas, adds the
memory entries to the Editor's `EditMemory`, checkpoints `state_dict` and the memory, and
never asks which method ran.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Protocol

from kedit_core.errors import BadInputError
from kedit_core.models.loader import LoadedModel
from kedit_core.types import EditRequest, EditResult, StatKey


def hp(default, help: str):
    """A config field with its documentation (shown by `kedit edit-local --help-method`)."""
    return field(default=default, metadata={"help": help})


FAMILIES = ("closed-form", "gradient", "hyper-network", "memory", "memory+model")
NEEDS = ("statistics", "editor", "encoder")


@dataclass(frozen=True)
class MethodInfo:
    family: str                      # one of FAMILIES
    paper: str                       # "Author et al. YEAR, arXiv ID"
    needs: tuple[str, ...] = ()      # of NEEDS
    summary: str = ""

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}")
        bad = [n for n in self.needs if n not in NEEDS]
        if bad:
            raise ValueError(f"unknown needs {bad}")


@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """Base of every method's config: typed fields with `help` metadata (`hp`) and a table
    of per-architecture defaults."""

    # (family, n_layers, hidden) -> overrides, per method; filled by subclasses.
    ARCH_DEFAULTS: ClassVar[dict[tuple[str, int, int], dict[str, Any]]] = {}
    # The default search space of `kedit tune`: NAME -> "KIND:ARGS" (kedit_core.tune.parse_space).
    TUNE_SPACE: ClassVar[dict[str, str]] = {}

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def defaults_for(cls, lm: LoadedModel) -> dict[str, Any]:
        """The defaults for this model before the user's overrides: its ARCH_DEFAULTS entry (a
        config may derive defaults for models outside its table, e.g. layers scaled by depth)."""
        return dict(cls.ARCH_DEFAULTS.get(model_key(lm), {}))


@dataclass(frozen=True, kw_only=True)
class EditConfig(MethodConfig):
    """Fields every locate-and-edit method shares (names follow the reference hparams)."""

    layers: tuple[int, ...] = hp((4, 5, 6, 7, 8), "decoder blocks whose MLP output projection is edited")
    v_num_grad_steps: int = hp(25, "Adam steps of the target optimisation")
    v_lr: float = hp(0.5, "Adam learning rate of the target optimisation")
    v_weight_decay: float = hp(0.5, "weight decay on ||delta|| / ||h||^2")
    clamp_norm_factor: float = hp(0.75, "clamp ||delta|| <= factor * ||h||")
    kl_factor: float = hp(0.0625, "weight of the KL term on '{subject} is a'")
    v_batch_size: int = hp(0, "requests optimised together (0: the whole batch; 1: one at a time, "
                                 "as the reference code)")
    mom2_n_samples: int = hp(100_000, "texts of the statistics corpus (reference: 100,000 Wikipedia texts)")
    mom2_max_length: int = hp(128, "tokens per statistics text")
    # EVOKE's LTI (Zhang et al. 2410.07819): the target optimisation learns from the unedited
    # model reading "Imagine that {fact}" (kedit_core.zopt.LTIConfig); reference weights of
    # MEMIT-LTI (GPT-2 XL), ROME's own in its config
    lti: bool = hp(False, "EVOKE's LTI: the target optimisation imitates the unedited model reading the fact "
                          "in context (reduces overfitting)")
    lti_nll_factor: float = hp(0.125, "LTI: weight of the NLL (reference MEMIT-LTI 0.125, ROME-LTI 0.15)")
    lti_last_kl_factor: float = hp(0.0425, "LTI: weight of the output KL to the teacher (MEMIT-LTI 0.0425, "
                                           "ROME-LTI 0.0325)")
    lti_mid_kl_factor: float = hp(0.0525, "LTI: weight of the mid-layer logit-lens KL (MEMIT-LTI 0.0525, "
                                          "ROME-LTI 0.0625)")
    lti_mid_layer: int = hp(-1, "LTI: block of the logit lens (-1: 0.625 x depth, the reference's 30 of 48)")

    # `kedit tune`: the edited window moved around the model's default, the target
    # optimisation's steps and its clamp (methods add their own regulariser)
    TUNE_SPACE: ClassVar[dict[str, str]] = {"layers": "shift:-2,-1,0,1,2", "v_num_grad_steps": "int:8,25",
                                            "clamp_norm_factor": "uniform:0.5,1.0"}


def model_key(lm: LoadedModel) -> tuple[str, int, int]:
    return (lm.arch.family, lm.n_layers, lm.arch.dims(lm.model, "blocks.0.mlp.out")[0])


def make_config(cls: type[MethodConfig], lm: LoadedModel | None, overrides: dict[str, Any]) -> MethodConfig:
    """Dataclass defaults, then the table entry for this model, then the user's overrides
    (unknown names and wrong types are refused, naming the field)."""
    names = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    if lm is not None:
        values.update(cls.defaults_for(lm))
    for k, v in overrides.items():
        if k not in names:
            raise BadInputError(f"unknown hyper-parameter for {cls.__name__} (known: {', '.join(names)})", field=k)
        values[k] = _coerce(names[k], v)
    cfg = cls(**values)
    if lm is not None and hasattr(cfg, "layers"):
        bad = [l for l in cfg.layers if not 0 <= l < lm.n_layers]
        if bad:
            raise BadInputError(f"layers {bad} out of range for a {lm.n_layers}-layer model", field="layers")
    return cfg


def _coerce(f: dataclasses.Field, v: Any) -> Any:
    default = f.default
    try:
        if isinstance(default, tuple):
            if isinstance(v, str):
                v = [x for x in v.replace(",", " ").split()]
            out = tuple(type(default[0])(x) if default else int(x) for x in v)
        elif isinstance(default, bool):
            return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")
        elif isinstance(default, (int, float)) and not isinstance(v, bool):
            return type(default)(v)
    except (TypeError, ValueError) as e:
        raise BadInputError(f"cannot read {v!r} as {type(default).__name__}", field=f.name) from e
    if isinstance(default, tuple):
        if default and not out:
            raise BadInputError(f"must not be empty (e.g. {f.name}=4,5,6)", field=f.name)
        return out
    return v


class EditMethod(Protocol):
    name: ClassVar[str]
    config_cls: ClassVar[type[MethodConfig]]
    info: ClassVar[MethodInfo]

    def required_stats(self, cfg: MethodConfig, lm: LoadedModel) -> list[StatKey]: ...

    def prepare(self, lm: LoadedModel, cfg: MethodConfig, stats: Any) -> Any: ...

    def compute(self, lm: LoadedModel, requests: Sequence[EditRequest], state: Any, backend: Any = None,
                memory: Any = None) -> tuple[EditResult, Any]:
        """Deltas and/or memory entries for `requests` and the next state; leaves `lm`
        unchanged. `backend` runs the per-request work (methods.common.LocalBackend on `lm`
        when None; the Ray pipeline passes one that shards it over actors)."""

    def state_dict(self, state: Any) -> tuple[dict[str, Any], dict]: ...

    def load_state_dict(self, state: Any, tensors: dict[str, Any], meta: dict) -> Any: ...

    def wrap(self, base: Any, state: Any, memory: Any) -> Any: ...


class Stateless:
    """Defaults for the optional parts of the protocol: no sequential state to save, no
    statistics, and the edited model is the base model with its deltas applied."""

    def required_stats(self, cfg, lm) -> list[StatKey]:
        return []

    def prepare(self, lm, cfg, stats) -> dict:
        return {"cfg": cfg}

    def state_dict(self, state) -> tuple[dict, dict]:
        return {}, {}

    def load_state_dict(self, state, tensors: dict, meta: dict):
        return state

    def wrap(self, base, state, memory):
        return base


_REGISTRY: dict[str, type] = {}


def register(cls):
    for attr in ("name", "config_cls", "info"):
        if not hasattr(cls, attr):
            raise TypeError(f"{cls.__name__} lacks {attr!r}: every method declares name, config_cls and info")
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> EditMethod:
    key = name.lower()
    if key not in _REGISTRY:
        raise BadInputError(f"unknown method {name!r} (available: {', '.join(sorted(_REGISTRY))})",
                            field="method")
    return _REGISTRY[key]()


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def describe_methods() -> list[dict]:
    """One row per registered method: name, family, needs, paper, summary (`kedit methods`)."""
    rows = []
    for name in sorted(_REGISTRY):
        info: MethodInfo = _REGISTRY[name].info
        rows.append({"name": name, "family": info.family, "needs": list(info.needs), "paper": info.paper,
                     "summary": info.summary})
    return rows
