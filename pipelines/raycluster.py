"""Connecting to Ray: the cluster of a submitted job (RAY_ADDRESS), an address given by the
user, or a local instance started in-process (the embedded default)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def usable_cpus() -> int:
    """The cores this process may run on: its CPU affinity (taskset, cpusets, a container's
    cpuset) where the OS reports one, else os.cpu_count(). A local Ray instance advertises
    this many CPUs, so workers x threads never exceed the cores the job was given."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # Inside `ray job submit` the job's runtime_env (working_dir, env_vars) applies.
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=False)
        return
    # "local" starts a fresh instance even where a stale /tmp/ray/ray_current_cluster exists.
    log.info("starting a local Ray instance")
    ray.init(address="local", num_cpus=num_cpus or usable_cpus(), include_dashboard=False,
             log_to_driver=False, configure_logging=True, logging_level=logging.WARNING)
