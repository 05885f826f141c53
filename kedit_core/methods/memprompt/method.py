"""MemPrompt (Madaan et al. 2022, "Memory-assisted prompt editing to improve GPT-3 after
deployment", arXiv 2201.06009; reference madaan/memprompt), adapted to edit requests.

The reference keeps a memory of (question -> user feedback / clarification). A new question
retrieves the closest stored question (Levenshtein distance < 6, or a trained SBERT at cosine
> 0.9); when one is close enough its feedback joins the prompt ("question | clarification"
after the few-shot examples, separated by SEP = "\\n\\n###\\n\\n"); in the streaming setting
feedback is stored, with probability p, only after the model answered wrongly.

Adapted here (the weights never change):
* question = the edit's prompt ("The Eiffel Tower is located in"); feedback = the new fact as
  a sentence ("The Eiffel Tower is located in Rome");
* retrieval uses kedit's memory (all-MiniLM-L6-v2 cosine, kedit_core.memory) with the
  reference's SBERT threshold `threshold` = 0.9 (an untrained encoder: paraphrases often
  fall below it - lower it to trade locality for generalisation);
* a query whose closest stored question clears the threshold is rewritten as
  "{feedback}{SEP}{query}": the clarification comes BEFORE the query, because kedit's
  prompts are completions whose answer must follow the query directly (the reference
  appends it after a question that the model then answers); otherwise the query is asked
  unchanged;
* in a stream, for each request the current edited model (memory included) is asked the
  request's prompt greedily; feedback is stored only when the answer does not start with
  the target (kedit's generation test), with probability `p` (seeded per request, so a
  resumed stream stores the same). p = 1 by default (the reference sweeps it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from kedit_core.edited import ModelView, PromptRewriting
from kedit_core.methods.base import MethodConfig, MethodInfo, Stateless, hp, register
from kedit_core.types import EditResult, MemoryEntry

SEP = "\n\n###\n\n"


@dataclass(frozen=True, kw_only=True)
class MemPromptConfig(MethodConfig):
    threshold: float = hp(0.9, "cosine above which a stored question's feedback is used (reference SBERT: 0.9)")
    p: float = hp(1.0, "probability of storing feedback after a wrong answer")
    seed: int = hp(0, "seed of the storing decisions")
    only_if_wrong: bool = hp(True, "store feedback only when the model answers the prompt wrongly")


@register
class MemPrompt(Stateless):
    name: ClassVar[str] = "memprompt"
    config_cls: ClassVar = MemPromptConfig
    info: ClassVar = MethodInfo("memory", "Madaan et al. 2022, arXiv 2201.06009", ("encoder",),
                                summary="memory of feedback (the new fact) retrieved for similar prompts")

    def compute(self, lm, requests, state, backend=None, memory=None):
        cfg: MemPromptConfig = state["cfg"]
        view = self.wrap(ModelView(lm), state, memory)     # the current edited model
        if cfg.only_if_wrong:
            from kedit_core.evaluate import starts_with_target
            from kedit_core.zopt import target_ids

            n = max(len(target_ids(lm, r.target_new)) for r in requests) + 2
            answers = view.generate([r.text for r in requests], n)
            wrong = [not starts_with_target(a, r.target_new) for a, r in zip(answers, requests)]
        else:
            wrong = [True] * len(requests)
        entries = []
        for r, w in zip(requests, wrong):
            if w and random.Random(f"{cfg.seed}:{r.case_id}").random() < cfg.p:
                entries.append(MemoryEntry(key=r.text, text=f"{r.text} {r.target_new}", case_id=r.case_id,
                                           fields=(("feedback", f"{r.text} {r.target_new}"),)))
        return EditResult(memory=tuple(entries), info={"stored": len(entries), "wrong": sum(wrong)}), state

    def wrap(self, base, state, memory):
        if memory is None or not len(memory):
            return base
        cfg: MemPromptConfig = state["cfg"]

        def rewrite(prompts: list[str]) -> list[str]:
            idx, sims = memory.search(prompts, k=1)
            return [f"{memory.entries[i].get('feedback')}{SEP}{x}" if s >= cfg.threshold else x
                    for x, i, s in zip(prompts, idx[:, 0].tolist(), sims[:, 0].tolist())]

        return PromptRewriting(base, rewrite)
