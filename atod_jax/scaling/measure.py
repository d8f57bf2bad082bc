"""The plan's functions run for real: a config's training step, function by function, on
this machine's devices, each call timed beside the plan's lower bound for it.

:func:`measure` builds the calls :func:`atod_jax.scaling.plan.plan` compiles for a TPU
topology (:func:`~atod_jax.scaling.plan.rollout_calls`,
:func:`~atod_jax.scaling.plan.update_calls`: the same jitted functions the trainer calls,
with the same shardings), makes their arguments as arrays over a mesh of the local
devices, and times each call after a warm-up. The arguments are the plan's worst case:
random weights (the speed does not depend on them), every mask on, every sequence
filling its slots, and no stop token, so each row of a decode takes all
``env.response_len`` tokens. The environment's time is not in it.

The bound is the plan's (each call at the chip's peak FLOP rate or reading HBM at full
bandwidth, whichever is slower), with the ceilings measured in the same run: a square
matmul's FLOP/s in the student's compute dtype and a sum's read bytes/s on one device.
The measured / bound ratio carries across machines; the seconds do not.

    python experiments/measure_step.py --config configs/alfworld_qwen3.py \\
        --student qwen3-0.6b --teacher qwen3-4b
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from atod_jax.scaling import plan as pl
from atod_jax.train.steps import TrainState

@dataclasses.dataclass(frozen=True)
class Timed:
  """One function of the step: its measured time a call and the plan's bound."""

  name: str
  calls: int  # per training step
  seconds: float  # measured, a call (the median of the repeats)
  bound: float  # the plan's lower bound, a call
  compile_seconds: float  # the first call (tracing, compiling, running once)
  flops: float  # per call, all devices together
  tokens: int = 0  # tokens a call generates


