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


# The per-request values whose means evaluate_requests reports, in the order it reports them.
REQUEST_KEYS = ("efficacy_score", "efficacy_magnitude", "paraphrase_score", "paraphrase_magnitude",
                "neighborhood_score", "neighborhood_magnitude", "rewrite_acc", "rewrite_correct",
                "paraphrase_acc", "paraphrase_correct", "neighborhood_acc", "locality", "portability_acc",
                "rewrite_gen", "paraphrase_gen")


def evaluate_requests(model: LoadedModel | EditedModel, requests: Sequence[EditRequest], *,
                      baseline: dict | None = None, fluency: bool = False, generation: bool = True
                      ) -> dict[str, float]:
    """All metrics the requests' material allows, as one flat dict (names in the module
    docstring), through the edited model's `score` and `generate` only (any family of
    method). `generation=False` skips the greedy-generation metrics. Every metric is the
    mean over requests of a per-request value (`request_values`), so the metrics of a set
    evaluated in parts (sharded over workers) are `summarize` of the parts' values."""
    view = as_view(model)
    out = summarize(request_values(view, requests, baseline=baseline, generation=generation))
    if fluency:
        gens = [p for r in requests for p in r.generation_prompts]
        if gens:
            out["fluency"] = generation_entropy(view, gens)
    return out


def summarize(values: Sequence[dict[str, float]]) -> dict[str, float]:
    """The metrics of a set of requests from their per-request values: each the mean over the
    requests that have it, `score` the harmonic mean of ES, PS and NS."""
    out: dict[str, float] = {"n_requests": float(len(values))}
    for name in REQUEST_KEYS:
        xs = [v[name] for v in values if name in v]
        if xs:
            out[name] = float(np.mean(xs))
    if "efficacy_score" in out:
        score = _hmean([out.get("efficacy_score"), out.get("paraphrase_score"), out.get("neighborhood_score")])
        gen = {k: out.pop(k) for k in ("rewrite_gen", "paraphrase_gen") if k in out}
        out["score"] = score
        out.update(gen)       # the key order evaluate_requests always had
    return out


def request_values(model: LoadedModel | EditedModel, requests: Sequence[EditRequest], *,
                   baseline: dict | None = None, generation: bool = True) -> list[dict[str, float]]:
    """Per request, the values whose means are the metrics (a request lacks a key when its
    material does not allow it: no target_true, no paraphrases...). One scoring pass over
    every (prompt, answer) pair needed."""
    view = as_view(model)
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
    s = view.score([p for p, _ in pairs], [a for _, a in pairs]) if pairs else None
    nll, acc, am = (s.mean_nll, s.token_acc, s.argmax) if s is not None else ([], [], [])
    P = [math.exp(-x) for x in nll]        # per-token geometric-mean probabilities
    allok = [float(x == 1.0) for x in acc]  # every target token is the argmax

    out: list[dict[str, float]] = []
    for r, e in zip(requests, plan):
        v: dict[str, float] = {}
        new, true = e["rw"]
        v["rewrite_acc"] = acc[new]
        v["rewrite_correct"] = allok[new]
        if true is not None:
            v["efficacy_score"] = float(nll[new] < nll[true])
            v["efficacy_magnitude"] = P[new] - P[true]
        if e["para"]:
            v["paraphrase_acc"] = float(np.mean([acc[n] for n, _ in e["para"]]))
            v["paraphrase_correct"] = float(np.mean([allok[n] for n, _ in e["para"]]))
            if true is not None:
                v["paraphrase_score"] = float(np.mean([float(nll[n] < nll[t]) for n, t in e["para"]]))
                v["paraphrase_magnitude"] = float(np.mean([P[n] - P[t] for n, t in e["para"]]))
        if e["nb"]:
            v["neighborhood_score"] = float(np.mean([float(nll[a] < nll[n]) for a, n, _ in e["nb"]]))
            v["neighborhood_magnitude"] = float(np.mean([P[a] - P[n] for a, n, _ in e["nb"]]))
            v["neighborhood_acc"] = float(np.mean([acc[a] for a, _, _ in e["nb"]]))
            if baseline is not None:
                same = [np.mean([float(x == y) for x, y in zip(am[a], baseline[(r.case_id, nbp.prompt, nbp.answer)])])
                        for a, _, nbp in e["nb"] if (r.case_id, nbp.prompt, nbp.answer) in baseline]
                if same:
                    v["locality"] = float(np.mean(same))
        if e["port"]:
            v["portability_acc"] = float(np.mean([acc[i] for i in e["port"]]))
        out.append(v)
    if generation and requests:
        for v, g in zip(out, generation_values(view, requests)):
            v.update(g)
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
    vals = generation_values(model, requests, batch=batch)
    out = {"rewrite_gen": float(np.mean([v["rewrite_gen"] for v in vals]))}
    para = [v["paraphrase_gen"] for v in vals if "paraphrase_gen" in v]
    if para:
        out["paraphrase_gen"] = float(np.mean(para))
    return out


def generation_values(model: LoadedModel | EditedModel, requests: Sequence[EditRequest], *, batch: int = 64
                      ) -> list[dict[str, float]]:
    """Per request: rewrite_gen (0/1) and, when it has paraphrases, paraphrase_gen (the
    share of its paraphrases whose continuation starts with the target)."""
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
    out: list[dict[str, float]] = [{} for _ in requests]
    para: dict[int, list[float]] = {}
    for j, (i, kind, _, _) in enumerate(jobs):
        if kind == "rw":
            out[i]["rewrite_gen"] = float(ok[j])
        else:
            para.setdefault(i, []).append(float(ok[j]))
    for i, xs in para.items():
        out[i]["paraphrase_gen"] = float(np.mean(xs))
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
