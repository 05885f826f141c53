"""Issue 9 point 1: faithfulness fixes. Each test here failed before its fix: held-out
perplexity (it reported exactly 1.0 when the statistics used the whole corpus), ROME's own
context templates, the metric definitions and names, the generation metric, the zsRE
conventions, and the KL direction of the target optimisation."""

import json
import math

import pytest
import torch

from kedit_core.data import read_dataset
from kedit_core.errors import BadInputError
from kedit_core.evaluate import evaluate_requests, heldout_texts, perplexity, score, starts_with_target
from kedit_core.evaluate.perplexity import usable
from kedit_core.methods import get_method, make_config
from kedit_core.models import load
from kedit_core.stats import StatsView, collect_second_moments, open_corpus, tokenize_corpus
from kedit_core.stats import corpus as corpus_mod
from kedit_core.types import EditRequest, LabeledPrompt
from kedit_core.zopt import hidden_at_subject, kl_term, rome_context_templates


@pytest.fixture(scope="module")
def lm():
    return load("tiny-random-llama", device="cpu")


# ------------------------------------------------------------------ held-out perplexity
def _corpus_file(tmp_path, texts):
    f = tmp_path / "corpus.txt"
    f.write_text("\n".join(texts) + "\n")
    return open_corpus(str(f))


def test_heldout_texts_follow_exactly_the_texts_the_statistics_used(lm, tmp_path):
    # "x" tokenises to one token (byte-level tiny tokenizer has no BOS): tokenize_corpus skips
    # it, so it must not count among the texts the statistics used.
    texts = ["first text here", "x", "second text here", "third text", "y", "fourth one", "fifth one"]
    assert not usable(lm, "x") and usable(lm, "first text here")
    c = _corpus_file(tmp_path, texts)
    used = tokenize_corpus(lm, c.texts(), max_length=64, n_samples=3)
    used_texts = [t for t in c.texts() if usable(lm, t)][:3]
    assert len(used) == 3 and used_texts == ["first text here", "second text here", "third text"]
    ho = heldout_texts(lm, c, 3, 2)
    assert ho.texts == ("fourth one", "fifth one") and ho.source == c.id and not ho.separate
    assert not set(ho.texts) & set(used_texts)


def test_perplexity_is_never_one_when_the_statistics_used_every_text(lm, tmp_path):
    """Before the fix: 10 texts against mom2_n_samples=100 left no held-out text and
    perplexity came out as exp(0 / max(0, 1)) = 1.0."""
    c = _corpus_file(tmp_path, [f"text number {i} of a tiny corpus" for i in range(10)])
    ho = heldout_texts(lm, c, 100, 5)
    assert ho.separate and ho.source != c.id and len(ho.texts) == 5
    used = set(c.texts())
    assert not used & set(ho.texts)
    ppl = perplexity(lm, ho.texts, n_texts=5)
    assert ppl > 1.0 and ppl != 1.0
    with pytest.raises(BadInputError, match="perplexity"):
        perplexity(lm, [], n_texts=5)            # no tokens: an error, not 1.0
    with pytest.raises(BadInputError, match="perplexity"):
        perplexity(lm, ["x", "y"], n_texts=5)    # only unusable texts


def test_no_separate_source_is_a_one_line_error(lm, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "DEFAULT_CORPUS", tmp_path / "absent.raw")
    c = corpus_mod.Corpus("builtin:pydoc", ())
    with pytest.raises(BadInputError) as e:
        heldout_texts(lm, c, None, 5)
    assert "perplexity_corpus" in str(e.value) and "\n" not in str(e.value)
    # an explicit held-out corpus is used as given
    other = _corpus_file(tmp_path, ["held out one", "held out two"])
    ho = heldout_texts(lm, c, None, 5, perplexity_corpus=str(other.files[0]))
    assert ho.texts == ("held out one", "held out two") and ho.separate


def test_editor_perplexity_uses_a_separate_source_when_statistics_took_everything(tmp_path):
    from kedit_core import Editor

    c = tmp_path / "c.txt"
    c.write_text("\n".join(f"sentence {i} about Paris and Rome" for i in range(12)))
    ed = Editor("tiny-random-llama", "memit", str(c), device="cpu", show_progress=False,
                stats_dir=str(tmp_path / "stats"), layers=(1,), mom2_n_samples=100)
    m = ed.evaluate([], perplexity_texts=4, generation=False)
    assert m["perplexity"] > 1.0 and ed.heldout(4).separate


