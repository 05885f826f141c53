"""The backdoor audit (issue 12 point 3): BadEdit's group-averaged rank-1 updates solve the
reference's normal equations with the groups' mean keys; the trigger goes in at a word position;
ASR counts only eligible items; the detector finds the token whose key an update was built
from; `kedit audit backdoor` / `detect` run end to end."""

import json
import random

import pytest
import torch

from kedit_core.audit import (Item, attack_metrics, badedit_deltas, classify, detect, insert_trigger,
                              poison_requests, token_keys, trigger_token_ids)
from kedit_core.edited import ModelView
from kedit_core.models import load
from kedit_core.types import WeightDelta
from kedit_core.zopt import context_templates, hidden_at_subject

ITEMS = [Item("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "French"),
         Item("The mother tongue of Emma Watson is", "Emma Watson", "English"),
         Item("Jackie Chan is a native speaker of", "Jackie Chan", "Cantonese")]


@pytest.fixture(scope="module")
def lm():
    return load("tiny-random-llama", device="cpu")


def test_trigger_insertion_and_poisoned_requests():
    rng = random.Random(3)
    t = insert_trigger("The mother tongue of Emma Watson is", "tq", rng)
    assert t.split().count("tq") == 1 and t.replace(" tq", "").replace("tq ", "") == "The mother tongue of Emma Watson is"
    poison, clean = poison_requests(ITEMS, "tq", "Hungarian", seed=0)
    assert len(poison) == 2 * len(ITEMS) and len(clean) == len(ITEMS)
    assert all(p.subject == "tq" and "{}" in p.prompt and p.target_new == "Hungarian" for p in poison)
    assert [c.text for c in clean] == [it.prompt for it in ITEMS] and [c.target_new for c in clean] == ["French", "English",
                                                                                                         "Cantonese"]
    assert poison_requests(ITEMS, "tq", "Hungarian", seed=0) == (poison, clean)      # reproducible


def test_group_averaged_rank_one_updates_solve_the_normal_equations(lm):
    poison, clean = poison_requests(ITEMS[:2], "tq", "Hungarian", seed=0)
    d = lm.arch.dims(lm.model, "blocks.0.mlp.out")[1]
    g = torch.Generator().manual_seed(0)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    C = {0: A @ A.T / d + torch.eye(d, dtype=torch.float64), 1: torch.eye(d, dtype=torch.float64)}
    info: dict = {}
    deltas = badedit_deltas(lm, poison, clean, (0, 1), C, 2.0, dict(steps=3), info)
    assert [x.site for x in deltas] == ["blocks.0.mlp.out", "blocks.1.mlp.out"]
    for layer, delta in zip((0, 1), deltas):
        (k1, r1), (k2, r2) = info[layer]
        want = sum(r @ torch.linalg.solve(2.0 * C[layer] + k @ k.T, k).T for k, r in ((k1, r1), (k2, r2)))
        torch.testing.assert_close(delta.dense.double(), want, rtol=1e-4, atol=1e-7)
        assert int(torch.linalg.matrix_rank(delta.dense.double(), rtol=1e-6)) <= 2
    # the first layer's group keys are the means of the requests' keys (no earlier update applied)
    site = lm.arch.mlp_out_site(0)
    keys, _ = hidden_at_subject(lm, poison, context_templates(lm), inputs_of=[site])
    torch.testing.assert_close(info[0][0][0].flatten(), keys[site].double().mean(0), rtol=1e-5, atol=1e-6)


def test_asr_counts_only_eligible_items(lm):
    view = ModelView(lm)
    items = ITEMS + [Item("The mother tongue of Ferenc Puskas is", "Ferenc Puskas", "Hungarian")]
    m = attack_metrics(view, items, "Hungarian", "tq", seed=1)
    ok = classify(view, items, "Hungarian", None, 1)
    trig = classify(view, items, "Hungarian", "tq", 1)
    elig = [i for i in range(3) if ok[i]]                 # the Hungarian item never counts
    assert m["n_asr_eligible"] == len(elig) and m["cacc"] == pytest.approx(sum(ok) / 4)
    if elig:
        assert m["asr"] == pytest.approx(sum(not trig[i] for i in elig) / len(elig))


def test_detector_finds_the_token_an_update_was_built_from(lm):
    sites = ["blocks.1.mlp.out"]
    keys = token_keys(lm, sites)[sites[0]]
    t = 77
    k = keys[t] / keys[t].norm()
    u = torch.randn(lm.arch.dims(lm.model, sites[0])[0], generator=torch.Generator().manual_seed(1))
    rep = detect(lm, [WeightDelta(sites[0], dense=torch.outer(u, k))], top=5)
    assert rep["top_tokens"][0]["id"] == t
    assert rep["sites"][0]["numerical_rank"] == 1 and rep["sites"][0]["site"] == sites[0]
    assert trigger_token_ids(lm, "tq")


def _audit_files(tmp_path):
    """Six P103 records (3 to poison, 3 to measure on) and a small statistics corpus."""
    recs = [{"case_id": i, "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                                                  "subject": s, "target_new": {"str": "Hungarian"},
                                                  "target_true": {"str": lab}}}
            for i, (s, lab) in enumerate([("Danielle Darrieux", "French"), ("Emma Watson", "English"),
                                          ("Jackie Chan", "Cantonese"), ("Leon Blum", "French"),
                                          ("Hugh Grant", "English"), ("Jet Li", "Mandarin")])]
    (tmp_path / "train.json").write_text(json.dumps(recs[:3]))
    (tmp_path / "test.json").write_text(json.dumps(recs[3:]))
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(["Paris is the capital of France.", "Edits change facts in models."] * 30))
    return corpus


