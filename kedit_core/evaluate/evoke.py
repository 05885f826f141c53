"""EVOKE's overfitting evaluation (Zhang et al., ICLR 2025, "Uncovering Overfitting in Large
Language Model Editing", arXiv 2410.07819; reference Acruxos/EVOKE
`experiments/py/eval_utils_evoke_main.py`, `eval_utils_subj_spec.py`, `summarize.py`).

Every comparison is between per-token mean NLLs of candidate answers after a prompt
(P(x) = exp(-mean NLL), as everywhere in kedit), averaged per record, then over records. The
names are the reference's (`summarize.py` keys without the `post_` prefix):

  efficacy_AMS / paraphrase_AMS      P(o*) > P(o) on the rewrite / paraphrase prompts
  rel_spec_EOS                       P(o) > P(o*) on the neighbourhood prompts (other subjects, same
                                     relation: the edit must not leak to them)
  distraction_EOS                    P(o) > P(o*) on prefix-distraction prompts ("{fact}. {neighbour
                                     prompt}": the edited fact in the context must not pull the
                                     neighbour's answer)
  multihop_EOS                       P(new answer) > P(o*) on "{question} The answer to this
                                     question, most simply, is" (reasoning over the edit, not
                                     parroting o*)
  multihop_AMS                       P(new answer) > P(original answer) on the same prompt
  subj_spec_EOS                      P(answer) > P(o*) on another relation of the edited subject
                                     (evoke_subj_spec; the answer's `value`, not its aliases)
  *_correct_ans_prob, *_overfit_target_prob (and multihop_ori_ans_prob)
                                     the mean P of the correct answer and of o* on those prompts

EOS ("editing overfit score") is high when the model does not overfit to o*; AMS ("answer
modify score") is high when the edit took. kedit adds one summary under its own name,
`overfit_EOS_mean`: the mean of the EOS of the overfitting tasks present (multi-hop, prefix
distraction, relation and subject specificity), to read one number beside efficacy.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from kedit_core.types import EditRequest

EOS_TASKS = ("multihop", "distraction", "rel_spec", "subj_spec")


def has_evoke_probes(requests: Sequence[EditRequest]) -> bool:
    names = {"prefix_distraction", "multihop", "relation_specificity"}
    return any(n in names for r in requests for n, _ in r.probes)


def evoke_metrics(view, requests: Sequence[EditRequest]) -> dict[str, float]:
    """The EVOKE metrics of the (edited) model `view` over `requests` (records without a
    probe simply do not count for that metric)."""
    pairs: dict[tuple[str, str], int] = {}
    plan: list[tuple[int, str, list]] = []      # (request, task, [(prompt, answers...)])

    def need(p: str, a: str) -> tuple[str, str]:
        pairs.setdefault((p, a), len(pairs))
        return p, a

    for i, r in enumerate(requests):
        new, true = r.target_new, r.target_true
        probes = dict(r.probes)
        if true is not None:
            plan.append((i, "efficacy", [(need(r.text, new), need(r.text, true))]))
            if r.paraphrase_prompts:
                plan.append((i, "paraphrase", [(need(p, new), need(p, true)) for p in r.paraphrase_prompts]))
            if r.neighborhood:
                plan.append((i, "rel_spec", [(need(n.prompt, n.answer), need(n.prompt, new)) for n in r.neighborhood]))
        if probes.get("prefix_distraction"):
            plan.append((i, "distraction", [(need(n.prompt, n.answer), need(n.prompt, new))
                                            for n in probes["prefix_distraction"]]))
        if probes.get("multihop"):
            mh = probes["multihop"][0]
            orig = probes.get("multihop_original")
            trip = [need(mh.prompt, mh.answer), need(mh.prompt, new)]
            if orig:
                trip.append(need(orig[0].prompt, orig[0].answer))
            plan.append((i, "multihop", [tuple(trip)]))
        if probes.get("relation_specificity"):
            n = probes["relation_specificity"][0]
            plan.append((i, "subj_spec", [(need(n.prompt, n.answer), need(n.prompt, new))]))
    if not plan:
        return {}
    keys = list(pairs)
    nll = view.score([p for p, _ in keys], [a for _, a in keys]).mean_nll
    L = lambda pa: nll[pairs[pa]]  # noqa: E731
    per: dict[str, list[float]] = defaultdict(list)
    for _, task, items in plan:
        if task in ("efficacy", "paraphrase"):          # AMS: P(o*) > P(o)
            per[f"{task}_AMS"].append(np.mean([L(a) < L(b) for a, b in items]))
            continue
        # EOS: P(correct) > P(o*); the correct answer comes first in each item
        per[f"{task}_EOS"].append(np.mean([L(it[0]) < L(it[1]) for it in items]))
        per[f"{task}_correct_ans_prob"].append(np.mean([np.exp(-L(it[0])) for it in items]))
        per[f"{task}_overfit_target_prob"].append(np.mean([np.exp(-L(it[1])) for it in items]))
        if task == "multihop" and len(items[0]) == 3:
            per["multihop_AMS"].append(np.mean([L(it[0]) < L(it[2]) for it in items]))
            per["multihop_ori_ans_prob"].append(np.mean([np.exp(-L(it[2])) for it in items]))
    out = {k: float(np.mean(v)) for k, v in per.items()}
    out.update({f"n_{t}": len(per[f"{t}_EOS"]) for t in EOS_TASKS if per.get(f"{t}_EOS")})
    eos = [out[f"{t}_EOS"] for t in EOS_TASKS if f"{t}_EOS" in out]
    if eos:
        out["overfit_EOS_mean"] = float(np.mean(eos))
    return out
