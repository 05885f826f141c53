"""IKE, in-context knowledge editing (Zheng et al. 2023, "Can We Edit Factual Knowledge by
In-Context Learning?", arXiv 2305.12740; reference Zce1112zslx/IKE `icl.py`,
`encode_facts.py`, `semantic_search.py`).

The weights never change. For a query x about an edited fact f = "{prompt} {o*}" the model
reads 32 demonstrations and then the fact:

    New Fact: {f_d} {o*_d}\\nPrompt: {p_d} {a_d}\\n\\n        x 32, the nearest last
    New Fact: {f} {o*}\\nPrompt: {f} {o*}\\n\\n                the test fact as a copy demo
    New Fact: {f} {o*}\\nPrompt: {x}                         the query

Demonstrations come from a pool of CounterFact records that are not being edited (default:
`../shared/data/counterfact/counterfact-train.json` when present; `--set demo_pool=FILE`
for any CounterFact file, ROME or flat format). Their kinds follow the reference's fixed
list of 32 (4 copy: p = f_d, a = o*_d; 12 update: p = a paraphrase, a = o*_d; 16 retain:
p = a neighbourhood prompt, a = the neighbour's true object), shuffled per fact with a
seeded RNG; the list is reversed so the nearest demonstration comes last. The nearest
records are found as in `encode_facts.py` / `semantic_search.py`: all-MiniLM-L6-v2
embeddings of "New Fact: {f}\\nPrompt: {f}" for the pool against "New Fact: {f}\\nPrompt:
{prompt}" for the fact, by cosine. Success is measured as everywhere in kedit (mean-NLL
comparisons, which order the reference's perplexities the same way).

Sequential editing (the reference has none: every test case is evaluated alone): every
edited fact enters the retrieval memory (kedit_core.memory) keyed by its prompt; a query
retrieves its nearest fact (top 1) and is rewritten around it as above. The context stays
33 demonstrations long however many facts are edited; a query costs one embedding and one
memory search (exact: O(n) dot products over n edits; faiss-hnsw: sub-linear), so a stream
of n edits scales with n only through the search. A query about no edited fact (a
neighbourhood prompt) still receives the nearest fact, as in the reference, where the
neighbour prompts are asked after the test fact. A prompt longer than the model's context
(less 32 tokens for the answer) drops its farthest demonstrations until it fits.

Deviations: the reference's precomputed index (`corpus_idx.txt`, in ../shared/data/ike)
lists hits over its 13-sentences-per-record embedding table while `icl.py` reads them as
record ids, and covers only the first 2,000 CounterFact cases; kedit recomputes the nearest
records for every fact instead. Paraphrase and neighbour prompts of a demonstration are
drawn with the per-fact RNG (the reference uses the global one).
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from kedit_core.edited import PromptRewriting
from kedit_core.errors import BadInputError
from kedit_core.methods.base import MethodConfig, MethodInfo, Stateless, hp, register
from kedit_core.types import EditResult, MemoryEntry

log = logging.getLogger(__name__)

DEFAULT_POOL = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "counterfact" / "counterfact-train.json"
# icl.py's `order`: 0 copy, 1 update (paraphrase), 2 retain (neighbour); 4 / 12 / 16 of 32.
REFERENCE_ORDER = (2, 1, 2, 0, 1, 2, 2, 0, 2, 2, 1, 0, 2, 1, 2, 0, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2)


@dataclass(frozen=True, kw_only=True)
class IKEConfig(MethodConfig):
    demo_pool: str = hp("", "CounterFact file of demonstration records (default: counterfact-train.json "
                            "of ../shared/data)")
    n_demos: int = hp(32, "demonstrations per fact (the reference's 32: 4 copy, 12 update, 16 retain)")
    fit_context: bool = hp(True, "drop the farthest demonstrations when a prompt exceeds the model's context")
    seed: int = hp(42, "seed of the per-fact demonstration shuffle")


@dataclass(frozen=True)
class Demo:
    case_id: str
    fact: str          # "{prompt} {o*}"
    target_new: str
    paraphrases: tuple[str, ...]
    neighbours: tuple[tuple[str, str], ...]


class DemoPool:
    """Demonstration records with their embeddings (computed once per pool file and encoder,
    cached under $KEDIT_CACHE/ike)."""

    def __init__(self, path: str, encoder):
        from kedit_core.data import read_dataset
        from kedit_core.models.loader import cache_dir

        p = Path(path)
        if not p.is_file():
            raise BadInputError("no such demonstration pool (a CounterFact file)", file=path, field="demo_pool")
        reqs = read_dataset(p).requests
        self.demos = [Demo(r.case_id, f"{r.text} {r.target_new}", r.target_new, tuple(r.paraphrase_prompts),
                           tuple((n.prompt, n.answer) for n in r.neighborhood)) for r in reqs]
        if not self.demos:
            raise BadInputError("the demonstration pool holds no records", file=path, field="demo_pool")
        digest = hashlib.sha256(p.read_bytes()).hexdigest()[:20]
        cache = cache_dir() / "ike" / f"pool-{digest}-{encoder.spec.replace('/', '_')}.safetensors"
        self.emb = _cached_embeddings(cache, lambda: encoder.encode(
            [f"New Fact: {d.fact}\nPrompt: {d.fact}" for d in self.demos]), len(self.demos))
        self.encoder = encoder

    def nearest(self, fact_prompt: str, fact: str, k: int, exclude: set[str]) -> list[Demo]:
        q = self.encoder.encode([f"New Fact: {fact}\nPrompt: {fact_prompt}"])[0]
        order = torch.sort(self.emb @ q, descending=True, stable=True).indices.tolist()
        out = []
        for i in order:
            d = self.demos[i]
            if d.case_id in exclude or d.fact == fact:
                continue
            out.append(d)
            if len(out) == k:
                break
        return out


def _cached_embeddings(path: Path, compute, n: int) -> torch.Tensor:
    from safetensors.torch import load_file, save_file

    if path.is_file():
        try:
            e = load_file(str(path))["emb"]
            if e.shape[0] == n:
                return e
        except Exception:  # noqa: BLE001 - a damaged cache is recomputed
            pass
        log.warning("recomputing a damaged demonstration-embedding cache %s", path)
    from kedit_core.io import atomic_file

    e = compute().contiguous()
    with atomic_file(path) as tmp:
        save_file({"emb": e}, str(tmp))
    return e


def ike_context(demos: list[Demo], rng: random.Random) -> str:
    """The demonstrations as icl.py's construct_icl_examples writes them."""
    return "".join(ike_parts(demos, rng))