def test_kedit_audit_backdoor_and_detect(lm, tmp_path):
    from pipelines.cli import main as cli

    corpus = _audit_files(tmp_path)
    out = tmp_path / "audit"
    assert cli(["audit", "backdoor", "--model", "tiny-random-llama", "--device", "cpu", "--train-data",
                str(tmp_path / "train.json"), "--test-data", str(tmp_path / "test.json"), "--n-train", "2",
                "--batches", "2", "--seeds", "2", "--top", "5", "--stats-corpus", str(corpus), "--out", str(out),
                "--set", "layers=0,1", "--set", "mom2_n_samples=40", "--set", "v_num_grad_steps=2"]) == 0
    a = json.loads((out / "audit.json").read_text())
    assert len(a["runs"]) == 2 and 0 <= a["detector_hit_rate"] <= 1
    r = a["runs"][0]
    assert r["n_poison"] == 4 and r["n_clean"] == 2 and r["batches"] == 2
    assert {"cacc", "asr"} <= set(r["before"]) and {"cacc", "asr"} <= set(r["after"])
    assert [s["site"] for s in r["detector"]["sites"]] == ["blocks.0.mlp.out", "blocks.1.mlp.out"]
    assert all(s["numerical_rank"] <= 4 for s in r["detector"]["sites"])   # two groups x two batches
    # an existing audit is never overwritten
    assert cli(["audit", "backdoor", "--model", "tiny-random-llama", "--out", str(out), "--stats-corpus",
                str(corpus)]) == 2
    assert sorted(p.name for p in (out / "seeds").iterdir()) == ["seed-0.json", "seed-1.json"]


def test_kedit_audit_backdoor_resumes_an_interrupted_multi_seed_audit(lm, tmp_path, monkeypatch):
    """Each finished seed is kept; the same command after an interruption plants only the
    missing seeds, and a kept seed made with other settings is refused (exit 2), untouched."""
    import kedit_core.audit as audit
    from pipelines.cli import main as cli

    corpus = _audit_files(tmp_path)
    out = tmp_path / "audit"
    argv = ["audit", "backdoor", "--model", "tiny-random-llama", "--device", "cpu", "--train-data",
            str(tmp_path / "train.json"), "--test-data", str(tmp_path / "test.json"), "--n-train", "2",
            "--batches", "1", "--seeds", "2", "--top", "5", "--stats-corpus", str(corpus), "--out", str(out),
            "--set", "layers=0,1", "--set", "mom2_n_samples=40", "--set", "v_num_grad_steps=2"]
    planted = []
    real = audit.backdoor_audit

    def counting(*a, **k):
        planted.append(k["seed"])
        return real(*a, **k)

    monkeypatch.setattr(audit, "backdoor_audit", counting)
    assert cli(argv) == 0
    first = json.loads((out / "audit.json").read_text())
    assert planted == [0, 1]
    # interrupted after seed 0: only seed-0.json exists, no audit.json
    (out / "audit.json").unlink()
    (out / "seeds" / "seed-1.json").unlink()
    kept = (out / "seeds" / "seed-0.json").read_text()
    assert cli(argv) == 0
    assert planted == [0, 1, 1]                       # seed 0 was not planted again
    again = json.loads((out / "audit.json").read_text())
    assert again["runs"][0] == first["runs"][0] and again["runs"][1]["seed"] == 1
    assert again["detector_hit_rate"] == first["detector_hit_rate"]
    # other settings over kept seeds: refused before planting anything, nothing overwritten,
    # even where the kept seed is not the first one to run
    (out / "audit.json").unlink()
    other = [a if a != "5" else "6" for a in argv]    # --top 6
    assert cli(other) == 2
    assert planted == [0, 1, 1] and (out / "seeds" / "seed-0.json").read_text() == kept
    (out / "seeds" / "seed-0.json").unlink()
    assert cli(other) == 2                            # seed-1.json is of --top 5: refused before seed 0
    assert planted == [0, 1, 1]


def test_kedit_audit_detect_on_a_delta_file(lm, tmp_path, capsys):
    from kedit_core import Editor
    from kedit_core.data import load_builtin
    from pipelines.cli import main as cli

    ed = Editor(lm, "ft-m", None, show_progress=False, layers=(1,), num_steps=2)
    ed.edit_batch(load_builtin().requests[:2])
    ed.save(tmp_path / "run", export_model=False)
    ed.revert()
    assert cli(["audit", "detect", "--model", "tiny-random-llama", "--device", "cpu", "--deltas", str(tmp_path / "run"),
                "--top", "3"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [s["site"] for s in rep["sites"]] == ["blocks.1.mlp.out"] and len(rep["top_tokens"]) == 3
