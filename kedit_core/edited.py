"""The edited model as evaluation, generation and export see it, for every family of method.

    score(prompts, answers) -> Scores        teacher-forced log-probs / argmax of answers
    generate(prompts, max_new_tokens) -> [str]   greedy continuations

`ModelView` is the base model with whatever deltas are applied to its weights (the
weight-changing families). Memory methods wrap a view: `PromptRewriting` rewrites each
prompt before the base model sees it (IKE's demonstrations, MemPrompt's feedback);
a router (SERAC) or a decomposition loop (MeLLo) implement the same two calls. The metrics in
kedit_core.evaluate only ever call these two methods, so they run unchanged on every family.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from kedit_core.models.loader import LoadedModel


@runtime_checkable
class EditedModel(Protocol):
    lm: LoadedModel

    def score(self, prompts: Sequence[str], answers: Sequence[str]): ...

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 10) -> list[str]: ...


class ModelView:
    """The base model with its current weights (deltas applied in place)."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm

    def score(self, prompts: Sequence[str], answers: Sequence[str], **kw):
        from kedit_core.evaluate.scoring import score

        return score(self.lm, prompts, answers, **kw)

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 10) -> list[str]:
        from kedit_core.generation import greedy

        return greedy(self.lm, list(prompts), max_new_tokens)


class PromptRewriting:
    """A view whose prompts are rewritten before `base` sees them: `rewrite(prompts)` returns
    one new prompt per prompt (the answer positions are unchanged, so every metric keeps its
    definition)."""

    def __init__(self, base, rewrite: Callable[[list[str]], list[str]]):
        self.base, self.rewrite, self.lm = base, rewrite, base.lm

    def score(self, prompts: Sequence[str], answers: Sequence[str], **kw):
        return self.base.score(self.rewrite(list(prompts)), answers, **kw)

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 10) -> list[str]:
        return self.base.generate(self.rewrite(list(prompts)), max_new_tokens)


def as_view(model) -> EditedModel:
    """A LoadedModel becomes its ModelView; an EditedModel is returned as it is."""
    return ModelView(model) if isinstance(model, LoadedModel) else model
