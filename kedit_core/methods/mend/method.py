"""MEND, Model Editor Networks with Gradient Decomposition (Mitchell et al. 2022, arXiv
2110.11309; reference eric-mitchell/mend `algs/mend.py`, `hooks.py`, `trainer.py`).

Editing (this method): the edit batch's teacher-forced NLL on the new targets is
back-propagated once through the frozen model; at each edited projection the layer inputs u_t
and output gradients delta_t (captured by hooks; padding and prompt tokens carry no gradient
and are dropped) go through the trained editor (net.py), and the weight change is
eta_l * sum_t d~_t u~_t^T, returned as a dense (out, in) delta. The editor comes from an
artifact of `kedit train --method mend` (kedit_core.trained), refused for other base weights.

Training (train.py): the reference objective, cedit * NLL(paraphrase | edited) + cloc *
KL(base || edited) on a locality prompt, through `torch.func.functional_call` (not `higher`).

Sites: the MLP input and output projections (`mlp.in`, `mlp.out`) of the last three blocks, the
reference's layers for GPT-2 (c_fc, c_proj of h.9-11). Deviation for gated MLPs (Llama,
Qwen, Gemma): the reference's Llama configs also edit gate_proj; kedit edits up_proj and
down_proj (its architecture adapters name no gate site).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from kedit_core.batching import pad_id, pad_right
from kedit_core.methods.base import MethodConfig, MethodInfo, Stateless, hp, register
from kedit_core.trained import TrainedEditorMethod, mlp_sites
from kedit_core.types import EditRequest, EditResult, WeightDelta
from kedit_core.zopt import target_ids


@dataclass(frozen=True, kw_only=True)
class MENDConfig(MethodConfig):
    editor: str = hp("", "trained editor directory (written by `kedit train --method mend`)")
    layers: tuple[int, ...] = hp((), "blocks whose MLP in/out projections are edited (default: the last three)")
    rank: int = hp(1920, "rank of the editor's low-rank layers (reference 1920)")
    n_hidden: int = hp(1, "hidden residual layers of the editor MLP (reference 1)")
    edit_lr: float = hp(1e-4, "initial learned step per edited weight (reference 1e-4)")
    # training (kedit train)
    lr: float = hp(1e-6, "Adam learning rate of the editor (reference 1e-6)")
    lr_lr: float = hp(1e-4, "Adam learning rate of the per-weight steps (reference 1e-4)")
    cedit: float = hp(0.1, "weight of the edit loss (reference 0.1)")
    cloc: float = hp(1.0, "weight of the locality KL (reference 1.0)")
    grad_clip: float = hp(100.0, "gradient norm clip (reference 100)")


def sites_for(lm, cfg: MENDConfig) -> list[str]:
    return mlp_sites(lm, cfg.layers)


def param_name(lm, site: str) -> str:
    return lm.arch.site_path(site) + ".weight"


def encode(lm, pairs: Sequence[tuple[str, str]]):
    """(ids, attention_mask, labels) of prompt + answer sequences, right-padded; labels are
    -100 except at the answer tokens (the prompt is masked)."""
    seqs, labels = [], []
    for prompt, answer in pairs:
        p = lm.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        t = target_ids(lm, answer)
        seqs.append(p + t)
        labels.append([-100] * len(p) + t)
    ids, mask = pad_right(seqs, pad_id(lm.tokenizer), lm.device)
    lab = torch.full_like(ids, -100)
    for i, l in enumerate(labels):
        lab[i, :len(l)] = torch.tensor(l)
    return ids, mask, lab


def token_nll(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean NLL over the labelled tokens, their token accuracy) with the usual shift;
    `smoothing` > 0: label-smoothed NLL, (1 - e) NLL + e mean_v(-log p_v) (KnowledgeEditor)."""
    lg, lb = logits[:, :-1].float(), labels[:, 1:]
    m = lb != -100
    logp = torch.log_softmax(lg, -1)
    lp = logp.gather(-1, lb.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    if smoothing:
        lp = (1 - smoothing) * lp + smoothing * logp.mean(-1)
    nll = -(lp * m).sum() / m.sum().clamp(min=1)
    acc = ((lg.argmax(-1) == lb) & m).sum() / m.sum().clamp(min=1)
    return nll, acc


def capture_factors(lm, sites: Sequence[str], ids, mask, labels, smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The edit loss and, per site, (u, delta): the layer inputs and the gradients of the loss
    at the layer outputs, one row per token, such that grad W = sum_t delta_t u_t^T."""
    mods = {s: lm.arch.module(lm.model, s) for s in sites}
    ins, outs = {}, {}

    def hook(s):
        def f(mod, inp, out):
            ins[s], outs[s] = inp[0].detach(), out
        return f

    weights = {s: lm.arch.weight(lm.model, s) for s in sites}
    flags = {s: w.requires_grad for s, w in weights.items()}
    handles = [m.register_forward_hook(hook(s)) for s, m in mods.items()]
    try:
        for w in weights.values():
            w.requires_grad_(True)      # so that the sites' outputs carry a graph
        with torch.enable_grad():
            logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss, _ = token_nll(logits, labels, smoothing)
            grads = torch.autograd.grad(loss, [outs[s] for s in sites])
    finally:
        for h in handles:
            h.remove()
        for s, w in weights.items():
            w.requires_grad_(flags[s])
    return loss.detach(), {s: (ins[s], g.detach()) for s, g in zip(sites, grads)}


def edit_deltas(lm, net, sites: Sequence[str], requests: Sequence[EditRequest], update_stats: bool = False
                ) -> tuple[dict[str, torch.Tensor], float]:
    """{site: (out, in) delta} for a batch of edit requests, and the pre-edit loss."""
    ids, mask, lab = encode(lm, [(r.text, r.target_new) for r in requests])
    loss, fac = capture_factors(lm, sites, ids, mask, lab)
    return {s: net.delta(s, u, d, update=update_stats) for s, (u, d) in fac.items()}, float(loss)


@register
class MEND(TrainedEditorMethod, Stateless):
    name: ClassVar[str] = "mend"
    config_cls: ClassVar = MENDConfig
    info: ClassVar = MethodInfo("hyper-network", "Mitchell et al. 2022, arXiv 2110.11309", ("editor",),
                                summary="a trained network turns the fine-tuning gradient into a weight update")

    def prepare(self, lm, cfg: MENDConfig, stats) -> dict:
        from kedit_core.methods.mend.net import MENDNet
        tensors, meta = self.load_editor(lm, cfg)
        tc = meta["config"]
        sites = list(meta["sites"] if "sites" in meta else tc["sites"])
        net = MENDNet({s: lm.arch.dims(lm.model, s) for s in sites}, rank=int(tc["rank"]),
                      n_hidden=int(tc["n_hidden"]), edit_lr=float(tc["edit_lr"]))
        net.load_state_dict(tensors)
        net.to(lm.device).eval()
        return {"cfg": cfg, "net": net, "sites": sites, "editor_digest": meta["digest"]}

    def compute(self, lm, requests, state, backend=None, memory=None):
        deltas, loss = edit_deltas(lm, state["net"], state["sites"], requests)
        out = tuple(WeightDelta(s, dense=d.detach().float().contiguous()) for s, d in deltas.items())
        return EditResult(deltas=out, info={"mend_pre_loss": loss}), state
