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
    """Each distinct (prompt, answer) pair is scored once (neighbourhood prompts repeat across
    the requests of a relation); the vocabulary projection runs only at the answer positions
    (`logits_to_keep`, where the model supports it); pairs whose prompts begin with the same
    long context (memory methods) run that context once (kedit_core.prefix)."""
    from kedit_core import prefix as shared

    tok = lm.tokenizer
    uniq: dict[tuple[str, str], int] = {}
    where = [uniq.setdefault((p, a), len(uniq)) for p, a in zip(prompts, answers)]
    seqs, spans, tgts = [], [], []
    cache: dict[str, list[int]] = {}
    for p, a in uniq:
        pid = cache.get(p)
        if pid is None:
            pid = cache[p] = tok(p, add_special_tokens=True)["input_ids"]
        t = target_ids(lm, a)
        seqs.append(pid + t[:-1])
        spans.append(len(pid) - 1)
        tgts.append(t)
    n = len(seqs)
    res = Scores([0.0] * n, [0.0] * n, [0.0] * n, [[] for _ in range(n)])
    pad = pad_id(tok)
    groups, single = shared.plan(seqs, spans)

    def batches():
        for idx in batches_by_tokens([seqs[k] for k in single], batch_tokens):
            idx = [single[k] for k in idx]
            ids, mask = pad_right([seqs[k] for k in idx], pad, lm.device)
            keep = sorted({spans[k] + j for k in idx for j in range(len(tgts[k]))})
            logits, col = _logits_at(lm, ids, mask, keep)
            yield idx, logits, col, 0
        for p, members in groups:
            cache = shared.prefill(lm, seqs[members[0]][:p])
            for part in shared.batches([len(seqs[k]) - p for k in members], p):
                idx = [members[k] for k in part]
                keep = sorted({spans[k] + j - p for k in idx for j in range(len(tgts[k]))})
                logits, col = shared.forward_suffixes(lm, cache, p, [seqs[k][p:] for k in idx], pad, keep)
                yield idx, logits, col, p

    for idx, logits, col, p in batches():
        for r, k in enumerate(idx):
            s, t = spans[k] - p, tgts[k]
            lg = logits[r, [col[s + j] for j in range(len(t))]].float()
            lp = torch.log_softmax(lg, -1)
            tt = torch.tensor(t, device=lp.device)
            total = float(lp.gather(1, tt.view(-1, 1)).sum())
            am = lg.argmax(-1)
            res.logprob[k] = total
            res.mean_nll[k] = -total / len(t)
            res.token_acc[k] = float((am == tt).float().mean())
            res.argmax[k] = am.tolist()
    return Scores([res.logprob[w] for w in where], [res.mean_nll[w] for w in where],
                  [res.token_acc[w] for w in where], [list(res.argmax[w]) for w in where])


def _logits_at(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, keep: list[int]):
    """Logits at sequence positions `keep` of every row, and {position: column}."""
    if lm.scratch.get("logits_to_keep", True):
        try:
            out = lm.model(input_ids=ids, attention_mask=mask, use_cache=False,
                           logits_to_keep=torch.tensor(keep, device=ids.device)).logits
            if out.shape[1] == len(keep):
                return out, {p: c for c, p in enumerate(keep)}
        except TypeError:  # a model class without logits_to_keep
            pass
        lm.scratch["logits_to_keep"] = False
    out = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return out, {p: p for p in keep}
