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

from kedit_core.methods.mend.method import MENDConfig, capture_factors, encode, param_name, sites_for, token_nll
from kedit_core.methods.mend.net import MENDNet
from kedit_core.training import Example, all_reduce_, world


class MENDTrainer:
    method = "mend"

    def __init__(self, lm, cfg: MENDConfig, seed: int = 0):
        if lm.zero3:
            raise ValueError("MEND trains on a full (not ZeRO-3 partitioned) model")
        self.lm, self.cfg = lm, cfg
        self.sites = sites_for(lm, cfg)
        torch.manual_seed(seed)                      # the editor's initialisation
        self.net = MENDNet({s: lm.arch.dims(lm.model, s) for s in self.sites}, rank=cfg.rank,
                           n_hidden=cfg.n_hidden, edit_lr=cfg.edit_lr).to(lm.device)
        body = [p for n, p in self.net.named_parameters() if n != "edit_lrs"]
        self.opt = torch.optim.Adam([{"params": body, "lr": cfg.lr}, {"params": [self.net.edit_lrs], "lr": cfg.lr_lr}])
        for p in lm.model.parameters():
            p.requires_grad_(False)
        lm.model.eval()
        self.names = {s: param_name(lm, s) for s in self.sites}

    # ------------------------------------------------------------------ pieces
    def config(self) -> dict:
        return {**self.cfg.to_dict(), "sites": self.sites}

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

    def _post_logits(self, deltas: dict, ids, mask) -> torch.Tensor:
        from torch.func import functional_call

        arch, model = self.lm.arch, self.lm.model
        params = {self.names[s]: arch.weight(model, s) + arch.from_out_in(d).to(arch.weight(model, s).dtype)
                  for s, d in deltas.items()}
        return functional_call(model, params, args=(), kwargs=dict(input_ids=ids, attention_mask=mask,
                                                                     use_cache=False)).logits

    def _loss(self, ex: Example, fac: dict) -> tuple[torch.Tensor, dict]:
        deltas = {s: self.net.delta(s, u, d) for s, (u, d) in fac.items()}
        ids, mask, lab = encode(self.lm, [ex.outer])
        l_edit, acc = token_nll(self._post_logits(deltas, ids, mask), lab)
        ids, mask, lab = encode(self.lm, [ex.loc])
        with torch.no_grad():
            base = self.lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        post = self._post_logits(deltas, ids, mask).float()
        kl_tok = (base.softmax(-1) * (base.log_softmax(-1) - post.log_softmax(-1))).sum(-1)
        m = mask.float()
        kl = (kl_tok * m).sum() / m.sum()
        agree = ((base.argmax(-1) == post.argmax(-1)).float() * m).sum() / m.sum()
        loss = self.cfg.cedit * l_edit + self.cfg.cloc * kl
        return loss, {"loss": float(loss.detach()), "edit_nll": float(l_edit.detach()), "edit_acc": float(acc),
                      "loc_kl": float(kl.detach()),
                      "loc_agree": float(agree)}

    def _reduce(self, rows: list[dict], total: int) -> dict:
        keys = sorted({k for r in rows for k in r}) if rows else ["loss", "edit_nll", "edit_acc", "loc_kl", "loc_agree"]
        t = torch.tensor([sum(r.get(k, 0.0) for r in rows) for k in keys], dtype=torch.float64)
        all_reduce_(t)
        return {k: float(v) / max(1, total) for k, v in zip(keys, t)}

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
        params = [p for p in self.net.parameters()]
        if world()[1] > 1:
            for p in params:
                all_reduce_(p.grad)
        gnorm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip, error_if_nonfinite=True)
        self.opt.step()
        out = self._reduce(rows, global_batch)
        out["grad_norm"] = float(gnorm)
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
        return self._reduce(rows, len(examples))

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        from kedit_core.training import optimizer_tensors

        ot, om = optimizer_tensors(self.opt)
        return {**{f"net.{k}": v.detach().cpu().clone() for k, v in self.net.state_dict().items()}, **ot}, {"opt": om}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        from kedit_core.training import load_optimizer_tensors

        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        load_optimizer_tensors(self.opt, {k: v for k, v in tensors.items() if k.startswith("opt.")}, meta["opt"])

    def artifact_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
