"""MeLLo (Zhong et al. 2023, "MQuAKE: Assessing Knowledge Editing in Language Models via
Multi-Hop Questions", arXiv 2305.14795; reference princeton-nlp/MQuAKE `run_mello.ipynb`,
`prompts/MeLLo-prompt.txt`, MIT licence, shipped here as mello_prompt.txt).

The weights never change; every edited fact "{prompt(subject)} {o*}" enters the retrieval
memory. A multi-hop question is answered by iterative decomposition, at most `rounds` (4):

    prompt = MeLLo's 4-shot prompt + "\\n\\nQustion: " + question       (the reference's typo)
    repeat: the model continues greedily until "Retrieved fact:" (the reference's stop);
      the last line "Final answer: X" ends the loop with X;
      else the line before it must be "Subquestion: S"; the memory's nearest fact to S is
      appended as "Retrieved fact: {fact}." and the model writes whether it contradicts its
      own generated answer, and the intermediate answer, in the next round.

Instruction-tuned models: where the tokenizer has a chat template (`chat=auto`), the
4-shot prompt and question are the user turn and the loop continues the assistant turn.

Deviations: retrieval uses all-MiniLM-L6-v2 (kedit_core.memory, cosine) instead of
contriever-msmarco (not installable offline here); the loop is the reference's. Prompts that
are not questions (the single-fact metrics: rewrite, paraphrase, neighbourhood prompts) are
scored and completed with the nearest retrieved fact before them ("{fact}.\\n{prompt}"), the
simplest retrieval-augmented reading of MeLLo for completion prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from kedit_core.edited import PromptRewriting
from kedit_core.methods.base import MethodConfig, MethodInfo, Stateless, hp, register
from kedit_core.types import EditResult, MemoryEntry

PROMPT = (Path(__file__).with_name("mello_prompt.txt")).read_text()
STOP = "Retrieved fact:"


@dataclass(frozen=True, kw_only=True)
class MeLLoConfig(MethodConfig):
    rounds: int = hp(4, "decomposition rounds at most (reference: 4)")
    max_new_tokens: int = hp(256, "tokens per round at most (reference: 256)")
    chat: str = hp("auto", "use the tokenizer's chat template: auto (when it has one), yes or no")
    batch_size: int = hp(16, "questions decomposed in lockstep per batched generation (1: the reference's "
                             "one-at-a-time loop; same transcripts up to batched-arithmetic rounding)")


class MeLLoView(PromptRewriting):
    def __init__(self, base, memory, cfg: MeLLoConfig):
        self.memory, self.cfg = memory, cfg

        def with_fact(prompts: list[str]) -> list[str]:
            idx, _ = memory.search(prompts, k=1)
            return [f"{memory.entries[i].text}.\n{p}" for p, i in zip(prompts, idx[:, 0].tolist())]

        super().__init__(base, with_fact)
        tok = base.lm.tokenizer
        self.use_chat = (cfg.chat == "yes") or (cfg.chat == "auto" and bool(getattr(tok, "chat_template", None)))
        self.traces: list[str] = []

    def _frame(self, question: str) -> tuple[str, str]:
        """(the text sent before the model's own continuation, the reference-format prefix)."""
        user = PROMPT + "\n\nQustion: " + question
        if not self.use_chat:
            return user, user
        tok = self.lm.tokenizer
        head = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                       add_generation_prompt=True)
        return head, ""

    def answer(self, questions: list[str]) -> list[str | None]:
        """The reference loop for every question, run in lockstep over `batch_size` questions
        at a time (each round one batched greedy generation of the questions still open);
        a question's transcript and answer are those of the one-at-a-time loop."""
        from kedit_core.generation import greedy_until

        answers: list[str | None] = []
        for lo in range(0, len(questions), self.cfg.batch_size):
            qs = questions[lo:lo + self.cfg.batch_size]
            heads = [self._frame(q)[0] for q in qs]
            so_far = [""] * len(qs)
            final: list[str | None] = [None] * len(qs)
            open_ = list(range(len(qs)))
            for _ in range(self.cfg.rounds):
                if not open_:
                    break
                gens = greedy_until(self.lm, [heads[i] + so_far[i] for i in open_],
                                    [STOP, "\n\nQuestion:", "\n\nQustion:"], self.cfg.max_new_tokens)
                subs, still = [], []
                for i, gen in zip(open_, gens):
                    lines = gen.strip().split("\n")
                    if lines and lines[-1].startswith("Final answer: "):
                        final[i] = lines[-1][len("Final answer: "):].strip()
                        so_far[i] += gen
                    elif len(lines) < 2 or not lines[-2].startswith("Subquestion: "):
                        so_far[i] += gen                        # the reference's "failed case"
                    else:
                        subs.append(lines[-2][len("Subquestion: "):])
                        still.append((i, gen))
                if still:
                    idx, _ = self.memory.search(subs, k=1)
                    for (i, gen), j in zip(still, idx[:, 0].tolist()):
                        so_far[i] += gen + "Retrieved fact: " + self.memory.entries[int(j)].text + "."
                open_ = [i for i, _ in still]
            self.traces.extend(f"Qustion: {q}" + t for q, t in zip(qs, so_far))
            answers.extend(final)
        return answers


@register
class MeLLo(Stateless):
    name: ClassVar[str] = "mello"
    config_cls: ClassVar = MeLLoConfig
    info: ClassVar = MethodInfo("memory", "Zhong et al. 2023, arXiv 2305.14795", ("encoder",),
                                summary="multi-hop questions by decomposition + retrieval of edited facts")

    def compute(self, lm, requests, state, backend=None, memory=None):
        entries = tuple(MemoryEntry(key=f"{r.text} {r.target_new}", text=f"{r.text} {r.target_new}",
                                    case_id=r.case_id) for r in requests)
        return EditResult(memory=entries), state

    def wrap(self, base, state, memory):
        if memory is None or not len(memory):
            return base
        return MeLLoView(base, memory, state["cfg"])
