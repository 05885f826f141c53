"""Edit metrics over any set of requests (so retention of ALL past edits can be measured).

Every metric carries the name its reference gives it; variants kedit adds have names of
their own. P(x) below is the per-token geometric-mean probability exp(-mean NLL of the
tokens of x), the unit of the reference's comparisons (kmeng01/rome
`experiments/py/eval_utils_counterfact.py` compares mean per-token NLLs).

CounterFact (Meng et al. 2202.05262, section 3 and appendix; reference `summarize.py`):
  efficacy_score          ES: mean[P(new) > P(true)] on the rewrite prompt
  efficacy_magnitude      EM: mean[P(new) - P(true)] on the rewrite prompt (the reference's
                          `rewrite_prompts_diff`: per-token geometric means, not the
                          probability of the whole target)
  paraphrase_score        PS: mean[P(new) > P(true)] on paraphrase prompts
  paraphrase_magnitude    PM: mean[P(new) - P(true)] on paraphrase prompts
  neighborhood_score      NS: mean[P(answer) > P(new)] on neighbourhood prompts (answer: the
                          neighbour's own true object; CounterFact's equals target_true)
  neighborhood_magnitude  NM: mean[P(answer) - P(new)] on neighbourhood prompts
  score                   S: harmonic mean of ES, PS, NS
Token accuracies (teacher-forced argmax at each target token), two conventions, two names:
  rewrite_acc, paraphrase_acc     share of target tokens that are the argmax, averaged per
                                  request (EasyEdit's `rewrite_acc` / `rephrase_acc`; MEMIT's
                                  zsRE `*_correct` lists averaged the same way)
  rewrite_correct, paraphrase_correct
                                  1 when ALL target tokens are the argmax (MEMIT's CounterFact
                                  `*_prompts_correct`), averaged
  neighborhood_acc                share of neighbourhood-answer tokens that are the argmax
                                  (zsRE specificity in the ROME/MEMIT convention: `loc_ans`
                                  after `loc + "?"`)
  locality                        share of neighbourhood-answer positions whose argmax is the
                                  unedited model's (EasyEdit / MEND zsRE locality; needs a
                                  baseline from `baseline_predictions`)
  portability_acc                 token accuracy of the portability answers (EasyEdit)
Generation (kedit's own, what a user reading completions sees):
  rewrite_gen, paraphrase_gen     1 when the greedy continuation of the prompt starts with the
                                  whole target, case- and whitespace-normalised ("Kualadarang"
                                  does not count for "Kuala Lumpur"), averaged
Fluency: n-gram entropy of greedy generations (ROME's weighted 2-/3-gram entropy).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from kedit_core.edited import EditedModel, as_view
from kedit_core.models.loader import LoadedModel
from kedit_core.types import EditRequest


def _hmean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs or min(xs) <= 0:
        return 0.0
    return len(xs) / sum(1 / x for x in xs)


def baseline_predictions(model: LoadedModel | EditedModel, requests: Sequence[EditRequest]) -> dict:
    """Greedy predictions of the unedited model on the neighbourhood answers (zsRE-style
    locality compares against these)."""
    nb = [(r.case_id, n) for r in requests for n in r.neighborhood]
    s = as_view(model).score([n.prompt for _, n in nb], [n.answer for _, n in nb])
    return {(cid, n.prompt, n.answer): am for (cid, n), am in zip(nb, s.argmax)}


def evaluate_requests(model: LoadedModel | EditedModel, requests: Sequence[EditRequest], *,
                      baseline: dict | None = None, fluency: bool = False, generation: bool = True
                      ) -> dict[str, float]:
    """All metrics the requests' material allows, as one flat dict (names in the module
    docstring), through the edited model's `score` and `generate` only (any family of
    method). `generation=False` skips the greedy-generation metrics."""
    view = as_view(model)
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
    s = view.score([p for p, _ in pairs], [a for _, a in pairs])
    nll, acc, am = s.mean_nll, s.token_acc, s.argmax
    P = [math.exp(-x) for x in nll]        # per-token geometric-mean probabilities
    allok = [float(x == 1.0) for x in acc]  # every target token is the argmax

    m: dict[str, list[float]] = {k: [] for k in (
        "efficacy_score", "efficacy_magnitude", "paraphrase_score", "paraphrase_magnitude",
        "neighborhood_score", "neighborhood_magnitude", "rewrite_acc", "rewrite_correct",
        "paraphrase_acc", "paraphrase_correct", "neighborhood_acc", "locality", "portability_acc")}
    for r, e in zip(requests, plan):
        new, true = e["rw"]
        m["rewrite_acc"].append(acc[new])
        m["rewrite_correct"].append(allok[new])
        if true is not None:
            m["efficacy_score"].append(float(nll[new] < nll[true]))
            m["efficacy_magnitude"].append(P[new] - P[true])
        if e["para"]:
            m["paraphrase_acc"].append(np.mean([acc[n] for n, _ in e["para"]]))
            m["paraphrase_correct"].append(np.mean([allok[n] for n, _ in e["para"]]))
            if true is not None:
                m["paraphrase_score"].append(np.mean([float(nll[n] < nll[t]) for n, t in e["para"]]))
                m["paraphrase_magnitude"].append(np.mean([P[n] - P[t] for n, t in e["para"]]))
        if e["nb"]:
            m["neighborhood_score"].append(np.mean([float(nll[a] < nll[n]) for a, n, _ in e["nb"]]))
            m["neighborhood_magnitude"].append(np.mean([P[a] - P[n] for a, n, _ in e["nb"]]))
            m["neighborhood_acc"].append(np.mean([acc[a] for a, _, _ in e["nb"]]))
            if baseline is not None:
                same = [np.mean([float(x == y) for x, y in zip(am[a], baseline[(r.case_id, nbp.prompt, nbp.answer)])])
                        for a, _, nbp in e["nb"] if (r.case_id, nbp.prompt, nbp.answer) in baseline]
                if same:
                    m["locality"].append(np.mean(same))
        if e["port"]:
            m["portability_acc"].append(np.mean([acc[i] for i in e["port"]]))

    out: dict[str, float] = {"n_requests": float(len(requests))}
    for name, xs in m.items():
        if xs:
            out[name] = float(np.mean(xs))
    if "efficacy_score" in out:
        out["score"] = _hmean([out.get("efficacy_score"), out.get("paraphrase_score"),
                               out.get("neighborhood_score")])
    if generation and requests:
        out.update(generation_metrics(view, requests))
    if fluency:
        gens = [p for r in requests for p in r.generation_prompts]
        if gens:
            out["fluency"] = generation_entropy(view, gens)
    return out


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def starts_with_target(continuation: str, target: str) -> bool:
    """The generation metric's test: the continuation starts with the whole target, both
    lower-cased and with runs of whitespace collapsed (leading space ignored)."""
    t = _norm(target)
    return bool(t) and _norm(continuation).startswith(t)


def generation_metrics(model: LoadedModel | EditedModel, requests: Sequence[EditRequest], *, batch: int = 64
                       ) -> dict[str, float]:
    """rewrite_gen / paraphrase_gen: greedy continuations of the rewrite prompt and of each
    paraphrase, each long enough for the target (its token count + 2)."""
    from kedit_core.zopt import target_ids

    view = as_view(model)
    lm = view.lm
    jobs: list[tuple[int, str, str, str]] = []   # (request, kind, prompt, target)
    for i, r in enumerate(requests):
        jobs.append((i, "rw", r.text, r.target_new))
        jobs += [(i, "para", p, r.target_new) for p in r.paraphrase_prompts]
    need = [len(target_ids(lm, t)) + 2 for _, _, _, t in jobs]
    order = sorted(range(len(jobs)), key=lambda j: need[j])   # similar lengths together
    ok = [False] * len(jobs)
    for s0 in range(0, len(order), batch):
        idx = order[s0:s0 + batch]
        texts = view.generate([jobs[j][2] for j in idx], max(need[j] for j in idx))
        for j, t in zip(idx, texts):
            ok[j] = starts_with_target(t, jobs[j][3])
    rw = [float(ok[j]) for j, job in enumerate(jobs) if job[1] == "rw"]
    para: dict[int, list[float]] = {}
    for j, job in enumerate(jobs):
        if job[1] == "para":
            para.setdefault(job[0], []).append(float(ok[j]))
    out = {"rewrite_gen": float(np.mean(rw))}
    if para:
        out["paraphrase_gen"] = float(np.mean([np.mean(v) for v in para.values()]))
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


def generation_entropy(model: LoadedModel | EditedModel, prompts: Sequence[str], max_new_tokens: int = 50) -> float:
    view = as_view(model)
    texts = []
    for i in range(0, len(prompts), 32):
        texts += view.generate(prompts[i:i + 32], max_new_tokens)
    return float(np.mean([ngram_entropy(p + t) for p, t in zip(prompts, texts)]))