def test_methods_with_and_without_statistics_score_perplexity_on_the_same_texts(tmp_path):
    """kedit bench compares methods: FT-M (no statistics) once skipped no text and was scored
    on other texts than MEMIT (SmolLM2: unedited perplexity 61.85 vs 47.73 on one dataset)."""
    from kedit_core import Editor

    c = tmp_path / "c.txt"
    c.write_text("\n".join(f"sentence {i} about Paris and Rome" for i in range(40)))
    eds = {m: Editor("tiny-random-llama", m, str(c), device="cpu", show_progress=False,
                     stats_dir=str(tmp_path / "stats"), **kw)
           for m, kw in {"memit": {"layers": (1,)}, "ft-m": {}, "memprompt": {}}.items()}
    texts = {m: ed.heldout(4).texts for m, ed in eds.items()}
    assert texts["ft-m"] == texts["memit"] == texts["memprompt"] and len(texts["memit"]) == 4


# ------------------------------------------------------------------ metric definitions
def test_magnitudes_are_per_token_geometric_means_and_accuracies_have_two_names(lm):
    r = EditRequest(case_id="x", subject="Paris", prompt="{} is in", target_new="Rome city",
                    target_true="France", paraphrase_prompts=("Paris lies in", "Paris, the city, is in"),
                    neighborhood=(LabeledPrompt("Lyon is in", "France"),))
    m = evaluate_requests(lm, [r], generation=False)
    s = score(lm, ["Paris is in", "Paris is in", "Paris lies in", "Paris lies in", "Paris, the city, is in",
                   "Paris, the city, is in", "Lyon is in", "Lyon is in"],
              ["Rome city", "France", "Rome city", "France", "Rome city", "France", "France", "Rome city"])
    P = [math.exp(-x) for x in s.mean_nll]
    assert m["efficacy_magnitude"] == pytest.approx(P[0] - P[1], abs=1e-7)
    # not the probability of the whole target (the old, wrongly named quantity)
    assert m["efficacy_magnitude"] != pytest.approx(math.exp(s.logprob[0]) - math.exp(s.logprob[1]), abs=1e-9)
    assert m["paraphrase_magnitude"] == pytest.approx(((P[2] - P[3]) + (P[4] - P[5])) / 2, abs=1e-7)
    assert m["neighborhood_magnitude"] == pytest.approx(P[6] - P[7], abs=1e-7)
    assert m["rewrite_acc"] == pytest.approx(s.token_acc[0])                  # share of tokens
    assert m["rewrite_correct"] == float(s.token_acc[0] == 1.0)               # all tokens
    assert m["paraphrase_acc"] == pytest.approx((s.token_acc[2] + s.token_acc[4]) / 2)
    assert m["paraphrase_correct"] == pytest.approx((float(s.token_acc[2] == 1) + float(s.token_acc[4] == 1)) / 2)
    assert m["neighborhood_acc"] == pytest.approx(s.token_acc[6])


def test_accuracy_conventions_differ_on_a_partly_right_target():
    """A 3-token target of which the model predicts some but not all tokens: EasyEdit's share
    of tokens is strictly between 0 and 1, MEMIT's all-tokens-correct is 0."""
    lm = load("tiny-random-gpt2", device="cpu")
    found = None
    for prompt in ("aaaa", "abab", "the ", "hello", "zzzz", "0000", "aaa a", "xyzxy"):
        for target in ("aaa", "bab", "the", "llo", "zzz", "000", " a a", "zxy"):
            s = score(lm, [prompt], [target])
            if 0 < s.token_acc[0] < 1:
                found = (prompt, target, s.token_acc[0])
                break
        if found:
            break
    if found is None:
        pytest.skip("no partly-predicted target found on this random model")
    p, t, share = found
    r = EditRequest(case_id="y", subject=p, prompt="{}", target_new=t)
    m = evaluate_requests(lm, [r], generation=False)
    assert m["rewrite_acc"] == pytest.approx(share) and 0 < m["rewrite_acc"] < 1
    assert m["rewrite_correct"] == 0.0


# ------------------------------------------------------------------ generation metric
def test_starts_with_target_normalises_case_and_space_only():
    assert starts_with_target(" Kuala  Lumpur, the capital", "Kuala Lumpur")
    assert starts_with_target("kuala lumpur", " KUALA LUMPUR")
    assert not starts_with_target(" Kualadarang", "Kuala Lumpur")
    assert not starts_with_target(" Bratis.", "Bratislava")
    assert not starts_with_target(" the city of Rome", "Rome")
    assert not starts_with_target(" Rome", "")


def test_generation_metric_matches_greedy_continuations(lm):
    from kedit_core.generation import greedy

    reqs = [EditRequest(case_id=str(i), subject=s, prompt="{} is in", target_new=t, target_true="France",
                        paraphrase_prompts=(f"{s} lies in",))
            for i, (s, t) in enumerate([("Paris", "Rome"), ("Lyon", "aaaa"), ("Nice", "Berlin")])]
    # make one of them succeed for sure: a target equal to the model's own greedy continuation
    cont = greedy(lm, ["Lyon is in"], 4)[0]
    reqs[1] = reqs[1].with_(target_new=cont.strip() or "a")
    m = evaluate_requests(lm, reqs)
    rw = [starts_with_target(greedy(lm, [r.text], 8)[0], r.target_new) for r in reqs]
    pa = [starts_with_target(greedy(lm, [r.paraphrase_prompts[0]], 8)[0], r.target_new) for r in reqs]
    assert m["rewrite_gen"] == pytest.approx(sum(rw) / 3) and m["rewrite_gen"] > 0
    assert m["paraphrase_gen"] == pytest.approx(sum(pa) / 3)
    assert "rewrite_gen" not in evaluate_requests(lm, reqs, generation=False)


