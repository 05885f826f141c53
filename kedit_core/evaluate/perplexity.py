"""Perplexity on held-out text: a general-capability probe for edited models."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from kedit_core.models.loader import LoadedModel
from kedit_core.batching import batches_by_tokens, pad_id, pad_right
from kedit_core.stats.moments import tokenize_corpus


@torch.no_grad()
def perplexity(lm: LoadedModel, texts: Iterable[str], *, max_length: int = 128,
               n_texts: int | None = 200, batch_tokens: int = 8192) -> float:
    seqs = tokenize_corpus(lm, texts, max_length=max_length, n_samples=n_texts)
    nll, count = 0.0, 0
    pad = pad_id(lm.tokenizer)
    for idx in batches_by_tokens(seqs, batch_tokens):
        ids, mask = pad_right([seqs[i] for i in idx], pad, lm.device)
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