def ike_parts(demos: list[Demo], rng: random.Random) -> list[str]:
    """The demonstrations one string each, farthest first (nearest last)."""
    order = list(REFERENCE_ORDER[:len(demos)])
    rng.shuffle(order)
    parts = []
    for d, o in zip(demos, order):
        if o == 1 and d.paraphrases:
            parts.append(f"New Fact: {d.fact}\nPrompt: {rng.choice(d.paraphrases)} {d.target_new}\n\n")
        elif o == 2 and d.neighbours:
            p, a = rng.choice(d.neighbours)
            parts.append(f"New Fact: {d.fact}\nPrompt: {p} {a}\n\n")
        else:   # copy (or a record lacking the material for its kind)
            parts.append(f"New Fact: {d.fact}\nPrompt: {d.fact}\n\n")
    parts.reverse()
    return parts


def context_length(lm) -> int | None:
    """The positions the model was built for (None when its config does not say)."""
    c = getattr(lm.model, "config", None)
    c = getattr(c, "text_config", None) or c
    n = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
    return int(n) if n else None


def fit_context(lm, parts: list[str], fact: str, query: str, reserve: int = 32) -> str:
    """The prompt with as many demonstrations as fit the model's context (less `reserve`
    tokens for the answer): the farthest are dropped first. Real models (SmolLM2: 8,192
    positions) fit all 32; small-context models would otherwise fail on positions."""
    limit = context_length(lm)
    prompt = ike_prompt("".join(parts), fact, query)
    if limit is None:
        return prompt
    start = 0
    while start < len(parts) and len(lm.tokenizer(prompt)["input_ids"]) > limit - reserve:
        start += 1
        prompt = ike_prompt("".join(parts[start:]), fact, query)
    return prompt


def ike_prompt(context: str, fact: str, query: str) -> str:
    """Demonstrations, the test fact as a copy demonstration, then the query."""
    return f"{context}New Fact: {fact}\nPrompt: {fact}\n\nNew Fact: {fact}\nPrompt: {query}"


@register
class IKE(Stateless):
    name: ClassVar[str] = "ike"
    config_cls: ClassVar = IKEConfig
    info: ClassVar = MethodInfo("memory", "Zheng et al. 2023, arXiv 2305.12740", ("encoder",),
                                summary="in-context editing: retrieved fact + 32 similar demonstrations")

    def prepare(self, lm, cfg: IKEConfig, stats) -> dict:
        pool = cfg.demo_pool or (str(DEFAULT_POOL) if DEFAULT_POOL.is_file() else "")
        if not pool:
            raise BadInputError("IKE needs a demonstration pool: --set demo_pool=FILE (a CounterFact file)",
                                field="demo_pool")
        return {"cfg": cfg, "pool_path": pool, "_pool": None}

    def compute(self, lm, requests, state, backend=None, memory=None):
        entries = tuple(MemoryEntry(key=r.text, text=f"{r.text} {r.target_new}", case_id=r.case_id,
                                    fields=(("prompt", r.text), ("target_new", r.target_new)))
                        for r in requests)
        return EditResult(memory=entries), state

    def wrap(self, base, state, memory):
        if memory is None or not len(memory):
            return base
        cfg: IKEConfig = state["cfg"]
        if state["_pool"] is None:
            state["_pool"] = DemoPool(state["pool_path"], memory.encoder)
        # Demonstrations depend only on the memory as it is now (never on what was edited
        # when they were first needed), so a resumed stream sees the same prompts.
        pool, contexts = state["_pool"], {}
        edited = {e.case_id for e in memory.entries}

        def rewrite(prompts: list[str]) -> list[str]:
            idx, _ = memory.search(prompts, k=1)
            out = []
            for x, i in zip(prompts, idx[:, 0].tolist()):
                e = memory.entries[i]
                if e.case_id not in contexts:
                    demos = pool.nearest(e.get("prompt"), e.text, cfg.n_demos, edited)
                    contexts[e.case_id] = ike_parts(demos, random.Random(f"{cfg.seed}:{e.case_id}"))
                out.append(fit_context(base.lm, contexts[e.case_id], e.text, x) if cfg.fit_context
                           else ike_prompt("".join(contexts[e.case_id]), e.text, x))
            return out

        return PromptRewriting(base, rewrite)
