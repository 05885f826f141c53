"""Ray actors and the helpers that drive them. State lives in the actor (the model is loaded
once in `__init__`); large objects are `ray.put` once; sums are accumulated inside the actor
and returned once.

`EditWorker` holds a model replica kept in step with the driver's weights: after each batch
the driver puts the batch's dense deltas in the object store once and every worker applies
them with the same arithmetic as the driver, so replicas stay bit-identical (a test checks
the hashes). Each call carries the weights version it expects; a replica that is behind (an
actor restarted after its process died) raises `StaleReplica`, and the driver sends it the
edited sites' current weights and retries: the batch then finishes with the same result.

Faults are bounded: every wait on an actor has a timeout (RunConfig.actor_start_timeout_s,
actor_call_timeout_s), an actor process is restarted at most `actor_max_restarts` times, and
an EditWorker refuses to work when its weights' fingerprint differs from the driver's. Each
of these ends the stream with `WorkerFailure` (a one-line message, exit 1) or, when the
worker could not read the user's model, the worker's BadInputError (exit 2); the driver only
writes checkpoints between batches, so the run directory stays resumable.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


class StaleReplica(RuntimeError):
    """The replica's weights are not the version the driver expects."""


class DivergedReplica(RuntimeError):
    """The replica is at the driver's weights version but holds other weights: not staleness
    (a reload would hide it) but a replica changed behind the driver's back."""


class WorkerFailure(RuntimeError):
    """A worker actor cannot go on (died too often, does not answer, wrong weights): the
    message says which and what to do; the run directory stays resumable."""


def ray_get(refs, timeout_s: float, what: str):
    """ray.get with a timeout; a worker that died for good, or does not answer in time,
    becomes a one-line WorkerFailure, and a worker's BadInputError is raised as it is."""
    import ray

    from kedit_core.errors import BadInputError

    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as e:
        raise WorkerFailure(f"{what}: no answer within {timeout_s:g} s (raise actor_start_timeout_s / "
                            "actor_call_timeout_s if the work is that slow); finished work is kept: run the "
                            "command again to resume") from e
    except ray.exceptions.RayActorError as e:
        cause = " ".join(str(e).split())
        init = getattr(e, "actor_init_failed", False)
        raise WorkerFailure(f"{what}: the worker actor died {'on start-up ' if init else ''}and Ray will not "
                            f"restart it again (actor_max_restarts); finished work is kept: run the command again to resume "
                            f"({cause[:240]})") from e
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, BadInputError):
            raise e.cause from None
        if isinstance(e.cause, WorkerFailure):
            raise WorkerFailure(str(e.cause)) from None
        raise


def _set_threads() -> None:
    try:
        import ray

        n = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if n:
            torch.set_num_threads(max(1, int(n)))
    except Exception:  # noqa: BLE001 - outside Ray: keep torch's default
        pass


