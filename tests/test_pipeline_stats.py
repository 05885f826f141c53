"""`kedit stats` on a local Ray instance: sharded StatsWorker actors merge to the
single-process result; an interrupted job resumes from its saved shards."""

import pytest
import torch

from kedit_core.models import load
from kedit_core.stats import SHARD_TEXTS, StatsStore, open_corpus

ray = pytest.importorskip("ray")

SITES = ["blocks.1.mlp.out", "blocks.3.mlp.out"]
MODEL = "tiny-random-llama"


@pytest.fixture(scope="module")
def ray_local():
    from pipelines.raycluster import init_ray

    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    words = "paris tokyo rome knowledge editing model weights statistics shard merge ray actor".split()
    lines = []
    for i in range(2 * SHARD_TEXTS + 40):  # three shards, the last one partial
        if i % 97 == 0:
            lines.append(" = Heading = ")  # WikiText headings are skipped by both readers
        lines.append(" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 11)))
    f = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    f.write_text("\n".join(lines) + "\n")
    return f


# sums of float64 products of float32 keys computed with different thread counts
F32_KEYS = dict(rtol=1e-5, atol=1e-7)


def test_sharded_ray_stats_equal_single_process(ray_local, corpus_file, tmp_path):
    from pipelines.stats_job import run_stats

    lm = load(MODEL, device="cpu")
    corpus = open_corpus(str(corpus_file))
    single = StatsStore(tmp_path / "single").get_or_compute(lm, SITES, corpus, n_samples=600, max_length=16,
                                                              show_progress=False)
    got = run_stats(lm, SITES, corpus, n_samples=600, max_length=16, workers=2, store=StatsStore(tmp_path / "ray"),
                    model_spec=MODEL, dtype="fp32", device="cpu", show_progress=False)
    for s in SITES:
        assert got[s].count == single[s].count > 0
        # Same shards, merged in the same order: equal up to the float32 rounding of the keys
        # themselves, which depends on the thread count (1 per Ray worker here, the machine's
        # in this process) and the CPU's kernels: a few ulps of float32 (seen: 3e-8 absolute).
        torch.testing.assert_close(got[s].sum, single[s].sum, **F32_KEYS)
    # Written to the store: a second call reads it back without computing.
    again = run_stats(lm, SITES, corpus, n_samples=600, max_length=16, workers=1, store=StatsStore(tmp_path / "ray"),
                      model_spec=MODEL, device="cpu", show_progress=False)
    assert "_throughput" not in again and torch.equal(again[SITES[0]].sum, got[SITES[0]].sum)


def test_interrupted_stats_resume_from_saved_shards(ray_local, corpus_file, tmp_path):
    from pipelines.stats_job import partials_dir, run_stats

    lm = load(MODEL, device="cpu")
    corpus = open_corpus(str(corpus_file))
    store = StatsStore(tmp_path / "store")
    kw = dict(n_samples=600, max_length=16, store=store, model_spec=MODEL, device="cpu", show_progress=False)
    first = run_stats(lm, SITES, corpus, workers=1, stop_after_shards=1, **kw)
    assert first == {"interrupted": True, "shards_done": 1}
    pdir = partials_dir(store, store.specs(lm, SITES, corpus, n_samples=600, max_length=16))
    saved = sorted(p.name for p in pdir.glob("shard-*.safetensors"))
    assert saved == ["shard-00000.safetensors"]
    mtime = (pdir / saved[0]).stat().st_mtime_ns
    done = run_stats(lm, SITES, corpus, workers=2, **kw)
    # The resumed job computed only the 2 remaining shards (the saved one was not redone).
    assert done["_throughput"]["tokens"] < done[SITES[0]].count
    assert not pdir.exists() or (pdir / saved[0]).stat().st_mtime_ns == mtime
    whole = StatsStore(tmp_path / "single").get_or_compute(lm, SITES, corpus, n_samples=600, max_length=16,
                                                             show_progress=False)
    torch.testing.assert_close(done[SITES[1]].sum, whole[SITES[1]].sum, **F32_KEYS)
