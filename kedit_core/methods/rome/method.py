"""ROME (Meng et al., "Locating and Editing Factual Associations in GPT", arXiv 2202.05262).

One layer l; for a request with key k* (the MLP projection input at the subject's last
token, averaged over context templates) and target value v* (the projection output that
makes the model predict the new object, from the shared target optimisation with delta
added to the MLP output), the rank-one update (eq. 2) is

    delta = (v* - W k) (C^{-1} k*)^T / ((C^{-1} k*)^T k)      (k: key of the bare prompt)

with C = E[k k^T] over the statistics corpus; delta k = v* - W k exactly. With
`mom2_adjustment=False` (the AlphaEdit repository's ROME hparams for Llama-3-8B) the left
vector is k* itself: delta = (v* - W k) k*^T / (k*^T k) (reference `compute_u`).

As in the reference (kmeng01/rome `rome_main.py`, `compute_u.py`, `compute_v.py`), k* and v*
use ROME's own context templates (kedit_core.zopt.rome_context_templates): "{}" plus ten
5-token and ten 10-token samples after the model's document-start token, averaged
uniformly (k*: the mean over the 21 prompts; v*: the NLL averaged over them); MEMIT's six
templates with the bare prompt weighted 1/2 are not used here. (The AlphaEdit repository's
copy of rome_main.py seeds its 21 samples from MEMIT's five prompts instead of
<|endoftext|>; kedit follows kmeng01/rome.)

Deviations from the reference code:
* a batch is applied one request after another (ROME is a single-edit method); the result
  is one factored delta of rank = number of requests;
* the target optimisation is the shared one (kedit_core.zopt), with its early exit and
  suffix replay (same loss and trajectory);
* the templates are sampled once per model with a fixed seed and cached (the reference
  samples them once per process);
* C^{-1} k* is a float64 solve instead of an explicit inverse.

`lti=true` is EVOKE's ROME-LTI (Zhang et al. 2410.07819, Acruxos/EVOKE): the target
optimisation imitates the unedited model reading "Imagine that {fact}" (kedit_core.zopt.
LTIConfig; weights of the reference's GPT-2 XL hparams). Deviations: the teacher's fact has a
space between prompt and target (the reference concatenates them), the teacher's positions are
aligned to its prefixed rows (the reference's are not), the logit-lens block defaults to
0.625 x depth (the reference's 30 of 48), and LTI runs whole rows through the model each step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kedit_core.apply import temporarily_applied
from kedit_core.linalg import linalg_device, solve_spd
from kedit_core.methods.base import EditConfig, MethodInfo, Stateless, hp, register
from kedit_core.methods.common import mlp_out_stats, zopt_config
from kedit_core.types import EditResult, StatKey, WeightDelta
from kedit_core.zopt import hidden_at_subject, optimize_targets, rome_context_templates


@dataclass(frozen=True, kw_only=True)
class RomeConfig(EditConfig):
    layers: tuple[int, ...] = hp((5,), "the ONE decoder block edited")
    clamp_norm_factor: float = hp(4.0, "clamp ||delta|| <= factor * ||v|| (ROME: 4)")
    v_num_grad_steps: int = hp(20, "Adam steps of the value optimisation")
    mom2_adjustment: bool = hp(True, "left vector C^-1 k* (True, ROME) or k* itself (False)")
    lti_nll_factor: float = hp(0.15, "LTI: weight of the NLL (reference ROME-LTI, GPT-2 XL: 0.15)")
    lti_last_kl_factor: float = hp(0.0325, "LTI: weight of the output KL to the teacher (ROME-LTI 0.0325)")
    lti_mid_kl_factor: float = hp(0.0625, "LTI: weight of the mid-layer logit-lens KL (ROME-LTI 0.0625)")

    # `kedit tune`: the one edited block around the default, steps, and ROME's larger clamp
    TUNE_SPACE: ClassVar = {"layers": "shift:-3,-2,-1,0,1,2,3", "v_num_grad_steps": "int:10,30",
                            "clamp_norm_factor": "uniform:2,8"}

    ARCH_DEFAULTS: ClassVar = {
        ("gpt2", 48, 1600): dict(layers=(17,), v_num_grad_steps=20, clamp_norm_factor=4.0),
        ("gptj", 28, 4096): dict(layers=(5,), v_num_grad_steps=20, clamp_norm_factor=4.0),
        # Llama-3-8B: the AlphaEdit repository's hparams/ROME/Llama3-8B.json (no C^-1 in the
        # left vector, weight decay 1e-3).
        ("llama", 32, 4096): dict(layers=(5,), v_num_grad_steps=25, v_lr=0.5, clamp_norm_factor=4.0,
                                  v_weight_decay=1e-3, mom2_adjustment=False),
        # SmolLM2-135M: chosen by measurement here.
        ("llama", 30, 576): dict(layers=(5,), v_num_grad_steps=25, clamp_norm_factor=4.0,
                                 mom2_n_samples=2000),
    }


@register
class ROME(Stateless):
    name: ClassVar[str] = "rome"
    config_cls: ClassVar = RomeConfig
    info: ClassVar = MethodInfo("closed-form", "Meng et al. 2022, arXiv 2202.05262", ("statistics",),
                                summary="rank-one update of one MLP projection")

    def required_stats(self, cfg: RomeConfig, lm) -> list[StatKey]:
        return mlp_out_stats(lm, cfg.layers[:1]) if cfg.mom2_adjustment else []

    def prepare(self, lm, cfg: RomeConfig, stats) -> dict:
        if len(cfg.layers) != 1:
            from kedit_core.errors import BadInputError
            raise BadInputError("ROME edits exactly one layer", field="layers")
        C = stats[lm.arch.mlp_out_site(cfg.layers[0])].mean() if cfg.mom2_adjustment else None
        return {"cfg": cfg, "C": C}

    def compute(self, lm, requests, state, backend=None, memory=None):
        # ROME's edits are rank-one and strictly one after another: it always runs on `lm`
        # (in the Ray pipeline, on the driver's replica); `backend` is accepted and unused.
        cfg: RomeConfig = state["cfg"]
        layer = cfg.layers[0]
        site = lm.arch.mlp_out_site(layer)
        templates = rome_context_templates(lm)
        uniform = [1.0 / len(templates)] * len(templates)
        lefts, rights, info = [], [], {"z_loss": [], "z_steps": [], "targets": []}
        with temporarily_applied(lm) as app:
            for req in requests:  # sequential single edits
                v = optimize_targets(lm, [req], zopt_config(cfg, layer, "mlp.out"), templates)
                keys, _ = hidden_at_subject(lm, [req], templates, inputs_of=[site], weights=uniform)
                bare_in, bare_out = hidden_at_subject(lm, [req], ["{}"], inputs_of=[site], outputs_of=[site])
                k_star = keys[site][0].double()
                k, wk = bare_in[site][0].double(), bare_out[site][0].double()
                u = (solve_spd(state["C"], k_star.unsqueeze(1), device=linalg_device(lm)).squeeze(1)
                     if cfg.mom2_adjustment else k_star)
                u = u / u.norm()
                right = (v.targets[0].double().cpu() - wk) / torch.dot(k, u)
                d = WeightDelta(site, left=right.float().unsqueeze(1), right=u.float().unsqueeze(1))
                app.apply([d])
                lefts.append(d.left), rights.append(d.right)
                info["z_loss"] += v.losses
                info["z_steps"] += v.steps
                info["targets"].append(v.targets[0].cpu())
        delta = WeightDelta(site, left=torch.cat(lefts, 1), right=torch.cat(rights, 1))
        return EditResult((delta,), info), state
