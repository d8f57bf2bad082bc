"""One mesh (data, fsdp, tensor) and logical-axis rules that place parameters on it."""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx
from flax.linen import logical_to_mesh_axes
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# Logical axis -> mesh axis. Parameters are split over fsdp along the hidden ("embed")
# axis and over tensor along heads / MLP / vocabulary; the batch over data and fsdp.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("expert", None),
    ("head_dim", None),
    ("norm", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``(data, fsdp, tensor)`` mesh; ``-1`` for data (or else for fsdp) takes the
  remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  if fsdp == -1 and data != -1:
    if len(devices) % (data * tensor):
      raise ValueError(f"{len(devices)} devices do not split into data={data} x tensor={tensor}")
    fsdp = len(devices) // (data * tensor)
  if data == -1:
    if len(devices) % (fsdp * tensor):
      raise ValueError(f"{len(devices)} devices do not split into fsdp={fsdp} x tensor={tensor}")
    data = len(devices) // (fsdp * tensor)
  if data * fsdp * tensor != len(devices):
    raise ValueError(f"mesh {data}x{fsdp}x{tensor} needs {data * fsdp * tensor} devices, "
                     f"have {len(devices)}")
  return jax.make_mesh((data, fsdp, tensor), MESH_AXES, devices=devices,
                       axis_types=(AxisType.Auto,) * 3)


def spec_for(shape: Sequence[int], logical_axes, mesh: Mesh, rules=DEFAULT_RULES) -> P:
  """PartitionSpec for an array with these logical axes; an axis whose size the mesh
  axes do not divide stays replicated (e.g. 2 KV heads on 4 tensor devices)."""
  spec = logical_to_mesh_axes(tuple(logical_axes), rules)
  out = []
  for dim, axis in zip(shape, spec):
    names = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    out.append(axis if names and dim % size == 0 else None)
  return P(*out)


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES,
                    memory_kind: str | None = None):
  """NamedShardings for every variable of an (abstract or concrete) NNX state;
  ``memory_kind="pinned_host"`` keeps the shards in the host memory of their devices
  (an offloaded teacher: the decoder copies each layer to the device as it uses it)."""
  def one(var):
    axes = getattr(var, "logical_axes", None) or (None,) * len(var.shape)
    return NamedSharding(mesh, spec_for(var.shape, axes, mesh, rules), memory_kind=memory_kind)
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def leaf_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES,
                   memory_kind: str | None = None):
  """:func:`state_shardings` with exactly ``state``'s tree structure (a sharding per
  array leaf), for ``jax.tree.map`` alongside the state."""
  return jax.tree.unflatten(jax.tree.structure(state),
                            jax.tree.leaves(state_shardings(state, mesh, rules, memory_kind)))


