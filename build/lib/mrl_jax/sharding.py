"""Device mesh and shardings for data-parallel and FSDP training.

The mesh has two axes, ``("data", "fsdp")``, over all devices of all
processes; by default every device is on ``"data"`` (``mesh_shape=(-1, 1)``).
Batches are split over both axes together (every device gets its own rows).
Parameters and optimizer state are replicated, except that with an ``"fsdp"``
axis larger than 1 every array of at least ``fsdp_min_size`` elements is split
over ``"fsdp"`` along its largest evenly divisible dimension (ZeRO-3 style;
XLA inserts the all-gathers and reduce-scatters). Axis types are ``Auto`` so
that ordinary jitted code needs no sharding annotations.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
DEFAULT_MESH_SHAPE = (-1, 1)
# Arrays smaller than this stay replicated under FSDP: splitting them saves
# little memory and costs a collective each.
DEFAULT_FSDP_MIN_SIZE = 2**16


def resolve_mesh_shape(mesh_shape: Sequence[int] | None, num_devices: int) -> tuple[int, int]:
  """``(data, fsdp)`` sizes from a config's ``mesh_shape`` (one entry may be ``-1``).

  Raises:
    ValueError: naming ``config.mesh_shape`` when it is malformed or its
      product is not ``num_devices``.
  """
  shape = DEFAULT_MESH_SHAPE if mesh_shape is None else tuple(mesh_shape)
  where = f"config.mesh_shape={tuple(shape)} (axes {MESH_AXES})"
  if len(shape) != len(MESH_AXES) or not all(
      isinstance(n, int) and not isinstance(n, bool) and (n >= 1 or n == -1) for n in shape):
    raise ValueError(f"{where} must be two positive ints, one of which may be -1")
  if shape.count(-1) > 1:
    raise ValueError(f"{where}: at most one axis may be -1")
  known = math.prod(n for n in shape if n != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"{where} does not divide the {num_devices} devices")
    shape = tuple(num_devices // known if n == -1 else n for n in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"{where} needs {math.prod(shape)} devices but there are {num_devices}")
  return shape


def make_mesh(mesh_shape: Sequence[int] | None = None,
              devices: Sequence[Any] | None = None) -> Mesh:
  """A ``("data", "fsdp")`` mesh over ``devices`` (default: every device of every process).

  Args:
    mesh_shape: ``(data, fsdp)``; one entry may be ``-1`` (the rest of the
      devices). ``None`` means ``(-1, 1)``: pure data parallelism.
    devices: the devices to use; ``jax.make_mesh`` orders them for the
      physical topology (TPU rings).
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_mesh_shape(mesh_shape, len(devices))
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh(shape, MESH_AXES, axis_types=(auto, auto), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``"data"`` and ``"fsdp"`` together."""
  return NamedSharding(mesh, PartitionSpec(MESH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device."""
  return NamedSharding(mesh, PartitionSpec())


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int) -> PartitionSpec:
  """The spec of one array of ``shape``: split over ``"fsdp"`` or replicated.

  An array is split when ``fsdp_size > 1``, it has at least ``min_size``
  elements and some dimension divides evenly by ``fsdp_size``; the largest
  such dimension (the last one on ties) is split.
  """
  if fsdp_size <= 1 or math.prod(shape) < min_size:
    return PartitionSpec()
  candidates = [i for i, n in enumerate(shape) if n % fsdp_size == 0]
  if not candidates:
    return PartitionSpec()
  axis = max(candidates, key=lambda i: (shape[i], i))
  return PartitionSpec(*(FSDP_AXIS if i == axis else None for i in range(len(shape))))


def state_shardings(abstract_state: Any, mesh: Mesh,
                    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE) -> Any:
  """A ``NamedSharding`` per leaf of ``abstract_state`` (arrays or ``ShapeDtypeStruct``).

  The rule depends only on each leaf's shape, so a parameter and its
  optimizer moments always get the same sharding.
  """
  if isinstance(fsdp_min_size, bool) or not isinstance(fsdp_min_size, int) or fsdp_min_size < 0:
    raise ValueError(f"config.fsdp_min_size must be a non-negative int, got {fsdp_min_size!r}")
  fsdp_size = mesh.shape[FSDP_AXIS]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp_size, fsdp_min_size)),
      abstract_state)



def as_global(batch: Any, sharding: Any) -> Any:
  """A pytree of per-process numpy arrays -> global ``jax.Array`` s sharded by ``sharding``."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def prefetch_to_device(batches: Iterator[Any], to_global: Callable[[Any], Any],
                       size: int = 2) -> Iterator[Any]:
  """Yield ``to_global(batch)`` with ``size`` batches already sent to the devices.

  The transfers are asynchronous, so the next batches travel while the
  current step computes.
  """
  queue: collections.deque = collections.deque()
  for batch in batches:
    queue.append(to_global(batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
