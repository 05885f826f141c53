"""Shared-prefix evaluation: prompts that begin with the same long context run it once.

Memory methods put long contexts before every query: IKE 32 demonstrations (~2,000 tokens),
MeLLo a 4-shot decomposition prompt, MemPrompt feedback. Evaluating a CounterFact record asks
~13 prompts that retrieve the same fact, hence the same context; without sharing, every one
of them re-reads the context (IKE on 100 records: ~5 million tokens, hours on a CPU). Here
the sequences of one call are grouped by their common token prefix, each group's prefix is
run once (a KV cache), and the members' suffixes are run against copies of that cache.

Exactness: the suffix attends to the same keys and values at the same positions as in one
full forward pass; results agree with the unshared path to floating-point rounding
(tests/test_prefix.py checks scores and greedy continuations on every tiny architecture).

`plan` chooses the groups by cost (tokens run): a group is split where that is cheaper, so a
short prefix that many contexts happen to share does not hide the long ones.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from kedit_core.batching import pad_right

MIN_PREFIX = 48          # shorter common prefixes are not worth a cache
CACHE_TOKENS = 32768     # batch * (prefix + suffix) per forward against an expanded cache


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def plan(seqs: Sequence[Sequence[int]], caps: Sequence[int], min_prefix: int = MIN_PREFIX
         ) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """([(prefix_len, member indices)], the indices left to the ordinary path).

    caps[i]: the longest prefix sequence i may share (its first position whose output is
    needed: scored positions, or the last prompt token for generation)."""
    if not seqs:
        return [], []
    order = sorted(range(len(seqs)), key=lambda i: list(seqs[i]))
    adj = [_lcp(seqs[order[k]], seqs[order[k + 1]]) for k in range(len(order) - 1)]
    groups: list[tuple[int, list[int]]] = []
    single: list[int] = []

    def cost_of(lo: int, hi: int) -> tuple[int, list]:
        """(tokens run, the plan) for order[lo:hi], best of: together, or split at the
        weakest adjacent links."""
        members = order[lo:hi]
        if hi - lo == 1:
            return len(seqs[members[0]]), [(0, members)]
        p = min(min(adj[lo:hi - 1]), min(caps[i] for i in members))
        together = p + sum(len(seqs[i]) - p for i in members) if p >= min_prefix else sum(len(seqs[i]) for i in members)
        weakest = min(adj[lo:hi - 1])
        cuts = [k + 1 for k in range(lo, hi - 1) if adj[k] == weakest]
        if not cuts or weakest >= min(caps[i] for i in members):
            return together, [(p if p >= min_prefix else 0, members)]
        total, parts, start = 0, [], lo
        for c in [*cuts, hi]:
            t, pl = cost_of(start, c)
            total, parts, start = total + t, parts + pl, c
        if total < together:
            return total, parts
        return together, [(p if p >= min_prefix else 0, members)]

    import sys

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 4 * len(seqs) + 100))
    try:
        _, parts = cost_of(0, len(order))
    finally:
        sys.setrecursionlimit(old)
    for p, members in parts:
        if p and len(members) > 1:
            groups.append((p, members))
        else:
            single.extend(members)
    return groups, single


def prefill(lm, ids: Sequence[int]):
    """The KV cache of one prefix."""
    x = torch.tensor([list(ids)], device=lm.device)
    try:
        out = lm.model(input_ids=x, use_cache=True, logits_to_keep=1)
    except TypeError:
        out = lm.model(input_ids=x, use_cache=True)
    return out.past_key_values


def expand(cache, b: int):
    c = copy.deepcopy(cache)
    if b > 1:
        c.batch_repeat_interleave(b)
    return c


def forward_suffixes(lm, cache, p: int, suffixes: Sequence[Sequence[int]], pad: int, keep: list[int] | None = None):
    """Logits of right-padded suffixes after the cached prefix of length p; `keep`: suffix
    positions whose logits are needed (all when None). Returns (logits, {position: column})."""
    ids, mask = pad_right(suffixes, pad, lm.device)
    b, s = ids.shape
    full = torch.cat([torch.ones(b, p, dtype=mask.dtype, device=mask.device), mask], 1)
    pos = (p + torch.arange(s, device=ids.device)).unsqueeze(0).expand(b, s)
    kw = dict(input_ids=ids, attention_mask=full, position_ids=pos, past_key_values=expand(cache, b), use_cache=True,
              cache_position=torch.arange(p, p + s, device=ids.device))
    if keep is not None:
        try:
            out = lm.model(**kw, logits_to_keep=torch.tensor(keep, device=ids.device)).logits
            if out.shape[1] == len(keep):
                return out, {q: c for c, q in enumerate(keep)}
        except TypeError:
            pass
        kw["past_key_values"] = expand(cache, b)
    out = lm.model(**kw).logits
    return out, {q: q for q in range(s)}


def batches(lengths: Sequence[int], p: int, budget: int = CACHE_TOKENS) -> list[list[int]]:
    """Positions 0..n-1 split so that batch * (p + longest suffix) <= budget."""
    out, cur, longest = [], [], 0
    for k, n in enumerate(lengths):
        if cur and (len(cur) + 1) * (p + max(longest, n)) > budget:
            out.append(cur)
            cur, longest = [], 0
        cur.append(k)
        longest = max(longest, n)
    if cur:
        out.append(cur)
    return out


@torch.no_grad()
def greedy_shared(lm, prompt_ids: Sequence[Sequence[int]], p: int, max_new_tokens: int,
                  stops: Sequence[str] = ()) -> list[list[int]]:
    """Greedy continuations (token ids) of prompts sharing their first p tokens: the prefix
    runs once, suffixes of equal length are batched after it and decoded step by step with
    the KV cache. A row ends at EOS, or once its decoded text contains one of `stops`."""
    tok = lm.tokenizer
    eos = tok.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    cache = prefill(lm, prompt_ids[0][:p])
    results: list[list[int]] = [[] for _ in prompt_ids]
    sufs = [list(x[p:]) for x in prompt_ids]
    # rows of one batch have suffixes of one length: no padding between the prefix and a
    # suffix (a sliding-window layer counts cache slots, so padding there would shift it)
    by_len: dict[int, list[int]] = {}
    for k, x in enumerate(sufs):
        by_len.setdefault(len(x), []).append(k)
    plan_ = [[ks[j] for j in part] for n, ks in sorted(by_len.items())
             for part in batches([n + max_new_tokens] * len(ks), p)]
    for idx in plan_:
        rows = [sufs[k] for k in idx]
        b, s = len(rows), max(len(r) for r in rows)
        ids = torch.full((b, s), pad, dtype=torch.long)
        mask = torch.zeros((b, s), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, s - len(r):] = torch.tensor(r)
            mask[i, s - len(r):] = 1
        ids, mask = ids.to(lm.device), mask.to(lm.device)
        full = torch.cat([torch.ones(b, p, dtype=mask.dtype, device=mask.device), mask], 1)
        pos = (p + mask.cumsum(1) - 1).clamp(min=p)
        c = expand(cache, b)
        out = lm.model(input_ids=ids, attention_mask=full, position_ids=pos, past_key_values=c, use_cache=True,
                       cache_position=torch.arange(p, p + s, device=ids.device), logits_to_keep=1)
        c, logits = out.past_key_values, out.logits[:, -1]
        step = p + s
        done = torch.zeros(b, dtype=torch.bool)
        gen: list[list[int]] = [[] for _ in range(b)]
        last = pos[:, -1]
        for _ in range(max_new_tokens):
            nxt = logits.float().argmax(-1)
            for i in range(b):
                if not done[i]:
                    t = int(nxt[i])
                    if t in eos:
                        done[i] = True
                        continue
                    gen[i].append(t)
                    if stops and any(x in tok.decode(gen[i], skip_special_tokens=True) for x in stops):
                        done[i] = True
            if bool(done.all()):
                break
            nxt = torch.where(done.to(nxt.device), torch.full_like(nxt, pad), nxt)
            full = torch.cat([full, (~done).long().unsqueeze(1).to(full.device)], 1)
            last = last + 1
            out = lm.model(input_ids=nxt.unsqueeze(1), attention_mask=full, position_ids=last.unsqueeze(1),
                           past_key_values=c, use_cache=True,
                           cache_position=torch.tensor([step], device=full.device))
            step += 1
            c, logits = out.past_key_values, out.logits[:, -1]
        for i, k in enumerate(idx):
            results[k] = gen[i]
    return results