def place(tree, shardings):
  """``jax.device_put(tree, shardings)`` that also works in a multi-process run, where a
  sharding spans other processes' devices: a value this process holds whole (numpy, or
  on its own devices; the same in every process) is cut into this process's shards;
  an array already spread over the processes is resharded."""
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def one(x, sharding):
    if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
      return jax.device_put(x, sharding)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # keys travel as their data
      return jax.random.wrap_key_data(one(jax.random.key_data(x), sharding),
                                      impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: one(x, shardings), tree)
  # the shardings' tree may stop above the arrays (a sharding per nnx.Variable)
  return jax.tree.map(lambda sh, sub: jax.tree.map(lambda x: one(x, sh), sub), shardings, tree,
                      is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
  """Moves every parameter of ``model`` to its sharding on ``mesh`` (in place)."""
  state = nnx.state(model)
  shardings = state_shardings(state, mesh, rules)
  values = jax.tree.map(lambda v: v[...], state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  nnx.update(model, place(values, shardings))
  return model


def constrain_batch(x: jax.Array, rules=DEFAULT_RULES) -> jax.Array:
  """``x`` (``[batch, ...]`` activations) with its rows over the mesh's batch axes
  (data and fsdp) when traced under a mesh (``jax.set_mesh``: the trainer and the plan
  trace so); unchanged without one, or when those axes do not divide the rows.

  This is FSDP's layout: each device computes its own rows with the layer's weights
  gathered to it. Left to itself the compiler may instead keep the weights in place and
  split the activations along the hidden axis, which leaves the MLP's activations whole
  on every device: the plan of a 4B student's update slice held a copy of them on each
  of 8 chips."""
  names = traced_batch_axes(x.shape[0], rules)
  if not names:
    return x
  return jax.lax.with_sharding_constraint(x, P(names, *([None] * (x.ndim - 1))))


def traced_batch_axes(rows: int, rules=DEFAULT_RULES) -> tuple[str, ...]:
  """The axes of the mesh traced under (``jax.set_mesh`` / ``use_abstract_mesh``) that
  hold ``rows`` batch rows (data and fsdp, those of size > 1), or ``()`` without a mesh,
  when they are all of size 1, or when they do not divide ``rows``."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  axis = logical_to_mesh_axes(("batch",), rules)[0]
  names = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
  names = tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)
  size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
  return () if size == 1 or rows % size else names


def traced_batch_shards(rows: int, rules=DEFAULT_RULES) -> int:
  """How many devices share ``rows`` batch rows under the mesh traced under
  (:func:`traced_batch_axes`): a jitted function sees global shapes, each device holds
  ``rows // traced_batch_shards(rows)`` of them."""
  mesh = jax.sharding.get_abstract_mesh()
  return int(np.prod([mesh.shape[a] for a in traced_batch_axes(rows, rules)]))


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=DEFAULT_RULES) -> NamedSharding:
  """Sharding of a ``[batch, ...]`` array: batch over the data axes."""
  return NamedSharding(mesh, P(logical_to_mesh_axes(("batch",), rules)[0], *([None] * (ndim - 1))))


def shard_batch(tree, mesh: Mesh, rules=DEFAULT_RULES):
  """Places every ``[batch, ...]`` array of a pytree with its batch axis over the data
  axes (a batch the data axes do not divide stays replicated)."""
  def put(x):
    size = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
    spec = batch_sharding(mesh, x.ndim, rules) if x.shape[0] % size == 0 else \
        NamedSharding(mesh, P())
    return place(x, spec)
  return jax.tree.map(put, tree)


def host_values(tree):
  """A pytree of arrays as numpy arrays in this process: those it can read whole (on its
  own devices, or replicated) are read; others (split over several processes' devices)
  are gathered from all processes first (every process must call it then)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  def split(x) -> bool:  # over several processes' devices: gathered
    return isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated)

  def one(x):
    if not split(x):
      return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  if any(split(x) for x in jax.tree.leaves(tree)):
    sync("gathering")  # (see :func:`sync`: a collective is no barrier on CPUs)
  return jax.tree.map(one, tree)


_BARRIER_TIMEOUT_MS = 60 * 60 * 1000
_barriers = 0


def sync(name: str) -> None:
  """Waits until every process gets here (a no-op in a single-process run): a barrier
  of the coordination service, which waits up to an hour for a process that is busy
  (writing the run's files, compiling). On CPUs a collective is no such barrier: the
  first one over a new set of devices fails when a process comes 30 s after another
  (gloo's deadline for setting up its communicator)."""
  global _barriers
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # what orbax's barriers use too
  client = jax_distributed.global_state.client
  if client is None:  # not joined through jax.distributed: a collective does it
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
    return
  _barriers += 1  # a barrier's id is used once; every process counts the same calls
  client.wait_at_barrier(f"atod_jax:{_barriers}:{name}", _BARRIER_TIMEOUT_MS)


class RowSplit:
  """The rows of a global ``[size, ...]`` batch (rows over the mesh's data axes, as
  :func:`shard_batch` places them) that this process holds: in a multi-process run
  each process plays its own rows' episodes on the host, and the device computations
  run on the global arrays. ``local``: this process's row indices (contiguous).

  ``mesh=None`` (or one process): every row is local and the arrays stay as given.
  """

  def __init__(self, mesh: Mesh | None, size: int):
    self.mesh, self.size = mesh, size
    self.multi = mesh is not None and jax.process_count() > 1
    if not self.multi:
      self.local = np.arange(size)
      return
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if size % shards:
      raise ValueError(f"a multi-process batch of {size} rows must split evenly over the "
                       f"{shards} devices of the mesh's data axes")
    index = batch_sharding(mesh, 1).addressable_devices_indices_map((size,))
    rows = sorted({r for sl in index.values() for r in range(*sl[0].indices(size))})
    if rows != list(range(rows[0], rows[-1] + 1)):
      raise ValueError("this process's rows of the batch are not contiguous; build the mesh "
                       "with make_mesh (devices in process order)")
    self.local = np.asarray(rows)

  def put(self, tree):
    """Local rows (numpy) -> global arrays (one process: :func:`shard_batch`)."""
    if not self.multi:
      return tree if self.mesh is None else shard_batch(tree, self.mesh)

    def one(x):
      x = np.asarray(x)
      return jax.make_array_from_process_local_data(batch_sharding(self.mesh, x.ndim), x,
                                                    (self.size, *x.shape[1:]))
    return jax.tree.map(one, tree)

  def get(self, tree):
    """Global arrays -> this process's rows, as numpy."""
    if not self.multi:
      return jax.device_get(tree)

    def one(x):  # this process's shards in row order (each block once)
      parts = {shard.index[0].start or 0: shard.data for shard in x.addressable_shards}
      return np.concatenate([np.asarray(parts[k]) for k in sorted(parts)])
    return jax.tree.map(one, tree)

  def any(self, flags) -> bool:
    """Whether any row of any process has its flag set (every process must call it)."""
    local = bool(np.any(flags))
    if not self.multi:
      return local
    from jax.experimental import multihost_utils
    sync("any row")  # (see :func:`sync`: a collective is no barrier on CPUs)
    return bool(np.any(multihost_utils.process_allgather(np.asarray([local]))))


def all_processes(items: list) -> list:
  """Every process's ``items`` (JSON-able) joined in process order (one process: as
  is); every process must call it."""
  if jax.process_count() == 1:
    return list(items)
  import json
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(items).encode(), np.uint8)
  sync("all processes' items")  # (see :func:`sync`: a collective is no barrier on CPUs)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size]))).ravel()
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[:data.size] = data
  every = np.asarray(multihost_utils.process_allgather(padded[None])).reshape(-1, padded.size)
  out = []
  for row, n in zip(every, sizes):
    out.extend(json.loads(bytes(row[:int(n)]).decode()))
  return out


class Together:
  """A jitted function whose first call with each new signature (array shapes, dtypes
  and shardings; the other arguments' values) is compiled on its own and then waits for
  every process (:func:`sync`) before it runs; the call then finds the compiled program
  in JAX's cache. In a multi-process run on CPUs a process that reaches a collective
  more than 30 s after another fails (gloo's deadline for setting up a communicator; in
  XLA's gloo code also every reduce-scatter's), and on a loaded machine one process can
  compile the same program that much slower than another. A single-process call, or one
  inside a trace, goes straight to the function. Everything else (``lower``, ...) is the function's."""

  def __init__(self, fn):
    self.fn = fn
    self._seen: set = set()

  def __getattr__(self, name):
    return getattr(self.fn, name)

  def __call__(self, *args, **kwargs):
    if jax.process_count() == 1:
      return self.fn(*args, **kwargs)
    leaves, tree = jax.tree.flatten((args, kwargs))
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
      return self.fn(*args, **kwargs)
    signature = (tree, tuple(_signature(x) for x in leaves))
    if signature not in self._seen:
      self.fn.lower(*args, **kwargs).compile()
      sync(f"compiled {getattr(self.fn, '__name__', 'a function')}")
      self._seen.add(signature)
    return self.fn(*args, **kwargs)


def _signature(x):
  if isinstance(x, jax.Array):
    return ("array", x.shape, x.dtype, x.sharding)
  if isinstance(x, np.ndarray):
    return ("numpy", x.shape, x.dtype)
  try:
    hash(x)
  except TypeError:
    return ("object", type(x))
  return ("value", type(x), x)
