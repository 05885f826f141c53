"""What an edit stream measures at each evaluation point, at a cost that does not grow with
the stream (evaluating every past edit at every point costs O(edits^2) over a stream).

Groups (each a set of requests; the metrics of kedit_core.evaluate.metrics over it):
  latest     the batch just applied (does the new edit take?)
  first      the stream's first batch (the oldest edits: how much of them survives)
  retention  a fixed-size sample of all edits so far, stratified over the stream (below)
  probe      a fixed set of facts the stream never edits (records of the dataset after the
             stream's, with a subject no edited request has): their rewrite prompt with the
             true object and their neighbourhood prompts, each scored against the record's
             counterfactual target (the `neighborhood_*` metrics), and `locality` against
             the unedited model's greedy tokens. When the stream edits the whole dataset
             the probe is the neighbourhood prompts of a fixed sample of the stream's
             requests instead (`source` says which).
  all        every edit so far (the stream's start, its end, and `kedit evaluate RUN_DIR`)

The retention sample at a point with `total` edits done: the stream is cut into `size`
intervals of equal width (edit i is in interval floor(i * size / total)) and from each the
edit with the lowest priority is taken; priorities are a fixed seeded draw per edit
(`priorities`), so the sample depends only on (seed, total, size): a resumed stream
recomputes exactly the same one, consecutive points share most of their sample, and every
part of the stream is represented in proportion to its length.

Evaluation runs in units: contiguous runs of requests of at most `unit_tokens` tokens to
score (`units`). A unit is evaluated the same way wherever it runs (the driver, or one of
the Ray workers holding the same weights), so sharded evaluation gives the numbers the
driver alone gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kedit_core.errors import BadInputError
from kedit_core.types import EditRequest, LabeledPrompt

# The keys a probe reports (its requests carry no edit to score).
PROBE_KEYS = ("n_requests", "neighborhood_score", "neighborhood_magnitude", "neighborhood_acc", "locality")
_BLOCK = 4096


def priorities(seed: int, n: int) -> np.ndarray:
    """The fixed priority of each of the first n edits of a stream: uniform draws in blocks
    of 4096 per (seed, block), so edit i's priority does not depend on the stream's length."""
    out = np.empty(n)
    for b in range(0, n, _BLOCK):
        block = np.random.default_rng([int(seed), b // _BLOCK]).random(_BLOCK)
        out[b:b + _BLOCK] = block[:min(_BLOCK, n - b)]
    return out


def retention_sample(total: int, size: int, seed: int) -> list[int]:
    """Stream indices of the retention sample after `total` edits: all of them when there are
    at most `size`, else one per equal-width interval of the stream (the lowest priority in
    it), sorted."""
    if size <= 0 or total <= 0:
        return []
    if total <= size:
        return list(range(total))
    pr = priorities(seed, total)
    stratum = (np.arange(total) * size) // total          # 0..size-1, each non-empty
    out = []
    bounds = np.searchsorted(stratum, np.arange(size + 1))
    for k in range(size):
        lo, hi = bounds[k], bounds[k + 1]
        out.append(int(lo + np.argmin(pr[lo:hi])))
    return out


@dataclass(frozen=True)
class Probe:
    indices: tuple[int, ...]     # into the dataset's request list
    case_ids: tuple[str, ...]
    source: str                  # "unedited records" or "stream neighbourhoods"

    def to_dict(self) -> dict:
        return {"indices": list(self.indices), "case_ids": list(self.case_ids), "source": self.source}


def choose_probe(dataset: Sequence[EditRequest], n_stream: int, size: int, seed: int) -> Probe:
    """`size` requests of `dataset` (whose first `n_stream` the stream edits) to probe facts
    the stream leaves alone: records after the stream's whose subject no edited request has
    and that have a true object or neighbourhood prompts; when there are none, requests of
    the stream with neighbourhood prompts (only those prompts are then probed). A seeded
    draw, sorted."""
    if size <= 0:
        return Probe((), (), "none")
    edited = {r.subject for r in dataset[:n_stream]}
    cand = [i for i in range(n_stream, len(dataset))
            if dataset[i].subject not in edited and (dataset[i].target_true or dataset[i].neighborhood)]
    source = "unedited records"
    if not cand:
        cand = [i for i in range(min(n_stream, len(dataset))) if dataset[i].neighborhood]
        source = "stream neighbourhoods"
    if not cand:
        return Probe((), (), "none")
    rng = np.random.default_rng([int(seed), 7919])
    pick = sorted(int(i) for i in rng.choice(cand, size=min(size, len(cand)), replace=False))
    return Probe(tuple(pick), tuple(dataset[i].case_id for i in pick), source)


def probe_from_dict(d: dict, dataset: Sequence[EditRequest], where: str) -> Probe:
    """The probe recorded in a run (run.json `eval_plan.probe`), checked against the dataset."""
    try:
        idx, ids, source = [int(i) for i in d["indices"]], [str(c) for c in d["case_ids"]], str(d["source"])
    except (KeyError, TypeError, ValueError) as e:
        raise BadInputError("malformed probe record", file=where, field="eval_plan.probe") from e
    for i, c in zip(idx, ids):
        if not 0 <= i < len(dataset) or dataset[i].case_id != c:
            raise BadInputError(f"probe request {i} ({c!r}) is not in the dataset", file=where,
                                field="eval_plan.probe")
    if len(idx) != len(ids):
        raise BadInputError("probe indices and case ids differ in number", file=where, field="eval_plan.probe")
    return Probe(tuple(idx), tuple(ids), source)


def probe_requests(probe: Probe, dataset: Sequence[EditRequest]) -> list[EditRequest]:
    """Requests whose `neighborhood_*` metrics are the probe's: the true fact (rewrite prompt
    -> target_true, for unedited records) and the neighbourhood prompts, each against the
    record's counterfactual target; no paraphrases, portability or generation."""
    out = []
    for i in probe.indices:
        r = dataset[i]
        own = (LabeledPrompt(r.text, r.target_true),) if r.target_true and probe.source == "unedited records" else ()
        out.append(r.with_(case_id=f"probe:{r.case_id}", paraphrase_prompts=(), portability=(),
                           neighborhood=own + tuple(r.neighborhood)))
    return out


def request_tokens(tokenizer, requests: Sequence[EditRequest]) -> list[int]:
    """Tokens each request's evaluation scores (prompts and answers of its pairs), a cost
    estimate for `units`."""
    texts, owner = [], []
    for i, r in enumerate(requests):
        answers = [r.target_new] + ([r.target_true] if r.target_true else [])
        for p in (r.text, *r.paraphrase_prompts):
            for a in answers:
                texts.append(p + " " + a)
                owner.append(i)
        for n in r.neighborhood:
            texts += [n.prompt + " " + n.answer, n.prompt + " " + r.target_new]
            owner += [i, i]
        for x in r.portability:
            texts.append(x.prompt + " " + x.answer)
            owner.append(i)
    cost = [0] * len(requests)
    if texts:
        for i, ids in zip(owner, tokenizer(texts, add_special_tokens=True)["input_ids"]):
            cost[i] += len(ids)
    return cost


def units(costs: Sequence[int], unit_tokens: int) -> list[list[int]]:
    """Contiguous runs of positions whose costs add up to at most `unit_tokens` (a position
    that costs more goes alone)."""
    out: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i, c in enumerate(costs):
        if cur and used + c > unit_tokens:
            out.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += c
    if cur:
        out.append(cur)
    return out

