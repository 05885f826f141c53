"""Edit metrics over any set of requests (so retention of ALL past edits can be measured).

CounterFact (Meng et al. 2202.05262, section 3 and appendix; the reference compares the
mean per-token NLL of the two targets):
  efficacy_score     mean[P(new) > P(true)] on the rewrite prompt
  efficacy_magnitude mean[P(new) - P(true)] (probabilities of the whole target)
  paraphrase_score   the same comparison on paraphrase prompts
  neighborhood_score mean[P(answer) > P(new)] on neighbourhood prompts (answer: the
                     neighbour's own true object; CounterFact's equals target_true)
  score              harmonic mean of the three scores
zsRE (MEND / MEMIT): token accuracy of target_new on the question and its rephrase;
  locality = share of neighbourhood answer tokens whose greedy prediction is unchanged
  from the unedited model (needs a baseline from `baseline_predictions`).
Portability: token accuracy of the portability answers.
Fluency: n-gram entropy of greedy generations (ROME's weighted 2-/3-gram entropy).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from kedit_core.evaluate.scoring import score
from kedit_core.models.loader import LoadedModel
from kedit_core.types import EditRequest


def _hmean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs or min(xs) <= 0:
        return 0.0
    return len(xs) / sum(1 / x for x in xs)


def baseline_predictions(lm: LoadedModel, requests: Sequence[EditRequest]) -> dict:
    """Greedy predictions of the unedited model on the neighbourhood answers (zsRE-style
    locality compares against these)."""
    nb = [(r.case_id, n) for r in requests for n in r.neighborhood]
    s = score(lm, [n.prompt for _, n in nb], [n.answer for _, n in nb])
    return {(cid, n.prompt, n.answer): am for (cid, n), am in zip(nb, s.argmax)}


def evaluate_requests(lm: LoadedModel, requests: Sequence[EditRequest], *, baseline: dict | None = None,
                      fluency: bool = False) -> dict[str, float]:
    """All metrics the requests' material allows, as one flat dict."""
    # One scoring pass over every (prompt, answer) pair needed.
    pairs: list[tuple[str, str]] = []
    def add(p: str, a: str) -> int:
        pairs.append((p, a))
        return len(pairs) - 1

    plan = []
    for r in requests:
        e = {"rw": (add(r.text, r.target_new), add(r.text, r.target_true) if r.target_true else None),
             "para": [(add(p, r.target_new), add(p, r.target_true) if r.target_true else None)
                      for p in r.paraphrase_prompts],
             "nb": [(add(n.prompt, n.answer), add(n.prompt, r.target_new), n) for n in r.neighborhood],
             "port": [add(x.prompt, x.answer) for x in r.portability]}
        plan.append(e)
    s = score(lm, [p for p, _ in pairs], [a for _, a in pairs])
    nll, acc, am = s.mean_nll, s.token_acc, s.argmax

    es, em, ps, ns, rw_acc, para_acc, port_acc, loc = [], [], [], [], [], [], [], []
    for r, e in zip(requests, plan):
        new, true = e["rw"]
        rw_acc.append(acc[new])
        if true is not None:
            es.append(float(nll[new] < nll[true]))
            em.append(math.exp(s.logprob[new]) - math.exp(s.logprob[true]))
        if e["para"]:
            para_acc.append(np.mean([acc[n] for n, _ in e["para"]]))
            if true is not None:
                ps.append(np.mean([float(nll[n] < nll[t]) for n, t in e["para"]]))
        if e["nb"]:
            ns.append(np.mean([float(nll[a] < nll[n]) for a, n, _ in e["nb"]]))
            if baseline is not None:
                same = [np.mean([float(x == y) for x, y in zip(am[a], baseline[(r.case_id, nbp.prompt, nbp.answer)])])
                        for a, _, nbp in e["nb"] if (r.case_id, nbp.prompt, nbp.answer) in baseline]
                if same:
                    loc.append(np.mean(same))
        if e["port"]:
            port_acc.append(np.mean([acc[i] for i in e["port"]]))

    out: dict[str, float] = {"n_requests": float(len(requests))}
    def put(name, xs):
        if xs:
            out[name] = float(np.mean(xs))
    put("efficacy_score", es)
    put("efficacy_magnitude", em)
    put("paraphrase_score", ps)
    put("neighborhood_score", ns)
    if es:
        out["score"] = _hmean([out.get("efficacy_score"), out.get("paraphrase_score"),
                               out.get("neighborhood_score")])
    put("rewrite_acc", rw_acc)
    put("paraphrase_acc", para_acc)
    put("locality", loc)
    put("portability_acc", port_acc)
    if fluency:
        gens = [p for r in requests for p in r.generation_prompts]
        if gens:
            out["fluency"] = generation_entropy(lm, gens)
    return out


def ngram_entropy(text: str, ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """ROME's fluency measure: weighted entropy of n-gram distributions of a generation."""
    words = text.split()
    ents = []
    for n in ns:
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        if not total:
            ents.append(0.0)
            continue
        p = np.array(list(grams.values())) / total
        ents.append(float(-(p * np.log2(p)).sum()))
    return float(np.average(ents, weights=weights))


def generation_entropy(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int = 50) -> float:
    from kedit_core.generation import greedy

    texts = []
    for i in range(0, len(prompts), 32):
        texts += greedy(lm, prompts[i:i + 32], max_new_tokens)
    return float(np.mean([ngram_entropy(p + t) for p, t in zip(prompts, texts)]))
