"""Multi-process runs with JAX's multi-controller runtime.

A TPU slice of several hosts, a multi-node GPU cluster or several processes on one
machine run one trainer process per host (or per GPU), all executing the same program
on one global mesh of every process's devices. :func:`initialize` calls
``jax.distributed.initialize`` before anything touches a device when the run is
multi-process: ``config.distributed`` says so (``coordinator`` / ``num_processes`` /
``process_id``), or the environment does (``JAX_COORDINATOR_ADDRESS``, a multi-host TPU
VM, SLURM or Open MPI with more than one task), in which case JAX's own cluster
detection fills in what the config leaves empty.

Every process computes every step (the arrays are global); process 0 alone writes the
logs, tables, plots and exports (:func:`is_main`); orbax checkpoints are written and read
by all of them together.
"""
from __future__ import annotations

import os

import jax

from atod_jax.models.sharding import sync  # noqa: F401  (the run's barrier)

_CLUSTER_HINTS = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def _multi_process_environment() -> bool:
  """Whether the environment describes a run of several processes."""
  if any(os.environ.get(k) for k in _CLUSTER_HINTS):
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")  # a multi-host TPU slice
  if len(hosts) > 1 and all(h and " " not in h for h in hosts):
    return True
  for count in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if int(os.environ.get(count, "1") or 1) > 1:
      return True
  return False


def initialize(distributed=None) -> bool:
  """Joins the run's processes (once; before any device is used). ``distributed``: the
  config's section (``coordinator``, ``num_processes``, ``process_id``; empty / 0 / -1:
  from the environment). Returns whether the run is multi-process."""
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  d = dict(distributed or {})
  coordinator = d.get("coordinator") or None
  processes = d.get("num_processes") or None
  process_id = d.get("process_id")
  process_id = None if process_id is None or process_id < 0 else int(process_id)
  if not (coordinator or (processes or 1) > 1 or _multi_process_environment()):
    return False
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=processes,
                             process_id=process_id)
  return jax.process_count() > 1


def is_main() -> bool:
  """Whether this process writes the run's logs and exports (process 0)."""
  return jax.process_index() == 0


def any_process(flag: bool) -> bool:
  """Whether ``flag`` holds in any of the run's processes (this one's alone in a
  single-process run). What a step's end asks before it stops for a signal: a TPU slice
  preempts one host (SIGTERM to one process), and every process must then save the same
  step and stop, or the others wait at the next step's collectives for one that left."""
  if jax.process_count() == 1:
    return bool(flag)
  import numpy as np
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))