@dataclasses.dataclass
class Measurement:
  device: str
  devices: int
  mesh: dict
  chip: pl.Chip  # the measured ceilings
  rows: list[Timed]
  notes: list[str]

  @property
  def step_seconds(self) -> float:
    return sum(r.seconds * r.calls for r in self.rows)

  @property
  def step_bound(self) -> float:
    return sum(r.bound * r.calls for r in self.rows)

  def row(self, name: str) -> Timed:
    return next(r for r in self.rows if r.name == name)

  def table(self) -> str:
    """A markdown table, one line per function, then the step's totals."""
    m, c = self.mesh, self.chip
    lines = [f"{self.devices} x {self.device}, mesh data={m['data']} fsdp={m['fsdp']} "
             f"tensor={m['tensor']}; ceilings measured in this run: {c.peak_flops / 1e9:,.0f} "
             f"GFLOP/s (matmul), {c.hbm_bandwidth / 1e9:,.1f} GB/s (memory read) a device", "",
             "| function | calls/step | ms/call | bound ms/call | measured / bound | s/step "
             "| share | first call s (compiles) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    total = self.step_seconds
    for r in self.rows:
      ratio = f"{r.seconds / r.bound:.1f}" if r.bound > 0 else "-"
      lines.append(f"| {r.name} | {r.calls} | {r.seconds * 1e3:.1f} | {r.bound * 1e3:.2f} "
                   f"| {ratio} | {r.seconds * r.calls:.2f} | {r.seconds * r.calls / total:.0%} "
                   f"| {r.compile_seconds:.1f} |")
    decode = self.row("rollout/decode")
    lines += ["", f"step: {total:.2f} s measured, {self.step_bound:.2f} s bound "
              f"({total / self.step_bound:.1f}x); decode {decode.tokens / decode.seconds:,.0f} "
              f"generated tokens/s ({decode.tokens} a call)"]
    lines += [f"- {n}" for n in self.notes]
    return "\n".join(lines)


def ceilings(dtype, device=None, *, n: int = 0, repeats: int = 5) -> tuple[float, float]:
  """``(FLOP/s, bytes/s)`` of one device: an ``n x n`` matmul in ``dtype`` (4096 on an
  accelerator, 2048 on a CPU) and a sum over 1 GiB (256 MiB on a CPU), which reads every
  byte once and writes nothing."""
  device = device or jax.devices()[0]
  cpu = device.platform == "cpu"
  n = n or (2048 if cpu else 4096)
  a = jax.device_put(jnp.ones((n, n), dtype), device)
  mm = jax.jit(lambda x, y: x @ y)
  flops = 2.0 * n ** 3 / best_time(lambda: mm(a, a), repeats)
  x = jax.device_put(jnp.ones(((256 if cpu else 1024) << 20) // 4, jnp.float32), device)
  total = jax.jit(jnp.sum)
  return flops, x.nbytes / best_time(lambda: total(x), repeats)


def best_time(fn: Callable, repeats: int = 3) -> float:
  """The fastest of ``repeats`` calls of ``fn`` (after one to compile and warm up), in s."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return min(times)


def _is_abstract(x) -> bool:
  return isinstance(x, jax.ShapeDtypeStruct)


def _value(x: jax.ShapeDtypeStruct, key, fill=None) -> jax.Array:
  """``x``'s shape and dtype: ``fill``, else small random floats, zero integers, true
  booleans, a fresh PRNG key."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.split(key, x.shape) if x.shape else key
  if fill is not None:
    return jnp.full(x.shape, fill, x.dtype)
  if jnp.issubdtype(x.dtype, jnp.floating):
    return (0.02 * jax.random.normal(key, x.shape, jnp.float32)).astype(x.dtype)
  return jnp.ones(x.shape, jnp.bool_) if x.dtype == jnp.bool_ else jnp.zeros(x.shape, x.dtype)


class _Slot:
  def __init__(self, i: int):
    self.i = i


def argument_maker(call: pl.Call) -> Callable:
  """``key -> (args, kwargs)``: ``call``'s arguments made real (static ones kept;
  ``call.fills`` applied), every sharded array by one jitted function (compiled once,
  reused for every key). A train state is a fresh one: random parameters, the
  optimizer's state zero (Adam's moments at their start; random ones would give a
  negative second moment)."""
  items = []  # (abstract leaf, fill)

  def slots(tree, fill=None):
    if isinstance(tree, TrainState):
      return TrainState(slots(tree.params, fill), slots(tree.opt_state, 0), slots(tree.step, 0))
    leaves, treedef = jax.tree.flatten(tree, is_leaf=_is_abstract)
    out = []
    for x in leaves:
      if _is_abstract(x):
        out.append(_Slot(len(items)))
        items.append((x, fill))
      else:
        out.append(x)
    return jax.tree.unflatten(treedef, out)

  template = (tuple(slots(a, call.fills.get(i)) for i, a in enumerate(call.args)),
              slots(call.kwargs))
  sharded = [i for i, (x, _) in enumerate(items) if x.sharding is not None]
  make = jax.jit(lambda key: [_value(items[i][0], jax.random.fold_in(key, i), items[i][1])
                              for i in sharded],
                 out_shardings=[items[i][0].sharding for i in sharded])

  def arguments(key):
    values = dict(zip(sharded, make(key)))
    for i, (x, fill) in enumerate(items):  # unsharded: a PRNG key, a scalar
      if i not in values:
        values[i] = _value(x, jax.random.fold_in(key, i), fill)
    return jax.tree.map(lambda v: values[v.i] if isinstance(v, _Slot) else v, template,
                        is_leaf=lambda v: isinstance(v, _Slot))
  return arguments


def run_call(call: pl.Call, key, repeats: int) -> tuple[float, float, object]:
  """``(median seconds a call, first call's seconds, the last call's outputs)``; every
  call gets new arguments (the functions donate some)."""
  arguments = argument_maker(call)
  args, kwargs = jax.block_until_ready(arguments(key))
  t0 = time.perf_counter()
  out = jax.block_until_ready(call.fn(*args, **kwargs))
  first = time.perf_counter() - t0
  times = []
  for r in range(repeats):
    del out
    args, kwargs = jax.block_until_ready(arguments(jax.random.fold_in(key, r + 1)))
    t0 = time.perf_counter()
    out = jax.block_until_ready(call.fn(*args, **kwargs))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), first, out


def measure(config, *, student: str, teacher: str, devices: Sequence | None = None,
            data: int | None = None, fsdp: int | None = None, tensor: int | None = None,
            microbatches: int | None = None, optimizer: str | None = None,
            repeats: int = 3, say: Callable = lambda *a: None,
            keep: Callable[[str, object], None] = lambda name, out: None) -> Measurement:
  """Runs and times each function of ``config``'s training step on ``devices`` (default:
  all local ones). ``student`` / ``teacher`` and the mesh / micro-batch / optimizer
  arguments as :func:`atod_jax.scaling.plan.plan`; ``keep(name, outputs)`` sees each
  function's last outputs."""
  devices = list(devices or jax.devices())
  step = pl.setup_step(config, devices, student=student, teacher=teacher, data=data, fsdp=fsdp,
                   tensor=tensor, microbatches=microbatches, optimizer=optimizer,
                   where=f"{len(devices)} local devices")
  say(f"measuring the ceilings of {devices[0].device_kind}")
  flops, bandwidth = ceilings(step.s_cfg.dtype, devices[0])
  memory = (devices[0].memory_stats() or {}).get("bytes_limit", 0)
  chip = pl.Chip(f"{devices[0].device_kind} (measured)", int(memory), flops, bandwidth)
  calls, note = pl.update_calls(step)
  calls = pl.rollout_calls(step) + calls
  rows = []
  with jax.sharding.use_abstract_mesh(step.mesh.abstract_mesh):  # as the trainer traces
    for i, c in enumerate(calls):
      say(f"running {c.name} ({repeats} timed calls after the first)")
      seconds, first, out = run_call(c, jax.random.key(i), repeats)
      keep(c.name, out)
      del out
      bound = pl.bound_seconds(c.flops, c.hbm_read, chip, len(devices))
      rows.append(Timed(c.name, c.calls, seconds, bound, first, c.flops, c.tokens))
  s, t = step.s_cfg, step.t_cfg
  notes = [f"student {s.num_params() / 1e6:,.1f} M parameters ({s.param_dtype}, compute "
           f"{s.dtype}, remat {s.remat}); teacher {t.num_params() / 1e6:,.1f} M "
           f"({t.param_dtype}, compute {t.dtype})", note,
           "the shapes are the plan's worst case (every turn played, every slot filled, "
           "every answer response_len tokens); the environment's time is not counted"]
  return Measurement(devices[0].device_kind, len(devices), dict(step.mesh.shape), chip, rows,
                     notes)


__all__ = ["Measurement", "Timed", "argument_maker", "best_time", "ceilings", "measure",
           "run_call"]
