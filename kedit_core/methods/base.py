"""The method interface, typed configs with per-architecture defaults, and the registry."""

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


@dataclass(frozen=True, kw_only=True)
class EditConfig:
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

    # (family, n_layers, hidden) -> overrides, per method; filled by subclasses.
    ARCH_DEFAULTS: ClassVar[dict[tuple[str, int, int], dict[str, Any]]] = {}

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def model_key(lm: LoadedModel) -> tuple[str, int, int]:
    return (lm.arch.family, lm.n_layers, lm.arch.dims(lm.model, "blocks.0.mlp.out")[0])


def make_config(cls: type[EditConfig], lm: LoadedModel | None, overrides: dict[str, Any]) -> EditConfig:
    """Dataclass defaults, then the table entry for this model, then the user's overrides
    (unknown names and wrong types are refused, naming the field)."""
    names = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    if lm is not None:
        values.update(cls.ARCH_DEFAULTS.get(model_key(lm), {}))
    for k, v in overrides.items():
        if k not in names:
            raise BadInputError(f"unknown hyper-parameter for {cls.__name__} (known: {', '.join(names)})", field=k)
        values[k] = _coerce(names[k], v)
    cfg = cls(**values)
    if lm is not None:
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
    config_cls: ClassVar[type[EditConfig]]

    def required_stats(self, cfg: EditConfig, lm: LoadedModel) -> list[StatKey]: ...

    def prepare(self, lm: LoadedModel, cfg: EditConfig, stats: dict[str, Any]) -> Any: ...

    def compute(self, lm: LoadedModel, requests: Sequence[EditRequest], state: Any, backend: Any = None
                ) -> tuple[EditResult, Any]:
        """Deltas for `requests` and the next state; leaves `lm` unchanged. `backend` runs
        the per-request work (methods.common.LocalBackend on `lm` when None; the Ray
        pipeline passes one that shards it over actors)."""


_REGISTRY: dict[str, type] = {}


def register(cls):
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
