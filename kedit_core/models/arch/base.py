"""Architecture adapters: stable site names mapped to module paths, and weight layout.

Site names (after TransformerLens):
    embed                      token embedding
    blocks.{i}                 decoder block i
    blocks.{i}.mlp.in          MLP input projection (up_proj / c_fc / fc_in / dense_h_to_4h)
    blocks.{i}.mlp.out         MLP output projection (down_proj / c_proj / fc_out / dense_4h_to_h)
    blocks.{i}.attn.out        attention output projection
    final_norm                 the norm before the unembedding
    unembed                    the language-model head

An adapter is chosen by `config.architectures[0]` (the class name), never by guessing from
a model's name. New architectures are one `register_arch(ArchSpec(...))` call away.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from kedit_core.errors import UnsupportedArchitectureError

_BLOCK_SITE = re.compile(r"^blocks\.(\d+)(?:\.(mlp\.in|mlp\.out|attn\.out))?$")


@dataclass(frozen=True)
class ArchSpec:
    family: str
    architectures: tuple[str, ...]   # HF class names this adapter serves
    blocks: str                      # path of the ModuleList of decoder blocks
    mlp_in: str                      # paths relative to a block
    mlp_out: str
    attn_out: str
    final_norm: str
    unembed: str
    embed: str
    # "linear": weight is (out_features, in_features) (nn.Linear);
    # "conv1d": weight is (in_features, out_features) (GPT-2's Conv1D).
    weight_layout: str = "linear"
    # A norm applied to the MLP output before it joins the residual stream (Gemma 3's
    # post_feedforward_layernorm), relative to a block; None where the output adds directly.
    mlp_post_norm: str | None = None

    # ------------------------------------------------------------------ names and modules
    def site_path(self, site: str) -> str:
        """The module path of a stable site name."""
        fixed = {"embed": self.embed, "final_norm": self.final_norm, "unembed": self.unembed}
        if site in fixed:
            return fixed[site]
        m = _BLOCK_SITE.match(site)
        if not m:
            raise KeyError(f"unknown site {site!r}; sites are embed, final_norm, unembed, "
                           "blocks.{i}, blocks.{i}.mlp.in, blocks.{i}.mlp.out, blocks.{i}.attn.out")
        i, sub = m.group(1), m.group(2)
        base = f"{self.blocks}.{i}"
        rel = {None: None, "mlp.in": self.mlp_in, "mlp.out": self.mlp_out, "attn.out": self.attn_out}[sub]
        return base if rel is None else f"{base}.{rel}"

    def module(self, model: nn.Module, site: str) -> nn.Module:
        return model.get_submodule(self.site_path(site))

    def n_layers(self, model: nn.Module) -> int:
        return len(model.get_submodule(self.blocks))

    def mlp_out_site(self, layer: int) -> str:
        return f"blocks.{layer}.mlp.out"

    # ------------------------------------------------------------------ weight orientation
    def weight(self, model: nn.Module, site: str) -> torch.nn.Parameter:
        return self.module(model, site).weight

    def as_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """A view of a projection weight as (out_features, in_features): W such that y = W x."""
        return weight.T if self.weight_layout == "conv1d" else weight

    def from_out_in(self, matrix: torch.Tensor) -> torch.Tensor:
        """The inverse of `as_out_in`: a matrix (out, in) in the module's own layout."""
        return matrix.T if self.weight_layout == "conv1d" else matrix

    def dims(self, model: nn.Module, site: str) -> tuple[int, int]:
        """(out_features, in_features) of a projection site."""
        w = self.weight(model, site)
        shape = getattr(w, "ds_shape", None) or w.shape  # ZeRO-3 keeps the full shape aside
        out_f, in_f = shape[::-1] if self.weight_layout == "conv1d" else shape
        return int(out_f), int(in_f)


_REGISTRY: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec, *, replace: bool = False) -> ArchSpec:
    """Make an adapter available for the class names in `spec.architectures`."""
    for name in spec.architectures:
        if name in _REGISTRY and not replace:
            raise ValueError(f"architecture {name!r} is already registered ({_REGISTRY[name].family})")
        _REGISTRY[name] = spec
    return spec


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def arch_for(config_or_model) -> ArchSpec:
    """The adapter for a model (or its config), chosen by `config.architectures[0]`."""
    config = getattr(config_or_model, "config", config_or_model)
    names = list(getattr(config, "architectures", None) or [])
    if not names and isinstance(config_or_model, nn.Module):
        names = [type(config_or_model).__name__]
    if names and names[0] in _REGISTRY:
        return _REGISTRY[names[0]]
    got = names[0] if names else f"none (model_type={getattr(config, 'model_type', '?')})"
    raise UnsupportedArchitectureError(
        f"unsupported architecture {got}; supported: {', '.join(supported_architectures())}; "
        "register another with kedit_core.models.arch.register_arch(ArchSpec(...))")
