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

import logging
import os
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)


class StaleReplica(RuntimeError):
    """The replica's weights are not the version the driver expects."""


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
        return {"pid": os.getpid(), "device": str(self.lm.device), "zero3": self.lm.zero3,
                "source": self.lm.source, "version": self.version}

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
        return self.version

    def load_weights(self, version: int, weights: dict[str, torch.Tensor]) -> int:
        """Set the edited sites to the driver's current weights (recovery of a restarted
        replica, or a resumed stream)."""
        from kedit_core.apply import read_weights, write_weights

        new = [s for s in weights if s not in self.applier.originals]
        self.applier.originals.update(read_weights(self.lm, new))
        write_weights(self.lm, weights)
        self.version = version
        return version

    def weights_hash(self) -> str:
        from kedit_core.models.loader import iter_full_state
        from pipelines.checkpoint import tensors_hash

        return tensors_hash(dict(iter_full_state(self.lm)))

    def targets(self, version: int, requests, zcfg):
        self._check(version)
        return self.backend.targets(requests, zcfg)

    def layer_moments(self, version: int, requests, targets, layer, last, share, applied):
        self._check(version)
        return self.backend.layer_moments(requests, targets, layer, last, share, applied)

    def key_moments(self, version: int, requests, layers, applied):
        self._check(version)
        return self.backend.key_moments(requests, layers, applied)

    # ------------------------------------------------------------- evaluation (pipelines.evaluation)
    def evaluate_units(self, version: int, sites_hash: str, sites: list[str], units, baseline):
        """Per-request metric values of each (requests, generation) unit on this replica,
        after checking that its edited sites hold exactly the driver's weights (their sha256
        is `sites_hash`; else StaleReplica, and the driver sends it the current weights)."""
        from kedit_core.apply import read_weights
        from kedit_core.evaluate.metrics import request_values
        from pipelines.checkpoint import tensors_hash

        self._check(version)
        if tensors_hash(read_weights(self.lm, sites, "cpu")) != sites_hash:
            raise StaleReplica(f"replica at version {self.version} holds other weights than the driver's")
        return [request_values(self.lm, reqs, baseline=baseline, generation=gen) for reqs, gen in units]

    def memory(self) -> dict:
        """This process's resident memory now and at its peak (MB)."""
        from pipelines.evaluation import rss_mb

        return rss_mb()


class RayBackend:
    """methods.common.LocalBackend's interface, sharded over EditWorker actors: each gets a
    contiguous share of the batch; targets are concatenated and moments added (float64) in
    share order, so the result does not depend on which worker finishes first."""

    def __init__(self, workers: list, snapshot, *, call_timeout_s: float = 3600.0):
        self.workers = workers
        self.snapshot = snapshot        # () -> {site: current weight} of the driver
        self.version = 0
        self.recoveries = 0
        self.call_timeout_s = call_timeout_s

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
        """Run `method` on each (worker, args); a stale replica is given the current
        weights and the call is repeated."""
        import ray

        refs = [getattr(w, method).remote(self.version, *args) for w, args in jobs]
        out = []
        for (w, args), ref in zip(jobs, refs):
            for attempt in range(3):
                try:
                    out.append(self._get(ref, method))
                    break
                except ray.exceptions.RayTaskError as e:
                    if isinstance(e.cause, WorkerFailure):
                        raise WorkerFailure(str(e.cause)) from None
                    if not isinstance(e.cause, StaleReplica) or attempt == 2:
                        raise
                    log.warning("worker replica is stale (%s): sending it the current weights", e.cause)
                    self._reload(w)
                    ref = getattr(w, method).remote(self.version, *args)
        return out

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


def start_edit_workers(n: int, model: str, dtype: str, device: str, chunk: int, *, zero3: bool = False,
                       ds_config=None, fingerprint: str | None = None, max_restarts: int = 3,
                       start_timeout_s: float = 600.0) -> list:
    """n EditWorker actors (one GPU each when the cluster has enough, else one CPU each),
    restarted by Ray at most `max_restarts` times if their process dies (their calls are
    retried); each must load the weights whose fingerprint is `fingerprint` within
    `start_timeout_s`. A worker that cannot start is killed with the others and raises
    WorkerFailure (or the worker's BadInputError)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = device != "cpu" and gpus >= n
    cpus = ray.cluster_resources().get("CPU", 1)
    per = 1 if use_gpu else max(1, int(cpus // max(n, 1)))
    cls = ray.remote(EditWorker).options(num_cpus=per, num_gpus=1 if use_gpu else 0,
                                         max_restarts=max_restarts, max_task_retries=-1)
    workers = [cls.remote(model, dtype, "cuda" if use_gpu else "cpu", chunk, zero3, ds_config, fingerprint)
               for _ in range(n)]
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
