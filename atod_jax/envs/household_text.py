"""The on-device household tasks behind the batched text protocol.

The same (split, task id) gives the same task here and on device (``task_key``), and
the same commands give the same episode: text observations are the on-device token
observations decoded, so the host loop and the jitted rollout can be compared exactly.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from atod_jax.envs import household as hh
from atod_jax.envs.base import Batch


def task_key(seed: int, task_id: int | jax.Array) -> jax.Array:
  """The PRNG key of task ``task_id`` (the split picks the goal set, see ``reset``)."""
  return jax.random.fold_in(jax.random.key(seed), task_id)


class HouseholdTextEnv:
  """Batched text protocol over :mod:`atod_jax.envs.household`."""

  def __init__(self, params: hh.HouseholdParams = hh.HouseholdParams(), seed: int = 0,
               with_admissible: bool = True):
    self.params = params
    self.seed = seed
    self.max_turns = params.max_turns
    self.with_admissible = with_admissible
    self._split = None
    self._state = None
    p = params
    self._reset = {s: jax.jit(jax.vmap(lambda k, s=s: hh.reset(p, k, s)))
                   for s in ("train", "heldout")}
    self._step = jax.jit(jax.vmap(lambda st, a: hh.step(p, st, a)))
    self._observe = jax.jit(jax.vmap(lambda st, e: hh.observe(p, st, e)))
    self._task = jax.jit(jax.vmap(hh.task_tokens))
    self._expert = jax.jit(jax.vmap(lambda st: hh.expert_action(st, p.expert == "searching",
                                                               p.skip_ids)))
    self._admissible = jax.jit(jax.vmap(lambda st: hh.admissible(p, st)))

  def _batch(self, obs_tokens, rewards, dones, wons, infos) -> Batch:
    st = self._state
    admissible = None
    if self.with_admissible:
      toks, ok = jax.device_get(self._admissible(st))
      admissible = [[hh.decode(t) .lower() for t, k in zip(toks[i], ok[i]) if k]
                    for i in range(len(ok))]
    expert = [hh.decode(t).lower() for t in np.asarray(self._expert(st))]
    done = np.asarray(dones)
    return Batch(
        observations=[hh.decode(t) for t in np.asarray(obs_tokens)],
        tasks=[hh.decode(t).lower() for t in np.asarray(self._task(st))],
        rewards=np.asarray(rewards, np.float32), dones=done, wons=np.asarray(wons),
        admissible=admissible,
        expert=[None if d else e for e, d in zip(expert, done)],
        aborted=np.zeros(len(done), bool), infos=infos)

  def reset(self, split: str, task_ids: Sequence[int]) -> Batch:
    if split not in self._reset:
      raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    keys = jax.vmap(lambda i: task_key(self.seed, i))(jnp.asarray(task_ids, jnp.int32))
    self._split = split
    self._state = self._reset[split](keys)
    b = len(task_ids)
    events = jnp.tile(hh.initial_event(), (b, 1))
    obs = self._observe(self._state, events)
    return self._batch(obs, np.zeros(b), np.zeros(b, bool), np.zeros(b, bool),
                       [{"task_id": int(i), "split": split} for i in task_ids])

  def step(self, actions: Sequence[str | None]) -> Batch:
    if self._state is None:
      raise RuntimeError("call reset() before step()")
    b = self._state.turn.shape[0]
    if len(actions) != b:
      raise ValueError(f"expected {b} actions, got {len(actions)}")
    tokens = np.stack([hh.encode_action(a or "") for a in actions])
    self._state, out = self._step(self._state, jnp.asarray(tokens))
    obs = self._observe(self._state, out.event)
    infos = [{"invalid": bool(v)} for v in np.asarray(out.invalid)]
    return self._batch(obs, out.reward, out.done, out.won, infos)

  def num_tasks(self, split: str) -> int:
    """Task ids are keys of a generator: any id is a task. A split offers 100,000 (held
    out: 1,000), the ids the trainer draws from."""
    return 100_000 if split == "train" else 1_000

  def close(self) -> None:
    self._state = None


def make_household_env(params: hh.HouseholdParams, seed: int, worker_index: int = 0):
  """A picklable factory for :class:`~atod_jax.envs.pool.EnvPool`: every worker gets the
  same task generator (tasks are fixed by split and task id, not by worker)."""
  del worker_index
  return HouseholdTextEnv(params, seed)


def household_text_env(worker_index: int = 0, *, max_turns: int | None = None,
                       preset: str = "easy", seed: int = 0) -> HouseholdTextEnv:
  """The registry's factory (``env.kind = "household_text"``): the household family as
  text, for a model with its own tokenizer (no data files needed); ``max_turns`` caps
  the preset's limit."""
  del worker_index
  params = hh.HouseholdParams.preset(preset)
  if max_turns is not None:
    params = dataclasses.replace(params, max_turns=min(max_turns, params.max_turns))
  return HouseholdTextEnv(params, seed)