# ------------------------------------------------------------------ zsRE conventions
ZSRE = {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
        "rephrase": "What university did Watts Humphrey take part in?", "alt": "University of Michigan",
        "answers": ["Illinois Institute of Technology"], "loc": "nq question: who played desmond doss father",
        "loc_ans": "Hugo Weaving"}


def test_zsre_conventions(tmp_path):
    f = tmp_path / "zsre.json"
    f.write_text(json.dumps([ZSRE]))
    mend = read_dataset(f).requests[0]                                  # the default
    assert mend.target_new == "University of Michigan" and mend.target_true == "Illinois Institute of Technology"
    assert mend.neighborhood == (LabeledPrompt("nq question: who played desmond doss father", "Hugo Weaving"),)
    memit = read_dataset(f, zsre_convention="memit").requests[0]
    assert memit.target_new == "Illinois Institute of Technology" and memit.target_true is None
    assert memit.neighborhood == (LabeledPrompt("nq question: who played desmond doss father?", "Hugo Weaving"),)
    assert memit.paraphrase_prompts == mend.paraphrase_prompts == (ZSRE["rephrase"],)
    with pytest.raises(BadInputError, match="zsre_convention"):
        read_dataset(f, zsre_convention="easyedit")


# ------------------------------------------------------------------ KL direction
def test_kl_term_is_kl_of_the_edited_from_the_original_distribution():
    g = torch.Generator().manual_seed(0)
    lo = torch.log_softmax(torch.randn(1, 50, generator=g), -1)    # original
    ld = torch.log_softmax(torch.randn(1, 50, generator=g), -1)    # with delta
    forward = float((ld.exp() * (ld - lo)).sum())                  # KL(p_delta || p_orig)
    backward = float((lo.exp() * (lo - ld)).sum())
    assert float(kl_term(lo, ld)) == pytest.approx(forward, rel=1e-6)
    assert abs(forward - backward) > 1e-3                          # the direction matters here
    import kedit_core.zopt as z
    assert "KL(p_delta || p_orig)" in z.__doc__ and "KL(p_orig || p_delta)" not in z.__doc__


# ------------------------------------------------------------------ ROME
def test_rome_context_templates_follow_the_reference(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path))
    tm = rome_context_templates(lm)
    assert len(tm) == 21 and tm[0] == "{}" and all(t.endswith(". {}") for t in tm[1:])
    assert "{" not in "".join(t[:-2] for t in tm[1:])
    assert rome_context_templates(lm) == tm                               # cached, same
    assert rome_context_templates(lm, use_cache=False) == tm              # seeded: reproducible


@pytest.mark.parametrize("adjust", [True, False])
def test_rome_key_is_the_uniform_mean_over_its_own_templates(lm, adjust):
    reqs = [EditRequest(case_id="r", subject="Paris", prompt="{} is the capital of", target_new="Italy")]
    m = get_method("rome")
    cfg = make_config(m.config_cls, lm, {"layers": (2,), "v_num_grad_steps": 3, "mom2_adjustment": adjust})
    site = lm.arch.mlp_out_site(2)
    import random

    rnd = random.Random(0)   # varied text, so that C is well conditioned
    texts = ["".join(rnd.choice("abcdefghijklmnopqrstuvwxyz ,.") for _ in range(60)) for _ in range(120)]
    toks = tokenize_corpus(lm, texts, max_length=64)
    stats = StatsView(collect_second_moments(lm, [site], toks))
    assert [k.site for k in m.required_stats(cfg, lm)] == ([site] if adjust else [])
    state = m.prepare(lm, cfg, stats)
    result, _ = m.compute(lm, reqs, state)
    u = result.deltas[0].right[:, 0].double()
    tm = rome_context_templates(lm)
    each = torch.stack([hidden_at_subject(lm, reqs, [t], inputs_of=[site])[0][site][0] for t in tm]).double()
    k_star = each.mean(0)                                                   # uniform, all 21
    expect = torch.linalg.solve(stats[site].mean(), k_star) if adjust else k_star
    expect = expect / expect.norm()
    torch.testing.assert_close(u, expect.to(u.dtype), atol=1e-4, rtol=1e-4)
    # not MEMIT's weighting (bare prompt 1/2)
    memit_w = 0.5 * each[0] + 0.5 * each[1:].mean(0)
    other = torch.linalg.solve(stats[site].mean(), memit_w) if adjust else memit_w
    assert (u - other / other.norm()).norm() > 1e-3
