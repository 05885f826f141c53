"""Perplexity on held-out text: a general-capability probe for edited models.

The held-out texts must be disjoint from the texts the second-moment statistics were
computed on, *as they were used*: `tokenize_corpus` keeps the first `mom2_n_samples` texts
that tokenise to at least two tokens, so `heldout_texts` skips exactly those (applying the
same filter) and takes what follows. When the statistics used the whole corpus (WikiText-2
test has ~2,400 usable texts against the reference's 100,000 samples) too few texts remain:
then a separate source is used - the one given (`perplexity_corpus`), else the other
built-in corpus (WikiText-2 <-> the standard library's docstrings), with a warning - or, when
there is none, a one-line error. A perplexity over zero tokens is an error, never 1.0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from kedit_core.batching import batches_by_tokens, pad_id, pad_right
from kedit_core.errors import BadInputError
from kedit_core.models.loader import LoadedModel
from kedit_core.stats.moments import tokenize_corpus

log = logging.getLogger(__name__)


@torch.no_grad()
def perplexity(lm: LoadedModel, texts: Iterable[str], *, max_length: int = 128,
               n_texts: int | None = 200, batch_tokens: int = 2048) -> float:
    """exp(mean token NLL) over the texts (each cut to `max_length` tokens). Batches hold at
    most `batch_tokens` tokens: their logits (tokens x vocabulary, float32) and log-softmax
    are the peak memory: 2 x 1.6 GB at 8,192 tokens of a 49k vocabulary (the stream driver's
    peak RSS was 5.1 GB), 2 x 0.4 GB at 2,048."""
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
    if count == 0:
        raise BadInputError("no held-out text to compute perplexity on (every text is shorter than "
                            "two tokens)", field="perplexity_corpus")
    return math.exp(nll / count)


def usable(lm: LoadedModel, text: str) -> bool:
    """The filter `tokenize_corpus` applies: at least two tokens (with special tokens)."""
    return len(lm.tokenizer(text, add_special_tokens=True, truncation=True, max_length=2)["input_ids"]) >= 2


def _after_used(lm: LoadedModel, texts: Iterable[str], n_used: int | None) -> Iterator[str]:
    """The usable texts that follow the first `n_used` usable ones (None: all were used)."""
    if n_used is None:
        return
    seen = 0
    for t in texts:
        if not usable(lm, t):
            continue
        if seen < n_used:
            seen += 1
            continue
        yield t


@dataclass(frozen=True)
class HeldOut:
    texts: tuple[str, ...]
    source: str            # the corpus id the texts come from
    separate: bool         # True: not the statistics corpus (too few texts were left there)


def heldout_texts(lm: LoadedModel, corpus, n_used: int | None, n_texts: int, *,
                  perplexity_corpus=None) -> HeldOut:
    """`n_texts` held-out texts for perplexity: from `perplexity_corpus` when given (a Corpus
    or a spec for `open_corpus`), else the statistics corpus after the `n_used` texts the
    statistics consumed, else (too few left) the other built-in corpus."""
    from kedit_core.stats.corpus import Corpus, fallback_corpus, open_corpus

    if n_texts < 1:
        raise BadInputError("must be at least 1", field="perplexity_texts")
    if perplexity_corpus is not None:
        pc = perplexity_corpus if isinstance(perplexity_corpus, Corpus) else open_corpus(perplexity_corpus)
        same = pc.id == corpus.id or (bool(pc.files) and pc.files == corpus.files)
        skip = n_used if same else 0
        texts = _take(_after_used(lm, pc.texts(), skip), n_texts)
        if not texts:
            raise BadInputError(f"no held-out text in {pc.id} (the statistics used the first "
                                f"{skip} of its texts)", field="perplexity_corpus")
        return HeldOut(tuple(texts), pc.id, not same)
    texts = _take(_after_used(lm, corpus.texts(), n_used), n_texts)
    if len(texts) >= n_texts:
        return HeldOut(tuple(texts), corpus.id, False)
    other = fallback_corpus(corpus)
    if other is None:
        raise BadInputError(
            f"only {len(texts)} of {n_texts} held-out texts remain in {corpus.id} after the "
            f"{n_used if n_used is not None else 'all'} texts the statistics used, and no separate "
            "corpus is available; pass --perplexity-corpus FILE or lower mom2_n_samples",
            field="perplexity_corpus")
    log.warning("only %d held-out texts remain in %s after the %s texts the statistics used; "
                "perplexity uses %s instead", len(texts), corpus.id, n_used if n_used is not None else "all",
                other.id)
    texts = _take(_after_used(lm, other.texts(), 0), n_texts)
    if not texts:
        raise BadInputError(f"no usable text in {other.id}", field="perplexity_corpus")
    return HeldOut(tuple(texts), other.id, True)


def _take(it: Iterable[str], n: int) -> list[str]:
    out = []
    for t in it:
        out.append(t)
        if len(out) >= n:
            break
    return out
