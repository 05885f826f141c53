"""Training MEND's editor (reference eric-mitchell/mend `trainer.py`, `algs/mend.py`).

Per training edit (edit_bs 1, as the reference): the edit prompt's gradient factors through
the frozen base model; the editor's update; then, through `torch.func.functional_call` with
W + delta (differentiable in the editor's parameters):

    loss = cedit * NLL(new target | paraphrase, edited) + cloc * KL(base || edited) on the locality prompt

(KL over every token of the locality sequence, the reference's `kl_loc_loss` with the
attention mask). Adam with the reference's two learning rates (editor 1e-6, steps 1e-4),
gradient clip 100, `batch_size` edits per optimiser step (the reference accumulates 10).

Normalisation statistics are merged from the factors of the whole global batch before its
losses are computed (the reference updates them token by token inside the forward); that is
what makes W data-parallel workers take exactly the steps of one (see kedit_core.training).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kedit_core.methods.mend.method import MENDConfig, capture_factors, encode, sites_for
from kedit_core.methods.mend.net import MENDNet
from kedit_core.training import EditorTrainer, Example, world


class MENDTrainer(EditorTrainer):
    method = "mend"

    def __init__(self, lm, cfg: MENDConfig, seed: int = 0):
        super().__init__(lm, cfg, sites_for(lm, cfg))
        torch.manual_seed(seed)                      # the editor's initialisation
        self.net = MENDNet({s: lm.arch.dims(lm.model, s) for s in self.sites}, rank=cfg.rank,
                           n_hidden=cfg.n_hidden, edit_lr=cfg.edit_lr).to(lm.device)
        body = [p for n, p in self.net.named_parameters() if n != "edit_lrs"]
        self.opt = torch.optim.Adam([{"params": body, "lr": cfg.lr}, {"params": [self.net.edit_lrs], "lr": cfg.lr_lr}])

    def _factors(self, ex: Example) -> dict:
        ids, mask, lab = encode(self.lm, [ex.edit])
        return capture_factors(self.lm, self.sites, ids, mask, lab)[1]

    def _observe(self, facs: Sequence[dict]) -> None:
        """Merge the global batch's factors into the normalisation statistics."""
        for key, gt in self.net.transforms.items():
            rows = []
            for fac in facs:
                for s, (u, d) in fac.items():
                    if self.net.route[s][0] == key:
                        u2, d2 = u.reshape(-1, u.shape[-1]).float(), d.reshape(-1, d.shape[-1]).float()
                        keep = (u2 != 0).any(-1) & (d2 != 0).any(-1)
                        rows.append(torch.cat([u2[keep], d2[keep]], -1))
            x = torch.cat(rows) if rows else torch.zeros(0, gt.x_dim + gt.delta_dim, device=self.lm.device)
            gt.update_stats(x)

    def _loss(self, ex: Example, fac: dict) -> tuple[torch.Tensor, dict]:
        deltas = {s: self.net.delta(s, u, d) for s, (u, d) in fac.items()}
        l_edit, acc = self.outer_loss(deltas, ex.outer)
        kl, agree = self.locality(deltas, ex.loc)
        loss = self.cfg.cedit * l_edit + self.cfg.cloc * kl
        return loss, {"loss": float(loss.detach()), "edit_nll": float(l_edit.detach()), "edit_acc": float(acc),
                      "loc_kl": float(kl.detach()), "loc_agree": float(agree)}

    # ------------------------------------------------------------------ the protocol of kedit_core.training
    def train_step(self, mine: Sequence[Example], global_batch: int) -> dict:
        self.net.train()
        facs = [self._factors(ex) for ex in mine]
        self._observe(facs)
        self.opt.zero_grad(set_to_none=False)
        rows = []
        for ex, fac in zip(mine, facs):
            loss, m = self._loss(ex, fac)
            (loss / global_batch).backward()
            rows.append(m)
        out = self.reduce(rows, global_batch)
        out["grad_norm"] = self.step(list(self.net.parameters()), self.cfg.grad_clip)
        out.update({f"lr/{s}": float(v) for s, v in zip(self.sites, self.net.edit_lrs.detach())})
        return out

    def validate(self, examples: Sequence[Example]) -> dict:
        rank, w = world()
        self.net.eval()
        rows = []
        for ex in list(examples)[rank::w]:
            fac = self._factors(ex)
            with torch.no_grad():
                _, m = self._loss(ex, fac)
            rows.append(m)
        return self.reduce(rows, len(examples))
