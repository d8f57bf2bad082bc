"""Episodes of an environment written in JAX (:class:`~atod_jax.envs.base.DeviceEnv`):
every rollout is one jitted call (:func:`atod_jax.rollout.device.rollout`)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from atod_jax.envs import registry
from atod_jax.models.sharding import Together, shard_batch
from atod_jax.rollout.device import DeviceRollout, rollout
from atod_jax.rollout.trajectory import Trajectory, summarize
from atod_jax.sampling.generate import SamplingParams
from atod_jax.train import steps
from atod_jax.train.streams import Stream, key as stream_key

TRAIN_SPLIT, EVAL_SPLIT = "train", "heldout"


@functools.lru_cache(maxsize=None)
def rollout_fn(graphdef, spec: DeviceRollout, split: str, sampling: SamplingParams | None,
               expert_noise: float = 0.0, invalid_penalty: float = 0.0):
  """A jitted ``(params, task_keys, key, group_ids) -> Trajectory`` (``sampling=None``:
  the expert plays and ``params`` is ignored)."""
  def run(params, task_keys, key, group_ids):
    model = None if sampling is None else nnx.merge(graphdef, params)
    return rollout(model, spec, task_keys, key, split=split, sampling=sampling,
                   group_ids=group_ids, expert_noise=expert_noise,
                   invalid_penalty=invalid_penalty)
  return Together(jax.jit(run))


def task_keys(key: jax.Array, tasks: int, group: int):
  """``tasks`` task keys drawn from ``key``, each repeated ``group`` times, and the
  group ids."""
  keys = jax.random.split(key, tasks)
  return jnp.repeat(keys, group, axis=0), jnp.repeat(jnp.arange(tasks, dtype=jnp.int32), group)


class DeviceSource:
  """A :class:`~atod_jax.train.sources.TaskSource` over a device env of the registry
  (``env.kind``), with ``env.obs_len`` words of each answer kept."""

  def __init__(self, config, mesh=None):
    e = config.env
    env = registry.resolve(registry.get(e.kind).device)(e)
    self.spec = DeviceRollout(env, e.obs_len)
    self.mesh = mesh
    self.penalty = float(e.invalid_penalty)
    self.max_turns = self.spec.max_turns
    self.name = e.kind + (f"-{e.preset}" if "preset" in e else "")

  def train_batch(self, graphdef, params, task_key, policy_key, sampling: SamplingParams,
                  tasks: int, group_size: int) -> Trajectory:
    keys, groups = task_keys(task_key, tasks, group_size)
    if self.mesh is not None:
      keys, groups = shard_batch((keys, groups), self.mesh)
    run = rollout_fn(graphdef, self.spec, TRAIN_SPLIT, sampling, 0.0, self.penalty)
    return run(params, keys, policy_key, groups)

  def expert_demos(self, key, episodes: int, noise: float = 0.0) -> Trajectory:
    k_tasks, k_expert = jax.random.split(key)
    keys, groups = task_keys(k_tasks, episodes, 1)
    return rollout_fn(None, self.spec, TRAIN_SPLIT, None, float(noise), self.penalty)(
        None, keys, k_expert, groups)

  def evaluate(self, graphdef, params, *, episodes: int, temperature: float, seed: int,
               split: str | None = None, batch: int = 256,
               teacher: tuple | None = None) -> dict[str, float]:
    """Episodes of ``split`` (default ``"heldout"``: goal combinations never trained on;
    ``"train"``: new tasks of the training goals, a validation set) in batches of
    ``batch``: the tasks from ``(seed, EVAL_TASKS)``, batch ``b``'s sampling from
    ``(seed, EVAL_POLICY, b)``. With ``teacher`` (``(graphdef, params)``), also the
    exact KL between the two models on these episodes (:func:`~atod_jax.train.steps.kl_metrics`)."""
    fn = rollout_fn(graphdef, self.spec, split or EVAL_SPLIT,
                    SamplingParams(temperature=temperature), 0.0, self.penalty)
    keys, groups = task_keys(stream_key(seed, Stream.EVAL_TASKS), episodes, 1)
    sums: dict[str, float] = {}
    kl = None
    for start in range(0, episodes, batch):
      sl = slice(start, start + batch)
      traj = fn(params, keys[sl], stream_key(seed, Stream.EVAL_POLICY, start), groups[sl])
      for k, v in jax.device_get(summarize(traj)).items():
        sums[k] = sums.get(k, 0.0) + float(v) * len(keys[sl])
      if teacher is not None:
        kl = steps.add_sums(kl, steps.jit_turn_kl_sums(graphdef, params, *teacher, traj,
                                                       self.max_turns))
    out = {k: v / episodes for k, v in sums.items()}
    return out if kl is None else {**out, **steps.kl_metrics(kl)}

  def close(self):
    pass
