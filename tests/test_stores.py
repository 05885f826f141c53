"""Issue 9 point 2: concurrency and the shared stores. Two jobs computing the same statistics
entry, checksummed entries refused when wrong, the run directory's lock, run.json checked
before any model loads, the statistics corpus in the run identity, and the atomic writes."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kedit_core.errors import BadInputError
from kedit_core.io import FileLock, LockHeld, atomic_dir, atomic_file, atomic_write_text
from kedit_core.models import load
from kedit_core.stats import StatsStore, open_corpus
from pipelines.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
SITES = ["blocks.1.mlp.out", "blocks.2.mlp.out"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    words = "paris tokyo rome knowledge editing model weights statistics shard merge ray actor".split()
    f = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    f.write_text("\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(5 + i % 11))
                           for i in range(300)) + "\n")
    return f


@pytest.fixture(scope="module")
def lm():
    return load("tiny-random-llama", device="cpu")


def _env(**extra):
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)


# ------------------------------------------------------------------ statistics entries
JOB = textwrap.dedent("""
    import sys, time
    from kedit_core.models import load
    from kedit_core.stats import StatsStore, open_corpus
    root, corpus, tag = sys.argv[1:4]
    lm = load("tiny-random-llama", device="cpu")
    m = StatsStore(root).get_or_compute(lm, {sites!r}, open_corpus(corpus), n_samples=300, max_length=48,
                                        show_progress=False)
    print(tag, "done", flush=True)
""").format(sites=SITES)


def test_two_jobs_for_the_same_entry_leave_one_valid_entry(lm, corpus, tmp_path):
    root = tmp_path / "shared-store"
    procs = [subprocess.Popen([sys.executable, "-c", JOB, str(root), str(corpus), t], cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for t in "ab"]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # as the jobs (OMP_NUM_THREADS=1): float32 kernels round by thread count
    try:
        single = StatsStore(tmp_path / "single").get_or_compute(lm, SITES, open_corpus(str(corpus)), n_samples=300,
                                                              max_length=48, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    store = StatsStore(root)
    specs = store.specs(lm, SITES, open_corpus(str(corpus)), n_samples=300, max_length=48)
    assert len(list(root.glob("mom2-*.safetensors"))) == 2
    for s, spec in specs.items():
        m = store.load(spec)                           # verified: identity, checksum, counts
        assert torch.equal(m.sum, single[s].sum) and m.count == single[s].count and m.texts == 300


def test_a_second_job_waits_for_the_lock_then_finds_the_entry(lm, corpus, tmp_path):
    """The Ray statistics job takes the store's entry lock: while another process computes
    the entry it waits (no partial folder of its own), then returns the stored entry without
    starting a single actor."""
    from pipelines.stats_job import run_stats

    store = StatsStore(tmp_path / "st")
    c = open_corpus(str(corpus))
    specs = store.specs(lm, SITES, c, n_samples=300, max_length=48)
    lock = store.lock(list(specs.values()))
    result = {}
    with lock:
        t = threading.Thread(target=lambda: result.update(
            run_stats(lm, SITES, c, n_samples=300, max_length=48, workers=1, store=store, show_progress=False)))
        t.start()
        time.sleep(2)
        assert t.is_alive() and not (tmp_path / "st" / "partials").exists()
        # the "other job" stores the entry while holding the lock (the single-process path
        # would block on the same lock, so compute and save directly)
        computed = StatsStore.compute(lm, SITES, __import__("kedit_core.stats", fromlist=["x"]).tokenize_corpus(
            lm, c.texts(), max_length=48, n_samples=300), show_progress=False)
        for s in SITES:
            store.save(specs[s], computed[s], n_texts=300)
    t.join(120)
    assert not t.is_alive()
    assert all(torch.equal(result[s].sum, computed[s].sum) for s in SITES)


def test_a_wrong_entry_is_refused_never_used(lm, corpus, tmp_path):
    store = StatsStore(tmp_path / "st")
    c = open_corpus(str(corpus))
    store.get_or_compute(lm, SITES[:1], c, n_samples=50, max_length=48, show_progress=False)
    (spec,) = store.specs(lm, SITES[:1], c, n_samples=50, max_length=48).values()
    path = store.path(spec)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    t = load_file(str(path))

    def rewrite(tensors, **changes):
        save_file(tensors, str(path), metadata={**meta, **changes})

    rewrite({"sum": t["sum"] * 1.0001})                       # bytes changed
    with pytest.raises(BadInputError, match="content checksum") as e:
        store.load(spec)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    rewrite(t, count=str(int(meta["count"]) + 1))             # count changed
    with pytest.raises(BadInputError, match="tokens"):
        store.load(spec)
    rewrite(t, texts="x")                                     # unreadable field
    with pytest.raises(BadInputError, match="counts"):
        store.load(spec)
    # an entry from before checksums is recomputed, not trusted
    rewrite(t, **{k: v for k, v in meta.items() if k != "sha256"})
    old = {k: v for k, v in meta.items() if k != "sha256"}
    save_file(t, str(path), metadata=old)
    assert store.load(spec) is None


# ------------------------------------------------------------------ the run directory
def argv(out, corpus, *extra, model="tiny-random-llama", limit=4):
    return ["edit", "--model", model, "--method", "memit", "--data", "builtin", "--limit", str(limit),
            "--batch-size", "2", "--workers", "0", "--eval-every", "0", "--perplexity-texts", "2",
            "--stats-corpus", str(corpus), "--out", str(out), "--device", "cpu", "--set", "layers=1,2",
            "--set", "v_num_grad_steps=2", "--set", "mom2_n_samples=64", *extra]


def test_second_driver_is_refused_naming_the_holder(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with FileLock(out / ".lock"):
        rc = cli(argv(out, corpus))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and f"PID {os.getpid()}" in err and os.uname().nodename in err and ".lock" in err
    assert not (out / "run.json").exists()          # nothing written by the refused driver


def test_a_lock_left_by_a_killed_driver_does_not_block(corpus, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from kedit_core.io import FileLock
        FileLock({str(out / '.lock')!r}).acquire()
        print("held", flush=True)
        time.sleep(600)
    """)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(LockHeld):
        FileLock(out / ".lock", blocking=False).acquire()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert cli(argv(out, corpus)) == 0                # the stale pid/host text does not matter
    assert (out / "metrics.json").is_file()


