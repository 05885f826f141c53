"""`kedit stats`: second-moment statistics as a Ray job.

The corpus is read with `ray.data` (text lines, JSONL/JSON, parquet through pyarrow, a
`datasets` dataset), filtered and tokenised exactly as the single-process store does, in
corpus order, and cut into shards of SHARD_TEXTS texts. N `StatsWorker` actors (one model
replica each, one GPU each when there are GPUs) take shards as they become free; each
returns the partial sums of ALL layers for its shard once. The driver saves every finished
shard (so an interrupted job resumes without recomputing it), merges the shards in shard
order in float64 (the same order as the single-process store: equal up to float64 and
thread-count rounding) and writes the result into the statistics store.

Faults: every wait has a timeout (start-up, one shard), a StatsWorker process is restarted
at most `max_restarts` times (its shard is retried), and a worker that cannot go on ends the
job with a one-line `pipelines.workers.WorkerFailure` after the shards finished so far are
saved; running the job again resumes from them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class StatsWorker:
    def __init__(self, model: str, dtype: str, device: str, zero3: bool = False, ds_config=None):
        from kedit_core.models import load
        from pipelines.workers import _set_threads

        from kedit_core.errors import BadInputError

        _set_threads()
        self.bad_input = None
        try:
            self.lm = load(model, dtype=dtype, device=device, zero3=zero3, ds_config=ds_config)
        except BadInputError as e:   # the user's input: no restart helps; fingerprint() raises it
            self.bad_input = e

    def pid(self) -> int:
        import os

        return os.getpid()

    def fingerprint(self) -> str:
        if self.bad_input is not None:
            raise self.bad_input
        return self.lm.fingerprint()

    def run(self, index: int, sites: list[str], token_lists: list[list[int]], batch_tokens: int):
        from kedit_core.stats import collect_second_moments

        t0 = time.perf_counter()
        m = collect_second_moments(self.lm, sites, token_lists, batch_tokens=batch_tokens)
        return index, {s: (v.sum, v.count) for s, v in m.items()}, time.perf_counter() - t0


def corpus_dataset(corpus, tokenizer, max_length: int, n_samples: int | None):
    """A ray.data Dataset of {"ids": token list} in corpus order, filtered as
    kedit_core.stats.corpus does and limited to n_samples texts."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    files = [str(f) for f in corpus.files]
    if corpus.id == "builtin:pydoc" or any(f.endswith(".json") for f in files):
        ds = ray.data.from_items([{"text": t} for t in corpus.texts()])
    elif corpus.hf:
        import datasets

        name, config, split = corpus.hf
        ds = ray.data.from_huggingface(datasets.load_dataset(name, config, split=split))
        ds = ds.select_columns([corpus.text_column]).rename_columns({corpus.text_column: "text"})
    elif all(f.endswith(".parquet") for f in files):
        ds = ray.data.read_parquet(files, columns=[corpus.text_column])
        ds = ds.rename_columns({corpus.text_column: "text"}) if corpus.text_column != "text" else ds
    elif all(f.endswith(".jsonl") for f in files):
        ds = ray.data.read_json(files, lines=True).select_columns([corpus.text_column])
        ds = ds.rename_columns({corpus.text_column: "text"}) if corpus.text_column != "text" else ds
    elif not any(f.endswith((".jsonl", ".parquet")) for f in files):
        ds = ray.data.read_text(files, drop_empty_lines=True)
        ds = ds.filter(lambda r: not (r["text"].strip().startswith("=") and r["text"].strip().endswith("=")))
    else:  # a mixed directory: read it through the core reader, in the same order
        ds = ray.data.from_items([{"text": t} for t in corpus.texts()])

    def tokenize(batch):
        texts = [str(t).strip() for t in batch["text"]]
        texts = [t for t in texts if t]
        enc = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"] \
            if texts else []
        return {"ids": [list(map(int, ids)) for ids in enc if len(ids) >= 2]}

    ds = ds.map_batches(tokenize, batch_size=512, batch_format="numpy")
    return ds.limit(n_samples) if n_samples else ds


def partials_dir(store, specs: dict) -> Path:
    from kedit_core.stats import SHARD_TEXTS

    key = hashlib.sha256(json.dumps(sorted(s.digest() for s in specs.values()) + [SHARD_TEXTS]).encode())
    return store.root / "partials" / key.hexdigest()[:24]


