"""Second moments: one pass for all layers, exact shard merging, padding, the store."""

import pytest
import torch

from kedit_core.errors import BadInputError
from kedit_core.hooks import trace
from kedit_core.models import load
from kedit_core.stats import (SecondMoment, StatsStore, StatsView, collect_second_moments,
                              merge_all, open_corpus, tokenize_corpus)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital and most populous city of France.",
    "A second moment of keys is accumulated in double precision.",
    "Tokyo is the capital of Japan and its largest city.",
    "Short.",
    "Knowledge editing changes facts stored in a language model without retraining it.",
] * 3


@pytest.fixture(scope="module")
def lm():
    return load("tiny-random-llama", device="cpu")


@pytest.fixture(scope="module")
def toks(lm):
    return tokenize_corpus(lm, TEXTS, max_length=64)


SITES = ["blocks.1.mlp.out", "blocks.3.mlp.out"]


def _reference(lm, site, toks):
    """Per sequence, unpadded, one full forward each: the sum of k k^T."""
    mod = lm.arch.module(lm.model, site)
    total = torch.zeros(128, 128, dtype=torch.float64)
    n = 0
    for ids in toks:
        with trace({"m": mod}, inputs=True, outputs=False) as t:
            lm.model(input_ids=torch.tensor([ids]))
        k = t.inputs["m"][0].double()
        total += k.T @ k
        n += k.shape[0]
    return total, n


def test_one_pass_equals_per_layer_reference_and_ignores_padding(lm, toks):
    # batch_tokens forces padded batches of different lengths
    got = collect_second_moments(lm, SITES, toks, batch_tokens=64)
    for site in SITES:
        ref, n = _reference(lm, site, toks)
        assert got[site].count == n == sum(len(t) for t in toks)
        torch.testing.assert_close(got[site].sum, ref, rtol=1e-5, atol=1e-6)


def test_shards_merge_exactly(lm, toks):
    whole = collect_second_moments(lm, SITES, toks, batch_tokens=10_000)
    a = collect_second_moments(lm, SITES, toks[:7], batch_tokens=10_000)
    b = collect_second_moments(lm, SITES, toks[7:], batch_tokens=10_000)
    merged = merge_all([a, b])
    for site in SITES:
        assert merged[site].count == whole[site].count
        # float64 accumulation: equal up to float64 rounding of float32 partial sums
        torch.testing.assert_close(merged[site].sum, whole[site].sum, rtol=1e-6, atol=1e-7)
        assert merged[site].sum.dtype == torch.float64
    # merging is associative and commutative on the exact float64 sums it holds
    m1 = a[SITES[0]].merge(b[SITES[0]])
    m2 = b[SITES[0]].merge(a[SITES[0]])
    assert torch.equal(m1.sum, m2.sum) and m1.count == m2.count


def test_merge_shape_mismatch_and_empty():
    with pytest.raises(ValueError):
        SecondMoment.zeros(3).merge(SecondMoment.zeros(4))
    with pytest.raises(ValueError):
        SecondMoment.zeros(3).mean()


def test_store_reuses_recomputes_and_refuses(lm, tmp_path):
    corpus_file = tmp_path / "c.txt"
    corpus_file.write_text("\n".join(TEXTS))
    corpus = open_corpus(str(corpus_file))
    store = StatsStore(tmp_path / "stats")
    m1 = store.get_or_compute(lm, SITES, corpus, n_samples=10, max_length=32, show_progress=False)
    files = sorted(p.name for p in (tmp_path / "stats").glob("*.safetensors"))
    assert len(files) == 2
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "stats").glob("*.safetensors")}
    m2 = store.get_or_compute(lm, SITES, corpus, n_samples=10, max_length=32, show_progress=False)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "stats").glob("*.safetensors")} == stamp  # reused
    assert torch.equal(m1[SITES[0]].sum, m2[SITES[0]].sum)
    # anything in the identity differs -> another file, the first kept
    store.get_or_compute(lm, SITES[:1], corpus, n_samples=5, max_length=32, show_progress=False)
    assert len(list((tmp_path / "stats").glob("*.safetensors"))) == 3
    corpus_file.write_text("\n".join(TEXTS[::-1]) + "\nmore text")
    store.get_or_compute(lm, SITES[:1], open_corpus(str(corpus_file)), n_samples=10, max_length=32,
                         show_progress=False)
    assert len(list((tmp_path / "stats").glob("*.safetensors"))) == 4
    # a file renamed onto another's name is refused, not mixed in
    spec_a, spec_b = store.specs(lm, SITES, corpus, n_samples=10, max_length=32).values()
    pa, pb = store.path(spec_a), store.path(spec_b)
    pb.write_bytes(pa.read_bytes())
    with pytest.raises(BadInputError, match="does not match its name.*site"):
        store.load(spec_b)
    pb.write_bytes(b"garbage")
    with pytest.raises(BadInputError, match="corrupt statistics file"):
        store.load(spec_b)
    assert pa.is_file()  # nothing else touched


def test_projector_is_cached_and_projects_onto_the_null_space(lm, tmp_path):
    corpus_file = tmp_path / "c.txt"
    corpus_file.write_text("\n".join(TEXTS[:3]))  # fewer tokens than d: exact null space
    corpus = open_corpus(str(corpus_file))
    store = StatsStore(tmp_path / "stats")
    moments = store.get_or_compute(lm, SITES, corpus, n_samples=3, max_length=32, show_progress=False)
    view = StatsView(moments, store, store.specs(lm, SITES, corpus, n_samples=3, max_length=32))
    P = view.projector(SITES[0], 1e-8)
    assert len(list((tmp_path / "stats").glob("proj*"))) == 1
    assert torch.equal(view.projector(SITES[0], 1e-8), P)  # from the cache
    C = moments[SITES[0]].mean()
    torch.testing.assert_close(P @ P, P, atol=1e-10, rtol=0)  # a projector
    # onto the null space of C (up to the float32 rounding of the per-batch k^T k)
    assert float((P @ C).norm() / C.norm()) < 1e-6
    n_tokens = moments[SITES[0]].count
    assert n_tokens < 128 and int(torch.round(torch.trace(P))) == 128 - n_tokens


def test_corpus_formats(tmp_path):
    import json

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:3]))
    assert list(open_corpus(str(tmp_path / "a.jsonl")).texts()) == TEXTS[:3]
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(BadInputError, match="record 0, field 'text'"):
        list(open_corpus(str(tmp_path / "b.jsonl")).texts())
    with pytest.raises(BadInputError, match="no such corpus"):
        open_corpus(str(tmp_path / "missing.txt"))
    texts = list(open_corpus("builtin:pydoc").texts())
    assert len(texts) > 500 and all(len(t) > 80 for t in texts)
