"""Multi-hop evaluation of edits (MQuAKE, Zhong et al. 2023, arXiv 2305.14795), for every
method through the edited model's interface.

For each case (its requested rewrites edited, as a batch or within a stream), with
P the prompt "Q: {question} A:" (the format of the reference's multihop-prompts.txt, zero-shot):

  multihop_acc            a case counts when the answer to ANY of its (three) questions
                          matches `new_answer` or one of its aliases (reference
                          run_mello.ipynb: `ans == new_answer or ans in new_answer_alias`)
  multihop_acc_original   the same against the pre-edit `answer` and its aliases (an edit that
                          did not propagate)
  single_hop_acc          share of the cases' edited facts whose prompt the model completes
                          with the new object
  hop_acc                 share of the `new_single_hops` (each a cloze prompt of one hop of
                          the new chain) completed with the new answer or an alias
  hopwise_acc             share of cases whose every new single hop is answered correctly
                          (PokeMQA's hop-wise accuracy; its exact definition is [paper?] in
                          METHODS.md)

An answer matches when, lower-cased with spaces collapsed, it equals an accepted answer (a
MeLLo final answer) or a free continuation starts with one (kedit's generation test).
A model view that answers questions itself (MeLLo) provides `answer(questions)`; any other is
asked through `generate`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kedit_core.edited import as_view
from kedit_core.types import EditCase

QUESTION_FORMAT = "Q: {} A:"


def _norm(t: str) -> str:
    return " ".join(str(t).lower().split())


def answer_matches(answer: str | None, accepted: Sequence[str]) -> bool:
    if answer is None:
        return False
    a = _norm(answer)
    for x in accepted:
        x = _norm(x)
        if x and (a == x or a.startswith(x)):
            return True
    return False


def _ask(view, questions: list[str], max_new_tokens: int) -> list[str | None]:
    if hasattr(view, "answer"):
        return view.answer(questions)
    texts = view.generate([QUESTION_FORMAT.format(q) for q in questions], max_new_tokens)
    return [t.strip().split("\n")[0] for t in texts]


def evaluate_cases(model, cases: Sequence[EditCase], *, max_new_tokens: int = 16) -> dict[str, float]:
    view = as_view(model)
    multi = [c for c in cases if c.multi_hop_questions and c.new_answer is not None]
    out: dict[str, float] = {"n_cases": float(len(multi))}
    if not multi:
        return out
    qs = [q for c in multi for q in c.multi_hop_questions]
    ans = _ask(view, qs, max_new_tokens)
    k, hit_new, hit_old = 0, [], []
    for c in multi:
        a = ans[k:k + len(c.multi_hop_questions)]
        k += len(c.multi_hop_questions)
        hit_new.append(any(answer_matches(x, c.new_answer.answers()) for x in a))
        if c.answer is not None:
            hit_old.append(any(answer_matches(x, c.answer.answers()) for x in a))
    out["multihop_acc"] = float(np.mean(hit_new))
    if hit_old:
        out["multihop_acc_original"] = float(np.mean(hit_old))
    reqs = [r for c in multi for r in c.requests]
    if reqs:
        from kedit_core.evaluate.metrics import starts_with_target

        conts = view.generate([r.text for r in reqs], max_new_tokens)
        out["single_hop_acc"] = float(np.mean([starts_with_target(t, r.target_new) for t, r in zip(conts, reqs)]))
    hops = [(i, h) for i, c in enumerate(multi) for h in c.new_single_hops]
    if hops:
        # single hops are cloze prompts ("The head of state of Croatia is"): completed, not asked
        hans = [t.strip().split("\n")[0] for t in view.generate([h.prompt for _, h in hops], max_new_tokens)]
        ok = [answer_matches(a, h.answers()) for a, (_, h) in zip(hans, hops)]
        out["hop_acc"] = float(np.mean(ok))
        per_case: dict[int, list[bool]] = {}
        for (i, _), o in zip(hops, ok):
            per_case.setdefault(i, []).append(o)
        out["hopwise_acc"] = float(np.mean([all(v) for v in per_case.values()]))
    return out
