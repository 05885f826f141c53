"""Training SERAC's scope classifier and counterfactual model (reference eric-mitchell/serac
`trainer.py` SupervisedTrainer.edit_step, `losses.py` balanced_bce).

Per training edit (memory = that one edit, the reference's n_edits 1):

    l_cntr = NLL(new target | "{edit prompt} {new target} {paraphrase}", counterfactual model)
    l_cls  = -log s(paraphrase, edit) - log(1 - s(locality prompt, edit))     (balanced BCE)
    loss   = cedit * l_cntr + cloc * l_cls

with s = exp(-scale ||e_a - e_b||^2) of the classifier's embeddings. Over a global batch the
mean of the per-edit losses equals the reference's balanced BCE (one positive and one
negative per edit) plus the mean counterfactual NLL. Adam (lr 1e-5) over the classifier and
the counterfactual model; the base model stays frozen. Dropout is off (reference dropout 0.0),
so data-parallel workers take exactly the steps of one (kedit_core.training).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kedit_core.methods.serac.method import (SERACConfig, counterfactual_module, cntr_input, edit_text,
                                             log_similarity, unique_state)
from kedit_core.training import EditorTrainer, Example, world


def rowwise_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence mean NLL over the labelled tokens and per-sequence token accuracy."""
    lg, lb = logits[:, :-1].float(), labels[:, 1:]
    m = (lb != -100).float()
    lp = torch.log_softmax(lg, -1).gather(-1, lb.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    n = m.sum(1).clamp(min=1)
    return -(lp * m).sum(1) / n, ((lg.argmax(-1) == lb).float() * m).sum(1) / n


class SERACTrainer(EditorTrainer):
    method = "serac"

    def __init__(self, lm, cfg: SERACConfig, seed: int = 0):
        from kedit_core.encoder import trainable_encoder

        super().__init__(lm, cfg, [])
        torch.manual_seed(seed)
        mods = {"cls": trainable_encoder(cfg.encoder, device=str(lm.device))}
        if cfg.train_cntr:
            mods["cntr"] = counterfactual_module(lm, cfg.cntr_model)
        self.net = torch.nn.ModuleDict(mods)
        self.net.eval()                          # no dropout (reference: dropout 0.0)
        self.net.requires_grad_(True)
        self.cntr = mods.get("cntr")
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)

    def _cntr_logits(self, ids, mask) -> torch.Tensor:
        model = self.cntr if self.cntr is not None else self.lm.model
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    def _losses(self, exs: Sequence[Example]) -> tuple[torch.Tensor, list[dict]]:
        from kedit_core.encoder import embed_trainable
        from kedit_core.methods.mend.method import encode

        n, cfg = len(exs), self.cfg
        e = embed_trainable(self.net["cls"], [x.edit[0] for x in exs] + [x.outer[0] for x in exs]
                            + [x.loc[0] for x in exs])
        ke, kp, kn = e[:n], e[n:2 * n], e[2 * n:]
        ls_pos = log_similarity(kp, ke, cfg.scale).diagonal()
        ls_neg = log_similarity(kn, ke, cfg.scale).diagonal()
        eps = torch.finfo(torch.float32).eps
        l_cls = -ls_pos - torch.log((1 - ls_neg.exp()).clamp(min=eps))
        pairs = [(cntr_input(edit_text(*x.edit), x.outer[0]), x.outer[1]) for x in exs]
        ids, mask, lab = encode(self.lm, pairs)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cntr is not None):
            nll, acc = rowwise_nll(self._cntr_logits(ids, mask), lab)
        loss = cfg.cedit * nll + cfg.cloc * l_cls
        thr = math.log(0.5)
        rows = [{"loss": float(loss[i].detach()), "cntr_nll": float(nll[i].detach()), "cntr_acc": float(acc[i]),
                 "cls_loss": float(l_cls[i].detach()), "sim_pos": float(ls_pos[i].detach().exp()),
                 "sim_neg": float(ls_neg[i].detach().exp()),
                 "cls_pos_acc": float(ls_pos[i] > thr), "cls_neg_acc": float(ls_neg[i] <= thr),
                 # the whole routed answer: in scope and every target token the argmax
                 "edit_acc": float((ls_pos[i] > thr) and acc[i] == 1.0)} for i in range(n)]
        return loss.sum(), rows

    # ------------------------------------------------------------------ the protocol of kedit_core.training
    def train_step(self, mine: Sequence[Example], global_batch: int) -> dict:
        self.opt.zero_grad(set_to_none=False)
        total, rows = self._losses(mine)
        (total / global_batch).backward()
        out = self.reduce(rows, global_batch)
        out["cls_acc"] = (out["cls_pos_acc"] + out["cls_neg_acc"]) / 2
        out["grad_norm"] = self.step(list(self.net.parameters()), self.cfg.grad_clip)
        return out

    def validate(self, examples: Sequence[Example]) -> dict:
        rank, w = world()
        mine = list(examples)[rank::w]
        rows = []
        with torch.no_grad():
            for i in range(0, len(mine), 16):
                rows += self._losses(mine[i:i + 16])[1]
        out = self.reduce(rows, len(examples))
        out["cls_acc"] = (out["cls_pos_acc"] + out["cls_neg_acc"]) / 2
        return out

    # ------------------------------------------------------------------ state (tied weights stored once)
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        from kedit_core.training import optimizer_tensors

        ot, om = optimizer_tensors(self.opt)
        return {**unique_state(self.net, "net."), **ot}, {"opt": om, "extra": {}}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        from kedit_core.methods.serac.method import load_unique_state, split_tensors
        from kedit_core.training import load_optimizer_tensors

        load_unique_state(self.net, split_tensors(tensors, "net."), "the training checkpoint")
        load_optimizer_tensors(self.opt, {k: v for k, v in tensors.items() if k.startswith("opt.")}, meta["opt"])

    def artifact_tensors(self) -> dict[str, torch.Tensor]:
        return unique_state(self.net)
