"""Batched teacher-forced scoring of (prompt, answer) pairs: exact multi-token log-probs and
per-token greedy agreement, many pairs per forward pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kedit_core.batching import batches_by_tokens, pad_id, pad_right
from kedit_core.models.loader import LoadedModel
from kedit_core.zopt import target_ids


@dataclass
class Scores:
    logprob: list[float]            # sum of log p(answer tokens | prompt)
    mean_nll: list[float]           # - logprob / #tokens (the reference's comparison unit)
    token_acc: list[float]          # share of answer tokens that are the argmax
    argmax: list[list[int]]         # the greedy token at each answer position


@torch.no_grad()
def score(lm: LoadedModel, prompts: Sequence[str], answers: Sequence[str], *,
          batch_tokens: int = 8192) -> Scores:
    tok = lm.tokenizer
    seqs, spans, tgts = [], [], []
    cache: dict[str, list[int]] = {}
    for p, a in zip(prompts, answers):
        pid = cache.get(p)
        if pid is None:
            pid = cache[p] = tok(p, add_special_tokens=True)["input_ids"]
        t = target_ids(lm, a)
        seqs.append(pid + t[:-1])
        spans.append(len(pid) - 1)
        tgts.append(t)
    out = Scores([0.0] * len(seqs), [0.0] * len(seqs), [0.0] * len(seqs), [[] for _ in seqs])
    pad = pad_id(tok)
    for idx in batches_by_tokens(seqs, batch_tokens):
        ids, mask = pad_right([seqs[k] for k in idx], pad, lm.device)
        logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        for r, k in enumerate(idx):
            s, t = spans[k], tgts[k]
            lg = logits[r, s: s + len(t)].float()
            lp = torch.log_softmax(lg, -1)
            tt = torch.tensor(t, device=lp.device)
            total = float(lp.gather(1, tt.view(-1, 1)).sum())
            am = lg.argmax(-1)
            out.logprob[k] = total
            out.mean_nll[k] = -total / len(t)
            out.token_acc[k] = float((am == tt).float().mean())
            out.argmax[k] = am.tolist()
    return out