class EditWorker:
    """One model replica doing its share of a batch's per-request work."""

    def __init__(self, model: str, dtype: str, device: str, chunk: int, zero3: bool = False,
                 ds_config=None, fingerprint: str | None = None):
        from kedit_core.apply import DeltaApplier
        from kedit_core.methods.common import LocalBackend
        from kedit_core.models import load

        from kedit_core.errors import BadInputError

        _set_threads()
        logging.basicConfig(level=logging.INFO)
        self.refused = None
        try:
            self.lm = load(model, dtype=dtype, device=device, zero3=zero3, ds_config=ds_config)
        except BadInputError as e:   # the user's input (a model path this node cannot read): no restart helps
            self.refused = e
            return
        # The replica must start from exactly the driver's weights (checked again after
        # every restart of the process: each call refuses while they differ).
        if fingerprint is not None and self.lm.fingerprint() != fingerprint:
            self.refused = (f"EditWorker on {os.uname().nodename} loaded weights with fingerprint "
                            f"{self.lm.fingerprint()[:12]} for {model!r}, the driver has {fingerprint[:12]}: "
                            "the model path must name the same weights on every node")
        self.backend = LocalBackend(self.lm, chunk)
        self.applier = DeltaApplier(self.lm)
        self.version = 0

    def ready(self) -> int:
        """The process id once the model is loaded; refuses a replica with other weights."""
        self._refuse()
        return os.getpid()

    def _refuse(self) -> None:
        if isinstance(self.refused, Exception):
            raise self.refused
        if self.refused:
            raise WorkerFailure(self.refused)

    def pid(self) -> int:
        return os.getpid()

    def describe(self) -> dict:
        import resource

        return {"pid": os.getpid(), "device": str(self.lm.device), "zero3": self.lm.zero3,
                "source": self.lm.source, "version": self.version, "threads": torch.get_num_threads(),
                "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    def _check(self, version: int) -> None:
        self._refuse()
        if self.version != version:
            raise StaleReplica(f"replica at weights version {self.version}, driver at {version}")

    def sync(self, version: int, deltas) -> int:
        """Apply the deltas that take the replica from `version - 1` to `version`."""
        if self.version == version:
            return self.version
        self._check(version - 1)
        self.applier.apply(deltas)
        self.version = version
        self._sites_hash = None
        return self.version

    def load_weights(self, version: int, weights: dict[str, torch.Tensor]) -> int:
        """Set the edited sites to the driver's current weights (recovery of a restarted
        replica, or a resumed stream)."""
        from kedit_core.apply import read_weights, write_weights

        new = [s for s in weights if s not in self.applier.originals]
        self.applier.originals.update(read_weights(self.lm, new))
        write_weights(self.lm, weights)
        self.version = version
        self._sites_hash = None
        return version

    def weights_hash(self) -> str:
        from kedit_core.models.loader import iter_full_state
        from pipelines.checkpoint import tensors_hash

        return tensors_hash(dict(iter_full_state(self.lm)))

    def targets(self, version: int, requests, zcfg):
        self._check(version)
        return self.backend.targets(requests, zcfg)

    def layer_moments(self, version: int, requests, targets, layer, last, share, applied=()):
        self._check(version)
        return self.backend.layer_moments(requests, targets, layer, last, share, applied)

    def chunk_targets(self, version: int, requests, zcfg, layer, last, share):
        """A chunk's targets and the first edited layer's sums (K K^T, K R^T): one call."""
        self._check(version)
        return self.backend.chunk_targets(requests, zcfg, layer, last, share)

    def key_moments(self, version: int, requests, layers, applied):
        self._check(version)
        return self.backend.key_moments(requests, layers, applied)

    # ------------------------------------------------------------- evaluation (pipelines.evaluation)
    def evaluate_units(self, version: int, sites_hash: str, sites: list[str], units, baseline):
        """Per-request metric values of each (requests, generation) unit on this replica,
        after checking that its edited sites hold exactly the driver's weights (their sha256
        is `sites_hash`; else DivergedReplica: the driver evaluates on its own model and the
        end-of-stream check reports the replica)."""
        from kedit_core.apply import read_weights
        from kedit_core.evaluate.metrics import request_values
        from pipelines.checkpoint import tensors_hash

        self._check(version)
        # hashed once per weights state (sync / load_weights reset it), not once per unit
        cached = getattr(self, "_sites_hash", None)
        if cached is None or cached[0] != tuple(sites):
            cached = self._sites_hash = (tuple(sites), tensors_hash(read_weights(self.lm, sites, "cpu")))
        if cached[1] != sites_hash:
            raise DivergedReplica(f"replica at version {self.version} holds other weights than the driver's")
        return [request_values(self.lm, reqs, baseline=baseline, generation=gen) for reqs, gen in units]

    def memory(self) -> dict:
        """This process's resident memory now and at its peak (MB)."""
        from pipelines.evaluation import rss_mb

        return rss_mb()


class RayBackend:
    """methods.common.LocalBackend's interface over EditWorker actors. A batch is cut into
    chunks of `chunk` requests (at least one per worker, kedit_core.methods.common.
    chunk_bounds); `map` sends them round-robin with at most `depth` calls in flight per
    worker, and yields the results in chunk order, so the driver adds the sums (float64) in
    an order that does not depend on which worker finishes first, and holds no more than
    the calls in flight. `log`: the batch's ChunkLog (the stream sets one per batch)."""

    def __init__(self, workers: list, snapshot, *, call_timeout_s: float = 3600.0, chunk: int = 64,
                 depth: int = 2):
        self.workers = workers
        self.snapshot = snapshot        # () -> {site: current weight} of the driver
        self.version = 0
        self.recoveries = 0
        self.call_timeout_s = call_timeout_s
        self.chunk, self.depth, self.log = chunk, depth, None

    @property
    def parallel(self) -> int:
        return len(self.workers)

    def share(self, obj):
        """One object for every call of a pass (the earlier layers' deltas): put once."""
        import ray

        return ray.put(obj)

    def map(self, method: str, jobs, shared: tuple = ()):
        """`method(version, *job, *shared)` on the workers, round-robin, results in job order."""
        from collections import deque

        jobs = iter(jobs)
        pending: deque = deque()
        k = 0

        def submit() -> bool:
            nonlocal k
            job = next(jobs, None)
            if job is None:
                return False
            w = self.workers[k % len(self.workers)]
            k += 1
            args = (*job, *shared)
            pending.append((w, args, getattr(w, method).remote(self.version, *args)))
            return True

        while len(pending) < self.depth * len(self.workers) and submit():
            pass
        while pending:
            w, args, ref = pending.popleft()
            out = self._result(w, method, args, ref)
            submit()
            yield out

    def _result(self, w, method: str, args: tuple, ref):
        """The result of one call; a stale replica is given the current weights and the call
        is repeated."""
        import ray

        for attempt in range(3):
            try:
                return self._get(ref, method)
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, WorkerFailure):
                    raise WorkerFailure(str(e.cause)) from None
                if isinstance(e.cause, DivergedReplica):
                    raise DivergedReplica(str(e.cause)) from None
                if not isinstance(e.cause, StaleReplica) or attempt == 2:
                    raise
                log.warning("worker replica is stale (%s): sending it the current weights", e.cause)
                self._reload(w)
                ref = getattr(w, method).remote(self.version, *args)

    def _get(self, refs, what: str):
        return ray_get(refs, self.call_timeout_s, f"EditWorker {what}")

    def _reload(self, w) -> None:
        import ray

        self.recoveries += 1
        self._get(w.load_weights.remote(self.version, ray.put(self.snapshot())), "load_weights")

    def gather(self, method: str) -> list:
        """`method()` of every worker (weights_hash, describe), with the call timeout."""
        return self._get([getattr(w, method).remote() for w in self.workers], method)

    # ------------------------------------------------------------- plumbing
    def _shares(self, requests: Sequence) -> list[tuple[object, list]]:
        n, w = len(requests), len(self.workers)
        bounds = [round(i * n / w) for i in range(w + 1)]
        return [(self.workers[i], list(requests[bounds[i]:bounds[i + 1]]))
                for i in range(w) if bounds[i + 1] > bounds[i]]

    def _call(self, method: str, jobs: list[tuple[object, tuple]]) -> list:
        """Run `method` on each (worker, args), all at once (see `_result`)."""
        refs = [getattr(w, method).remote(self.version, *args) for w, args in jobs]
        return [self._result(w, method, args, ref) for (w, args), ref in zip(jobs, refs)]

    def broadcast(self, deltas) -> None:
        """After the driver applied `deltas`: bring every replica to the next version."""
        import ray

        from kedit_core.types import WeightDelta

        dense = [WeightDelta(d.site, dense=d.matrix().float().contiguous()) for d in deltas]
        ref = ray.put(dense)
        self.version += 1
        refs = [w.sync.remote(self.version, ref) for w in self.workers]
        for w, r in zip(self.workers, refs):
            try:
                self._get(r, "sync")
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, WorkerFailure):
                    raise WorkerFailure(str(e.cause)) from None
                if not isinstance(e.cause, StaleReplica):
                    raise
                self._reload(w)

    def load_all(self, version: int) -> None:
        import ray

        self.version = version
        ref = ray.put(self.snapshot())
        self._get([w.load_weights.remote(version, ref) for w in self.workers], "load_weights")

    # ------------------------------------------------------------- the backend interface
    def targets(self, requests, zcfg):
        from kedit_core.zopt import ZResult

        parts = self._call("targets", [(w, (share, zcfg)) for w, share in self._shares(requests)])
        return ZResult(targets=torch.cat([p.targets for p in parts]), init=torch.cat([p.init for p in parts]),
                       losses=[x for p in parts for x in p.losses], steps=[x for p in parts for x in p.steps])

    def chunk_targets(self, requests, zcfg, layer, last, share):
        (out,) = self.map("chunk_targets", [(list(requests), zcfg, layer, last, share)])
        return out

    def layer_moments(self, requests, targets, layer, last, share, applied=()):
        import ray

        applied_ref = ray.put(list(applied))
        jobs, start = [], 0
        for w, part in self._shares(requests):
            jobs.append((w, (part, targets[start:start + len(part)], layer, last, share, applied_ref)))
            start += len(part)
        parts = self._call("layer_moments", jobs)
        KK = sum((p[0] for p in parts[1:]), parts[0][0])
        KR = sum((p[1] for p in parts[1:]), parts[0][1])
        return KK, KR

    def key_moments(self, requests, layers, applied=()):
        import ray

        applied_ref = ray.put(list(applied))
        parts = self._call("key_moments", [(w, (part, list(layers), applied_ref))
                                           for w, part in self._shares(requests)])
        return {l: sum((p[l] for p in parts[1:]), parts[0][l]) for l in layers}


