"""Padding token lists into batches: the one helper every forward pass over many
sequences uses (statistics, scoring, perplexity, target optimisation)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def pad_right(seqs: Sequence[Sequence[int]], pad: int, device=None, width: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), right-padded to `width` (default: the longest sequence)."""
    width = width or max(1, max((len(s) for s in seqs), default=1))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, : len(s)] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


def batches_by_tokens(token_lists: Sequence[Sequence[int]], max_tokens: int) -> Iterable[list[int]]:
    """Indices of sequences grouped so that batch_size * longest <= max_tokens (sorted by
    length to waste little padding; a longer sequence goes alone)."""
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    batch: list[int] = []
    longest = 0
    for i in order:
        n = len(token_lists[i])
        if batch and max(longest, n) * (len(batch) + 1) > max_tokens:
            yield batch
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, n)
    if batch:
        yield batch


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