def run_stats(lm, sites: list[str], corpus, *, n_samples: int | None, max_length: int, workers: int,
              store=None, model_spec: str | None = None, dtype: str = "fp32", device: str = "auto",
              batch_tokens: int = 4096, show_progress: bool = True, stop_after_shards: int | None = None,
              zero3: bool = False, ds_config=None, start_timeout_s: float = 600.0,
              call_timeout_s: float = 3600.0, max_restarts: int = 3) -> dict:
    """Compute (or find) the moments of `sites` with `workers` StatsWorker actors; returns
    {site: SecondMoment} and writes them into `store`. `stop_after_shards` (tests) stops
    after that many new shards, as an interruption would. Start-up and each shard are
    waited for at most start_timeout_s / call_timeout_s; a worker process dying more than
    max_restarts times ends the job (WorkerFailure) with the finished shards kept."""
    from kedit_core.stats import StatsStore

    store = store or StatsStore()
    specs = store.specs(lm, sites, corpus, n_samples=n_samples, max_length=max_length)
    found = {s: store.load(spec) for s, spec in specs.items()}
    missing = [s for s, m in found.items() if m is None]
    if not missing:
        log.info("statistics for %s found in %s", ", ".join(sites), store.root)
        return found
    # One job at a time per entry group: a second job for the same entries waits here (the
    # kernel releases the lock of a killed job, whose partials the next holder resumes), then
    # finds the entries stored. The partials folder is only ever used by the lock's holder.
    lock = store.lock([specs[s] for s in missing])
    if _held(lock):
        log.info("waiting for the statistics lock %s (another job computes the same entries)", lock.path)
    with lock:
        for s in missing:
            found[s] = store.load(specs[s])
        missing = [s for s, m in found.items() if m is None]
        if not missing:
            log.info("statistics for %s were stored by another job meanwhile", ", ".join(sites))
            return found
        return _run_stats_locked(lm, sites, corpus, specs, found, missing, store, n_samples=n_samples,
                                 max_length=max_length, workers=workers, model_spec=model_spec, dtype=dtype,
                                 device=device, batch_tokens=batch_tokens, show_progress=show_progress,
                                 stop_after_shards=stop_after_shards, zero3=zero3, ds_config=ds_config,
                                 start_timeout_s=start_timeout_s, call_timeout_s=call_timeout_s,
                                 max_restarts=max_restarts)


def _held(lock) -> bool:
    """Whether another process holds `lock` now (a non-blocking probe)."""
    from kedit_core.io import FileLock, LockHeld

    try:
        with FileLock(lock.path, blocking=False):
            return False
    except LockHeld:
        return True


