"""The value types shared by every part of kedit. All are frozen: a request, once read and
validated, cannot change under a running edit stream."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LabeledPrompt:
    """A prompt with the answer it should be completed with (and accepted aliases)."""

    prompt: str
    answer: str
    aliases: tuple[str, ...] = ()

    def answers(self) -> tuple[str, ...]:
        return (self.answer, *self.aliases)


@dataclass(frozen=True, kw_only=True)
class EditRequest:
    """One fact to write into the model: `prompt.format(subject)` should be completed by
    `target_new` (it was `target_true`, if known).

    The evaluation material travels with the request so that any metric can be computed
    over any set of past requests (retention over a whole stream, not only the last batch).
    """

    case_id: str
    subject: str
    prompt: str                      # template with exactly one "{}" for the subject
    target_new: str
    target_true: str | None = None
    relation_id: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    # Prompts about OTHER subjects whose answer must not change (with that answer).
    neighborhood: tuple[LabeledPrompt, ...] = ()
    # CounterFact attribute prompts: other subjects that truly have target_new.
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    # Questions whose answer follows from the edit (one-hop, multi-hop, aliasing...).
    portability: tuple[LabeledPrompt, ...] = ()
    # Long-form target (EditEverything / UnKE / AnyEdit); target_new is then its text too.
    long_target: str | None = None
    # A benchmark's own grouping of its records (EditEverything: math, code, news, ...).
    category: str | None = None
    # Further named probe sets a benchmark defines (EVOKE prefix distraction, relation
    # specificity, ...): (name, prompts with their expected answers).
    probes: tuple[tuple[str, tuple[LabeledPrompt, ...]], ...] = ()
    source: str = ""                 # "file#index", for error messages and provenance

    @property
    def text(self) -> str:
        """The rewrite prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    def with_(self, **changes) -> "EditRequest":
        return replace(self, **changes)


@dataclass(frozen=True, kw_only=True)
class EditCase:
    """A benchmark case: one or more requests applied together, plus questions that only
    the combination answers (MQuAKE multi-hop). For single-fact formats, one request and
    no multi-hop questions."""

    case_id: str
    requests: tuple[EditRequest, ...]
    multi_hop_questions: tuple[str, ...] = ()
    answer: LabeledPrompt | None = None       # before the edits (prompt = first question)
    new_answer: LabeledPrompt | None = None   # after the edits
    single_hops: tuple[LabeledPrompt, ...] = ()
    new_single_hops: tuple[LabeledPrompt, ...] = ()


@dataclass(frozen=True)
class EditDataset:
    """What a reader returns: the format it recognised, the cases, and problems found."""

    path: str
    format: str
    cases: tuple[EditCase, ...]
    records: int
    problems: tuple[str, ...] = field(default=())
    warnings: tuple[str, ...] = field(default=())   # accepted but suspect (duplicate case ids)

    @property
    def requests(self) -> list[EditRequest]:
        return [r for c in self.cases for r in c.requests]


@dataclass(frozen=True)
class StatKey:
    """Which second moment a method needs: E[k k^T] of the INPUT of a site (the MLP output
    projection, so k has the MLP width)."""

    site: str                        # e.g. "blocks.5.mlp.out"

    @property
    def layer(self) -> int:
        return int(self.site.split(".")[1])


@dataclass(frozen=True)
class WeightDelta:
    """A change to one projection weight, in (out, in) orientation: delta = left @ right.T
    when factored (left (out, r), right (in, r)), else `dense` (out, in)."""

    site: str
    left: "torch.Tensor | None" = None
    right: "torch.Tensor | None" = None
    dense: "torch.Tensor | None" = None

    def matrix(self) -> "torch.Tensor":
        if self.dense is not None:
            return self.dense
        return self.left @ self.right.T

    @property
    def shape(self) -> tuple[int, int]:
        if self.dense is not None:
            return tuple(self.dense.shape)
        return (self.left.shape[0], self.right.shape[0])


@dataclass(frozen=True)
class MemoryEntry:
    """One edit as a memory method stores it: `key` is the text retrieval matches a query
    against (the edit's prompt or question), `text` the fact as a sentence, `fields` any
    further strings a method needs (subject, target_new, feedback...)."""

    key: str
    text: str
    case_id: str = ""
    fields: tuple[tuple[str, str], ...] = ()

    def get(self, name: str, default: str = "") -> str:
        return dict(self.fields).get(name, default)

    def to_json(self) -> dict:
        return {"key": self.key, "text": self.text, "case_id": self.case_id, "fields": [list(f) for f in self.fields]}

    @classmethod
    def from_json(cls, d: dict) -> "MemoryEntry":
        return cls(d["key"], d["text"], d.get("case_id", ""), tuple((a, b) for a, b in d.get("fields", [])))


@dataclass(frozen=True)
class EditResult:
    """What a method computes for a batch of requests: weight deltas to apply, memory
    entries to add (memory methods), or both, and diagnostics. The caller applies both."""

    deltas: tuple[WeightDelta, ...] = ()
    info: dict = field(default_factory=dict)
    memory: tuple[MemoryEntry, ...] = ()
