"""Perplexity on held-out text: a general-capability probe for edited models."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from kedit_core.models.loader import LoadedModel
from kedit_core.stats.moments import batches_by_tokens


@torch.no_grad()
def perplexity(lm: LoadedModel, texts: Iterable[str], *, max_length: int = 128,
               n_texts: int | None = 200, batch_tokens: int = 8192) -> float:
    tok = lm.tokenizer
    seqs = []
    for t in texts:
        if n_texts is not None and len(seqs) >= n_texts:
            break
        ids = tok(t, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) >= 2:
            seqs.append(ids)
    nll, count = 0.0, 0
    pad = tok.pad_token_id or 0
    for idx in batches_by_tokens(seqs, batch_tokens):
        width = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[r, : len(seqs[i])] = 1
        ids, mask = ids.to(lm.device), mask.to(lm.device)
        logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        tgt = ids[:, 1:]
        m = mask[:, 1:].bool()
        lp = torch.log_softmax(logits, -1).gather(2, tgt.unsqueeze(2)).squeeze(2)
        nll -= float(lp[m].sum())
        count += int(m.sum())
    return math.exp(nll / max(count, 1))


def heldout_texts(corpus, skip: int) -> Iterable[str]:
    """Texts of a corpus after the first `skip` (those feed the statistics)."""
    for i, t in enumerate(corpus.texts()):
        if i >= skip:
            yield t