# ------------------------------------------------------------------ how many workers, how many threads
MAX_THREADS_PER_WORKER = 8   # a CPU node with more cores gets several replicas (data parallel over chunks)


@dataclass(frozen=True)
class WorkerPlan:
    """EditWorker actors and torch threads for a cluster (`plan_workers`)."""

    workers: int
    threads: int           # torch threads per worker (= the CPUs Ray reserves for it)
    gpus: int              # GPUs per worker (0 or 1)
    driver_threads: int    # torch threads of the driver
    reason: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan_workers(nodes: Sequence[dict], *, requested: int | str = "auto", device: str = "auto",
                 driver_node: str | None = None, max_threads: int = MAX_THREADS_PER_WORKER) -> WorkerPlan:
    """Workers and threads from the resources Ray reports, as pure logic. `nodes`: one dict
    per alive node, {"id", "CPU", "GPU"}; `driver_node`: the id of the driver's node (default:
    the first).

    auto, GPUs (device not "cpu"): one worker per GPU, each with its node's CPUs / GPUs
    threads (the smallest over GPU nodes).
    auto, CPUs: T = min(max_threads, the smallest node's CPUs) threads per worker and
    floor(CPUs / T) workers on each node, so workers x threads <= cores on every node. The
    driver shares its node's cores by time: it waits while the workers compute (target
    optimisation, keys) and the workers wait while it solves, checkpoints and evaluates,
    so it keeps all its node's cores (driver_threads) and reserves none; one small machine
    gets one worker with all its cores.
    An explicit number: that many workers (GPUs when there are enough), CPUs shared equally
    (a warning when that oversubscribes: more workers than cores)."""
    nodes = [n for n in nodes if n.get("CPU", 0) > 0 or n.get("GPU", 0) > 0]
    if not nodes:
        raise WorkerFailure("Ray reports no node with CPUs or GPUs")
    driver = next((n for n in nodes if n.get("id") == driver_node), nodes[0])
    dcpu = max(1, int(driver.get("CPU", 1)))
    cpus = sum(int(n.get("CPU", 0)) for n in nodes)
    gpus = sum(int(n.get("GPU", 0)) for n in nodes)
    gpu_nodes = [n for n in nodes if int(n.get("GPU", 0)) > 0]
    gpu_threads = max(1, min((int(n.get("CPU", 0)) // int(n["GPU"]) for n in gpu_nodes), default=1))
    where = f"{len(nodes)} node(s), {cpus} CPUs, {gpus} GPUs"
    if requested != "auto":
        n = int(requested)
        if n < 0:
            raise ValueError(f"workers must be 0 or more, got {n}")
        if n == 0:
            return WorkerPlan(0, 0, 0, dcpu, f"workers=0: the driver edits alone with {dcpu} threads ({where})")
        if device != "cpu" and gpus >= n:
            return WorkerPlan(n, gpu_threads, 1, dcpu, f"workers={n}: one GPU each ({where})")
        per = max(1, cpus // n)
        why = f"workers={n}: {per} CPU thread(s) each ({where})"
        if n * per > cpus:
            why += f"; {n} workers on {cpus} cores oversubscribe them: use workers=auto"
            log.warning(why)
        return WorkerPlan(n, per, 0, dcpu, why)
    if device != "cpu" and gpus:
        return WorkerPlan(gpus, gpu_threads, 1, dcpu, f"auto: one worker per GPU, {gpu_threads} threads each ({where})")
    t = max(1, min(max_threads, min(int(n.get("CPU", 0)) for n in nodes if n.get("CPU", 0) > 0)))
    w = sum(int(n.get("CPU", 0)) // t for n in nodes)
    return WorkerPlan(w, t, 0, dcpu, f"auto: {w} worker(s) x {t} threads, floor(cores / {t}) per node; the driver "
                                     f"time-shares its node's {dcpu} cores ({where})")


def cluster_nodes() -> tuple[list[dict], str | None]:
    """The alive nodes' resources as `plan_workers` reads them, and the driver's node id."""
    import ray

    nodes = [{"id": n["NodeID"], "CPU": n["Resources"].get("CPU", 0), "GPU": n["Resources"].get("GPU", 0)}
             for n in ray.nodes() if n.get("Alive")]
    try:
        me = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001
        me = None
    return nodes, me


def start_edit_workers(n: "int | WorkerPlan", model: str, dtype: str, device: str, chunk: int, *,
                       zero3: bool = False, ds_config=None, fingerprint: str | None = None, max_restarts: int = 3,
                       start_timeout_s: float = 600.0) -> list:
    """The EditWorker actors of a WorkerPlan (an int n: `plan_workers(requested=n)` on this
    cluster), each reserving `threads` CPUs (its torch threads) and `gpus` GPUs, restarted by
    Ray at most `max_restarts` times if their process dies (their calls are retried); each
    must load the weights whose fingerprint is `fingerprint` within `start_timeout_s`. A
    worker that cannot start is killed with the others and raises WorkerFailure (or the
    worker's BadInputError)."""
    import ray

    plan = n if isinstance(n, WorkerPlan) else plan_workers(cluster_nodes()[0], requested=n, device=device)
    use_gpu = plan.gpus > 0
    cls = ray.remote(EditWorker).options(num_cpus=plan.threads, num_gpus=plan.gpus,
                                         max_restarts=max_restarts, max_task_retries=-1)
    workers = [cls.remote(model, dtype, "cuda" if use_gpu else "cpu", chunk, zero3, ds_config, fingerprint)
               for _ in range(plan.workers)]
    try:   # wait until every replica is loaded (and holds the driver's weights)
        try:
            ray_get([w.ready.remote() for w in workers], start_timeout_s, "starting EditWorker replicas")
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, WorkerFailure):
                raise WorkerFailure(str(e.cause)) from None
            raise
    except BaseException:
        for w in workers:
            ray.kill(w)
        raise
    return workers
