"""ScienceWorld behind the batched text protocol (install the ``scienceworld`` extra; it
runs its simulator in a Java 11+ virtual machine).

A task id of a split is one (task, variation) pair: the split's variations of every
selected task, in task order (ScienceWorld's own train / dev / test variation splits,
so "train" here is what the benchmark trains on). The simulator runs with the ``easy``
simplifications (teleport, doors open, self-watering pots, no electrical actions), and
its valid-action list comes with every observation as the admissible commands (a
simplified subset: the parser accepts more, and gold paths use actions outside it, so
``info["invalid"]`` marks what the parser rejected). The
expert follows ScienceWorld's gold path; once the agent leaves it there is no expert
command (the simulator cannot re-plan). The reward is 1.0 on the step the task is
completed with score 100; ``info["score"]`` has the simulator's 0-100 progress score
(-100 when the task failed). Each episode slot holds one simulator.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from atod_jax.envs.base import Batch, start_step

SPLITS = ("train", "dev", "test")
UNKNOWN_ACTION = "No known action matches that input."


class ScienceWorldEnv:
  """Args:
    tasks: task names (default: all 30), e.g. ``("find-living-thing", "boil")``.
    simplifications: ScienceWorld's simplification string ("easy" by default).
    max_turns: 100.
    max_variations: keep at most this many variations per task and split (None: all).
  """

  def __init__(self, tasks: Sequence[str] | None = None, *, simplifications: str = "easy",
               max_turns: int = 100, max_variations: int | None = None):
    if max_turns < 1:
      raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    from scienceworld import ScienceWorldEnv as _Sim  # the `scienceworld` extra
    self._Sim = _Sim
    self.max_turns = max_turns
    self.simplifications = simplifications
    self.max_variations = max_variations
    self._slots: list = []
    self._probe = self._new_sim()
    names = list(self._probe.get_task_names())
    unknown = [t for t in (tasks or ()) if t not in names]
    if unknown:
      raise ValueError(f"unknown ScienceWorld tasks {unknown}; known: {names}")
    self.tasks = list(tasks) if tasks else names
    self._variations: dict[str, list[tuple[str, int]]] = {}

  def _new_sim(self):
    return self._Sim("", envStepLimit=self.max_turns + 10)

  def variations(self, split: str) -> list[tuple[str, int]]:
    """The (task, variation) pairs of ``split``; task id i is entry i."""
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split not in self._variations:
      pairs = []
      for task in self.tasks:
        self._probe.load(task, 0, self.simplifications)
        found = {"train": self._probe.get_variations_train, "dev": self._probe.get_variations_dev,
                 "test": self._probe.get_variations_test}[split]()
        found = sorted(found)[:self.max_variations]
        pairs += [(task, int(v)) for v in found]
      self._variations[split] = pairs
    return self._variations[split]

  def num_tasks(self, split: str) -> int:
    return len(self.variations(split))

  def _slot(self, i: int):
    while len(self._slots) <= i:
      self._slots.append(self._new_sim())
    return self._slots[i]

  def _batch(self, observations, rewards, infos) -> Batch:
    live = ~self._done
    expert = [None] * len(live)
    for i in np.flatnonzero(live):
      if self._on_path[i] and self._pos[i] < len(self._gold[i]):
        expert[i] = self._gold[i][self._pos[i]]
    return Batch(observations=observations, tasks=list(self._tasks),
                 rewards=np.asarray(rewards, np.float32), dones=self._done.copy(),
                 wons=self._won.copy(),
                 admissible=[list(v) if d else [] for v, d in zip(self._valid, live)],
                 expert=expert, aborted=np.zeros(len(live), bool), infos=infos)

  def reset(self, split: str, task_ids: Sequence[int]) -> Batch:
    pairs = self.variations(split)
    bad = [t for t in task_ids if not 0 <= t < len(pairs)]
    if bad:
      raise ValueError(f"task ids {bad[:5]} out of range for split {split!r} "
                       f"({len(pairs)} task variations)")
    n = len(task_ids)
    self._turn = np.zeros(n, int)
    self._done = np.zeros(n, bool)
    self._won = np.zeros(n, bool)
    self._pos = np.zeros(n, int)
    self._on_path = np.ones(n, bool)
    self._tasks, self._gold, self._valid, obs, infos = [], [], [], [], []
    for i, t in enumerate(task_ids):
      task, variation = pairs[t]
      sim = self._slot(i)
      sim.load(task, variation, self.simplifications, generateGoldPath=True)
      ob, info = sim.reset()
      self._tasks.append(sim.get_task_description())
      self._gold.append(list(sim.get_gold_action_sequence()))
      self._valid.append(list(info["valid"]))
      obs.append(ob.strip())
      infos.append({"task_id": int(t), "split": split, "task_name": task,
                    "variation": variation, "score": int(info["score"])})
    return self._batch(obs, np.zeros(n), infos)

  def step(self, actions: Sequence[str | None]) -> Batch:
    n = len(self._tasks)
    obs, rewards, infos = start_step(actions, n)
    for i, action in enumerate(actions):
      if self._done[i]:
        continue
      action = " ".join((action or "").split())
      if self._on_path[i] and self._pos[i] < len(self._gold[i]) and \
          action == self._gold[i][self._pos[i]]:
        self._pos[i] += 1
      else:
        self._on_path[i] = False
      ob, _, done, info = self._slots[i].step(action)
      self._valid[i] = list(info["valid"])
      self._turn[i] += 1
      score = int(info["score"])
      if done and score >= 100:
        rewards[i], self._won[i] = 1.0, True
      self._done[i] = bool(done) or self._turn[i] >= self.max_turns
      obs[i] = ob.strip()
      # the valid-action list is a simplified subset (gold paths leave it), so an action
      # is invalid when the parser rejects it, not when the list lacks it
      infos[i] = {"invalid": ob.startswith(UNKNOWN_ACTION), "score": score}
    return self._batch(obs, rewards, infos)

  def close(self) -> None:
    for sim in self._slots + [self._probe]:
      try:
        sim.close()
      except Exception:  # noqa: BLE001  (the JVM may already be gone)
        pass
      sim.close = lambda: None  # its __del__ closes again and would print a broken pipe
    self._slots = []


def scienceworld_env(worker_index: int = 0, **kwargs) -> ScienceWorldEnv:
  """:class:`ScienceWorldEnv` as an :class:`~atod_jax.envs.pool.EnvPool` factory."""
  del worker_index
  return ScienceWorldEnv(**kwargs)
