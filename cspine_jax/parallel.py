"""Devices, hosts and shardings: one `data` mesh axis over every device of every process.

Multi-host: `initialize(...)` calls `jax.distributed.initialize` before any other JAX op, from
explicit flags or from what JAX detects (SLURM, TPU pods, ...). CPU processes on one machine use
JAX's CPU collectives (gloo), enabled here.
"""
from __future__ import annotations

import math

from absl import logging
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA = 'data'


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> None:
  """Starts the multi-process runtime; a no-op for a single process."""
  explicit = coordinator_address or (num_processes or 1) > 1
  if not explicit and not auto:
    return
  # Without this, CPU computations across processes have no collectives (GPU/TPU unaffected).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()  # cluster auto-detection
  logging.info('process %d of %d, %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh() -> jax.sharding.Mesh:
  """(data,) over all devices; Auto axes so that XLA propagates shardings inside the step."""
  return jax.make_mesh((jax.device_count(),), (DATA,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


PARAM_SHARDINGS = ('replicate', 'fsdp')  # config.param_sharding


def param_sharding(mesh, tree, mode: str = 'replicate', min_size: int = 2**18):
  """Shardings for a pytree of arrays (or ShapeDtypeStructs).

  'replicate': every leaf on every device (data parallel). 'fsdp': leaves of at least
  ``min_size`` elements are split along their largest axis divisible by the device count (XLA
  all-gathers them inside the step), the rest replicated: the memory of large configs scales
  down with the number of devices.
  """
  n = mesh.shape[DATA]
  if mode not in PARAM_SHARDINGS:
    raise ValueError(f'param_sharding={mode!r}: expected "replicate" or "fsdp"')

  def one(leaf):
    shape = getattr(leaf, 'shape', ())
    if mode == 'replicate' or n == 1 or math.prod(shape) < min_size:
      return replicated(mesh)
    axes = sorted(range(len(shape)), key=lambda a: -shape[a])
    for a in axes:
      if shape[a] % n == 0:
        spec = [None] * len(shape)
        spec[a] = DATA
        return NamedSharding(mesh, P(*spec))
    return replicated(mesh)

  return jax.tree.map(one, tree)


def host_value(x) -> np.ndarray:
  """A (possibly multi-host, replicated) jax.Array as numpy on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))
