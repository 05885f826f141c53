"""Steps shared by the locate-and-edit methods: target optimisation at the last edited
layer, keys, and spreading the residual over layers (MEMIT, Meng et al. 2210.07229 Alg. 1)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kedit_core.apply import temporarily_applied
from kedit_core.models.loader import LoadedModel
from kedit_core.types import EditRequest, StatKey, WeightDelta
from kedit_core.zopt import ZOptConfig, ZResult, context_templates, hidden_at_subject, optimize_targets


def mlp_out_stats(lm: LoadedModel, layers: Sequence[int]) -> list[StatKey]:
    """The second moments locate-and-edit methods need: E[kk^T] at the input of each edited
    layer's MLP output projection."""
    return [StatKey(lm.arch.mlp_out_site(l)) for l in layers]


def zopt_config(cfg, layer: int, where: str) -> ZOptConfig:
    return ZOptConfig(layer=layer, where=where, steps=cfg.v_num_grad_steps, lr=cfg.v_lr,
                      kl_factor=cfg.kl_factor, weight_decay=cfg.v_weight_decay,
                      clamp_norm_factor=cfg.clamp_norm_factor)


def spread_over_layers(lm: LoadedModel, requests: Sequence[EditRequest], cfg,
                       solve_layer: Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor],
                       ) -> tuple[list[WeightDelta], ZResult, dict]:
    """MEMIT's outer loop. Targets z_i at the last edited layer L; then for each edited layer
    l (in order) the keys K (d, n) at l (averaged over context templates) and the residual
    R = (z - h_L) / (layers left) (h_L from the bare prompt, with the earlier layers' updates
    applied); `solve_layer(i, l, K, R)` returns the delta (out, in). The model is restored
    on exit; the deltas are returned."""
    templates = context_templates(lm)
    L = max(cfg.layers)
    z = optimize_in_chunks(lm, requests, zopt_config(cfg, L, "block"), templates, cfg.v_batch_size)
    deltas: list[WeightDelta] = []
    info = {"z_loss": z.losses, "z_steps": z.steps, "targets": z.targets.detach().cpu()}
    with temporarily_applied(lm) as app:
        for i, layer in enumerate(cfg.layers):
            site = lm.arch.mlp_out_site(layer)
            keys, _ = hidden_at_subject(lm, requests, templates, inputs_of=[site])
            _, cur = hidden_at_subject(lm, requests, ["{}"], outputs_of=[f"blocks.{L}"])
            K = keys[site].T.double()
            R = (z.targets.double().cpu() - cur[f"blocks.{L}"].double()).T / (len(cfg.layers) - i)
            delta = solve_layer(i, layer, K, R).float()
            d = WeightDelta(site, dense=delta)
            app.apply([d])
            deltas.append(d)
    return deltas, z, info


def optimize_in_chunks(lm: LoadedModel, requests: Sequence[EditRequest], zcfg: ZOptConfig,
                       templates, chunk: int) -> ZResult:
    """optimize_targets over chunks of `chunk` requests (0: all together)."""
    if not chunk or chunk >= len(requests):
        return optimize_targets(lm, requests, zcfg, templates)
    parts = [optimize_targets(lm, requests[i:i + chunk], zcfg, templates)
             for i in range(0, len(requests), chunk)]
    return ZResult(targets=torch.cat([p.targets for p in parts]), init=torch.cat([p.init for p in parts]),
                   losses=[x for p in parts for x in p.losses], steps=[x for p in parts for x in p.steps])


def keys_after(lm: LoadedModel, requests: Sequence[EditRequest], layers: Sequence[int],
               deltas: Sequence[WeightDelta]) -> dict[int, torch.Tensor]:
    """Keys (d, n) of the requests at each layer with `deltas` applied."""
    templates = context_templates(lm)
    sites = [lm.arch.mlp_out_site(l) for l in layers]
    with temporarily_applied(lm, deltas):
        keys, _ = hidden_at_subject(lm, requests, templates, inputs_of=sites)
    return {l: keys[s].T.double() for l, s in zip(layers, sites)}