def test_a_mismatch_is_refused_before_the_model_loads(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(argv(out, corpus)) == 0
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    # a model that does not exist would fail to load: the identity check must come first
    rc = cli(argv(out, corpus, "--batch-size", "1", model=str(tmp_path / "no-such-model")))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "run.json" in err and "batch_size: 2 -> 1" in err and "no-such-model" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == stamp


def test_resume_on_a_machine_whose_default_corpus_differs_is_refused(corpus, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("\n".join(f"a different default corpus, line {i} of it" for i in range(200)))
    out = tmp_path / "run"
    a = [x for x in argv(out, corpus) if x not in ("--stats-corpus", str(corpus))]   # the default corpus
    r1 = subprocess.run([sys.executable, "-m", "pipelines.cli", *a], cwd=ROOT, capture_output=True, text=True,
                        env=_env(KEDIT_DEFAULT_CORPUS=str(corpus)), timeout=600)
    assert r1.returncode == 0, r1.stderr[-2000:]
    run = json.loads((out / "run.json").read_text())
    assert run["identity"]["corpus"]["id"] == "wikitext-2-test" and run["identity"]["statistics"]
    r2 = subprocess.run([sys.executable, "-m", "pipelines.cli", "edit", "--resume", str(out)], cwd=ROOT,
                        capture_output=True, text=True, env=_env(KEDIT_DEFAULT_CORPUS=str(other)), timeout=600)
    assert r2.returncode == 2 and "corpus.hash" in r2.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------ atomic writes
def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path):
    p = tmp_path / "f.json"
    atomic_write_text(p, "old")
    with pytest.raises(RuntimeError):
        with atomic_file(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert p.read_text() == "old" and [x.name for x in tmp_path.iterdir()] == ["f.json"]
    d = tmp_path / "export"
    with atomic_dir(d) as t:
        (t / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(d) as t:
            (t / "a").write_text("2")
            raise RuntimeError("disk full")
    assert (d / "a").read_text() == "1" and sorted(x.name for x in tmp_path.iterdir()) == ["export", "f.json"]


def test_damaged_context_template_cache_is_regenerated(lm, tmp_path, monkeypatch):
    from kedit_core.zopt import context_templates

    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path))
    tm = context_templates(lm)
    (f,) = (tmp_path / "context_templates").glob("*.json")
    f.write_text('["{} half')                                    # truncated
    assert context_templates(lm) == tm
    f.write_text(json.dumps(["no placeholder"]))                  # valid JSON, wrong content
    assert context_templates(lm) == tm