def _run_stats_locked(lm, sites, corpus, specs, found, missing, store, *, n_samples, max_length, workers,
                      model_spec, dtype, device, batch_tokens, show_progress, stop_after_shards, zero3,
                      ds_config, start_timeout_s, call_timeout_s, max_restarts) -> dict:
    import ray
    from tqdm.auto import tqdm

    from kedit_core.stats import SHARD_TEXTS, merge_all
    from pipelines.workers import WorkerFailure, ray_get

    pdir = partials_dir(store, {s: specs[s] for s in missing})
    pdir.mkdir(parents=True, exist_ok=True)
    done = {int(p.stem.split("-")[1]) for p in pdir.glob("shard-*.safetensors")}
    if done:
        log.info("resuming statistics: %d finished shards in %s", len(done), pdir)

    # Read and tokenise first (ray.data tasks need the CPUs the actors would hold), keeping
    # each missing shard in the object store; then the actors take shards as they free up.
    ds = corpus_dataset(corpus, lm.tokenizer, max_length, n_samples)
    todo: list[tuple[int, object]] = []
    texts: dict[int, int] = {}
    n_shards = 0
    for index, batch in enumerate(ds.iter_batches(batch_size=SHARD_TEXTS, batch_format="numpy")):
        n_shards = index + 1
        if index in done:
            continue
        ids = [list(map(int, x)) for x in batch["ids"]]
        texts[index] = len(ids)
        todo.append((index, ray.put(ids)))
    if stop_after_shards is not None:
        todo = todo[:stop_after_shards]

    cls = ray.remote(StatsWorker)
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = device != "cpu" and gpus >= workers
    cpus = ray.cluster_resources().get("CPU", 1)
    per = 1 if use_gpu else max(1, int(cpus // workers))
    actors = [cls.options(num_cpus=per, num_gpus=1 if use_gpu else 0, max_restarts=max_restarts,
                          max_task_retries=-1)
              .remote(model_spec or lm.name, dtype, "cuda" if use_gpu else "cpu", zero3, ds_config) for _ in range(min(workers, max(len(todo), 1)))]
    try:
        fps = ray_get([a.fingerprint.remote() for a in actors], start_timeout_s, "starting StatsWorkers")
    except BaseException:
        for a in actors:
            ray.kill(a)
        raise
    if any(fp != lm.fingerprint() for fp in fps):
        for a in actors:
            ray.kill(a)
        raise WorkerFailure("a StatsWorker loaded different weights than the driver: the model path must name "
                            "the same weights on every node")

    free = list(actors)
    pending: dict = {}
    n_tokens, n_new, t0 = 0, 0, time.perf_counter()
    bar = tqdm(unit="tok", unit_scale=True, desc=f"statistics ({workers} workers)", disable=not show_progress)

    def finish(ref) -> None:
        nonlocal n_tokens
        actor = pending.pop(ref)
        index, sums, secs = ray_get(ref, call_timeout_s, "StatsWorker shard")
        _save_shard(pdir / f"shard-{index:05d}.safetensors", sums, texts[index])
        free.append(actor)
        toks = next(iter(sums.values()))[1]
        n_tokens += toks
        bar.update(toks)
        bar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - t0, 1e-9):.0f}")

    def wait_one() -> None:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=call_timeout_s)
        if not ready:
            raise WorkerFailure(f"StatsWorker shard: no answer within {call_timeout_s:g} s (raise "
                                "actor_call_timeout_s if a shard is that slow); finished shards are kept")
        try:
            finish(ready[0])
        except WorkerFailure:
            for ref in list(pending):   # keep what the other workers finish, then fail
                try:
                    finish(ref)
                except Exception:  # noqa: BLE001 - best effort; the first failure is the error
                    pass
            raise

    try:
        for index, ids_ref in todo:
            if not free:
                wait_one()
            actor = free.pop(0)
            pending[actor.run.remote(index, missing, ids_ref, batch_tokens)] = actor
            n_new += 1
        while pending:
            wait_one()
    finally:
        bar.close()
        for a in actors:
            ray.kill(a)
    dt = time.perf_counter() - t0
    log.info("statistics: %d new tokens in %.1fs (%.0f tokens/s) with %d workers", n_tokens, dt,
             n_tokens / max(dt, 1e-9), workers)
    if stop_after_shards is not None and n_new >= stop_after_shards and len(done) + n_new < n_shards:
        return {"interrupted": True, "shards_done": len(done) + n_new}
    shard_files = sorted(pdir.glob("shard-*.safetensors"))
    have = sorted(int(p.stem.split("-")[1]) for p in shard_files)
    if have != list(range(n_shards)):
        raise WorkerFailure(f"statistics shards {sorted(set(range(n_shards)) - set(have))[:10]} of {n_shards} are "
                            f"missing in {pdir}; run the command again to compute them")
    loaded = [_load_shard(p) for p in shard_files]
    merged = merge_all(m for m, _ in loaded)
    n_texts = sum(t for _, t in loaded)
    for s in missing:
        store.save(specs[s], merged[s], n_texts=n_texts, shards=str(len(shard_files)), workers=str(workers))
        found[s] = merged[s]
    shutil.rmtree(pdir, ignore_errors=True)
    found["_throughput"] = {"tokens": n_tokens, "seconds": dt, "tokens_per_s": n_tokens / max(dt, 1e-9)}
    return found


def _save_shard(path: Path, sums: dict, n_texts: int) -> None:
    from kedit_core.stats.store import _atomic_save

    tensors = {f"sum:{s}": v[0] for s, v in sums.items()}
    meta = {"counts": json.dumps({s: int(v[1]) for s, v in sums.items()}), "texts": str(n_texts)}
    _atomic_save(tensors, meta, path)


def _load_shard(path: Path) -> dict:
    from kedit_core.stats import SecondMoment
    from kedit_core.stats.store import _read

    tensors, meta = _read(path)
    counts = json.loads(meta["counts"])
    return {s: SecondMoment(tensors[f"sum:{s}"], counts[s]) for s in counts}, int(meta.get("texts", 0))
