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
  """A ``(data, fsdp, tensor)`` mesh; ``-1`` for data takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
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


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for every variable of an (abstract or concrete) NNX state."""
  def one(var):
    axes = getattr(var, "logical_axes", None) or (None,) * len(var.shape)
    return NamedSharding(mesh, spec_for(var.shape, axes, mesh, rules))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def leaf_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
  """:func:`state_shardings` with exactly ``state``'s tree structure (a sharding per
  array leaf), for ``jax.tree.map`` alongside the state."""
  return jax.tree.unflatten(jax.tree.structure(state),
                            jax.tree.leaves(state_shardings(state, mesh, rules)))


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
  """Moves every parameter of ``model`` to its sharding on ``mesh`` (in place)."""
  state = nnx.state(model)
  shardings = state_shardings(state, mesh, rules)
  values = jax.tree.map(lambda v: v[...], state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  nnx.update(model, jax.device_put(values, shardings))
  return model


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
    return jax.device_put(x, spec)
  return jax.tree.map(put, tree)
