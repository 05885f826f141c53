"""Training KnowledgeEditor (reference nicola-decao/KnowledgeEditor
`bart_seq2seq_augmented_kilt.py`): per edit, the conditioned update of the label-smoothed
NLL gradient, then

    loss = CE(new | edit prompt, edited) + CE(new | paraphrase, edited) + lambda (KL - margin)

with KL(base || edited) on a locality prompt; lambda >= 0 rises by gradient ascent (lr 0.1) on
the global batch's mean (KL - margin); the margin is multiplied by 0.8 (floor 1e-5) whenever
validation edit accuracy exceeds 0.9. RMSprop lr 3e-4. The reference trains with batches of 63
locality examples; here one locality prompt per edit (the batch's edits supply many).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kedit_core.methods.ke.method import KEConfig, build_net, condition_text, grads_for, sites_for
from kedit_core.training import EditorTrainer, Example, world


class KETrainer(EditorTrainer):
    method = "ke"

    def __init__(self, lm, cfg: KEConfig, seed: int = 0):
        super().__init__(lm, cfg, sites_for(lm, cfg))
        torch.manual_seed(seed)
        self.net = build_net(lm, cfg, self.sites)
        self.opt = torch.optim.RMSprop(self.net.parameters(), lr=cfg.lr)
        self.lagrange, self.margin = 0.0, float(cfg.margin)

    def _deltas(self, ex: Example) -> dict:
        g = grads_for(self.lm, self.sites, ex.edit[0], ex.edit[1], self.cfg.smoothing)
        ids = self.lm.tokenizer(condition_text(ex.true, ex.edit[1], ex.edit[0]),
                                return_tensors="pt")["input_ids"].to(self.lm.device)
        c = self.net.condition(ids)
        return {s: self.net.delta(s, c, g[s]) for s in self.sites}

    def _loss(self, ex: Example) -> tuple[torch.Tensor, dict]:
        deltas = self._deltas(ex)
        ce_edit, acc_edit = self.outer_loss(deltas, ex.edit)
        ce_para, acc_para = self.outer_loss(deltas, ex.outer)
        kl, agree = self.locality(deltas, ex.loc)
        ce = ce_edit + ce_para
        loss = ce + self.lagrange * (kl - self.margin)
        return loss, {"loss": float(ce.detach()), "edit_nll": float(ce_edit.detach()), "edit_acc": float(acc_edit),
                      "para_acc": float(acc_para), "loc_kl": float(kl.detach()), "loc_agree": float(agree)}

    def train_step(self, mine: Sequence[Example], global_batch: int) -> dict:
        self.net.train()
        self.opt.zero_grad(set_to_none=False)
        rows = []
        for ex in mine:
            loss, m = self._loss(ex)
            (loss / global_batch).backward()
            rows.append(m)
        out = self.reduce(rows, global_batch)
        out["grad_norm"] = self.step(list(self.net.parameters()), self.cfg.grad_clip)
        # the Lagrange multiplier: ascent on the constraint violation, kept >= 0
        self.lagrange = max(0.0, self.lagrange + self.cfg.lagrange_lr * (out["loc_kl"] - self.margin))
        out.update({"lagrange": self.lagrange, "margin": self.margin})
        return out

    def validate(self, examples: Sequence[Example]) -> dict:
        rank, w = world()
        self.net.eval()
        rows = []
        for ex in list(examples)[rank::w]:
            with torch.no_grad():
                _, m = self._loss(ex)
            rows.append(m)
        out = self.reduce(rows, len(examples))
        if out.get("para_acc", 0.0) > 0.9:
            self.margin = max(self.cfg.margin_floor, self.margin * self.cfg.margin_decay)
        return out

    def extra_state(self) -> dict:
        return {"lagrange": self.lagrange, "margin": self.margin}

    def load_extra_state(self, meta: dict) -> None:
        self.lagrange, self.margin = float(meta["lagrange"]), float(meta["margin"])
