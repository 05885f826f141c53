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
    lti = None
    if getattr(cfg, "lti", False):
        from kedit_core.zopt import LTIConfig

        lti = LTIConfig(nll_factor=cfg.lti_nll_factor, last_kl_factor=cfg.lti_last_kl_factor,
                        mid_kl_factor=cfg.lti_mid_kl_factor, mid_layer=cfg.lti_mid_layer)
    return ZOptConfig(layer=layer, where=where, steps=cfg.v_num_grad_steps, lr=cfg.v_lr,
                      kl_factor=getattr(cfg, "kl_factor", 0.0), weight_decay=cfg.v_weight_decay,
                      clamp_norm_factor=cfg.clamp_norm_factor, lti=lti,
                      early_stop_loss=getattr(cfg, "v_early_stop_loss", ZOptConfig.early_stop_loss))


class LocalBackend:
    """The per-request work of a locate-and-edit batch, on one model replica: target
    optimisation, and the key moments each layer's closed-form solve needs. Everything it
    returns is a sum over requests (or one row per request), so the Ray pipeline runs the
    same calls on shares of a batch in `EditWorker` actors and adds the results
    (pipelines/edit_job.py); this class is the single-process case."""

    def __init__(self, lm: LoadedModel, chunk: int = 0):
        self.lm, self.chunk = lm, chunk

    def targets(self, requests: Sequence[EditRequest], zcfg: ZOptConfig) -> ZResult:
        return optimize_in_chunks(self.lm, requests, zcfg, context_templates(self.lm), self.chunk)

    def layer_moments(self, requests: Sequence[EditRequest], targets: torch.Tensor, layer: int,
                      last: int, share: float, applied: Sequence[WeightDelta] = ()
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(K K^T, K R^T) in float64 for the requests at `layer`, with `applied` on: K (d, n)
        the keys averaged over the context templates, R (H, n) = share * (z - h_last), h_last
        the output of block `last` on the bare prompt."""
        lm = self.lm
        site = lm.arch.mlp_out_site(layer)
        with temporarily_applied(lm, applied):
            keys, _ = hidden_at_subject(lm, requests, context_templates(lm), inputs_of=[site])
            _, cur = hidden_at_subject(lm, requests, ["{}"], outputs_of=[f"blocks.{last}"])
        K = keys[site].T.double()
        R = (targets.double().cpu() - cur[f"blocks.{last}"].double()).T * share
        return K @ K.T, K @ R.T

    def key_moments(self, requests: Sequence[EditRequest], layers: Sequence[int],
                    applied: Sequence[WeightDelta] = ()) -> dict[int, torch.Tensor]:
        """K K^T (float64) of the requests' keys at each layer with `applied` on."""
        return {l: K @ K.T for l, K in keys_after(self.lm, requests, layers, applied).items()}


def spread_over_layers(backend: LocalBackend, requests: Sequence[EditRequest], cfg,
                       solve_layer: Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor],
                       ) -> tuple[list[WeightDelta], ZResult, dict]:
    """MEMIT's outer loop. Targets z_i at the last edited layer L; then for each edited layer
    l (in order) the moments K K^T and K R^T of the keys K (d, n) at l (averaged over context
    templates) and the residual R = (z - h_L) / (layers left) (h_L from the bare prompt, with
    the earlier layers' updates applied); `solve_layer(i, l, KK, KR)` returns the delta
    (out, in). The model is left unchanged; the deltas are returned."""
    L = max(cfg.layers)
    z = backend.targets(requests, zopt_config(cfg, L, "block"))
    deltas: list[WeightDelta] = []
    info = {"z_loss": z.losses, "z_steps": z.steps, "targets": z.targets.detach().cpu()}
    for i, layer in enumerate(cfg.layers):
        KK, KR = backend.layer_moments(requests, z.targets, layer, L, 1.0 / (len(cfg.layers) - i), deltas)
        delta = solve_layer(i, layer, KK, KR).float()
        deltas.append(WeightDelta(f"blocks.{layer}.mlp.out", dense=delta))  # the stable site name
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
