"""A tiny Python environment with faults chosen by task id, for the worker-pool tests.

Task ids: 100 raises inside step, 200 hangs inside step, 300 kills its own process,
400 starts a child process at reset (like an environment that launches a JVM), 500
writes a file into its working directory at every step (like a Z-machine game's `save`).
Every other episode wins on its third step. Faults fire on the second step.
"""
import os
import subprocess
import time

import numpy as np

from atod_jax.envs.base import Batch


class FaultyEnv:
  max_turns = 5

  def __init__(self, worker_index: int = 0):
    self.worker_index = worker_index
    self.children = []

  def _batch(self, rewards, dones, wons):
    return Batch(observations=[f"t={t} id={i}" for i, t in zip(self.ids, self.t)],
                 tasks=[f"task {i}" for i in self.ids], rewards=np.asarray(rewards, np.float32),
                 dones=np.asarray(dones), wons=np.asarray(wons),
                 infos=[{"pid": os.getpid(), "cwd": os.getcwd()} for _ in self.ids])

  def reset(self, split, task_ids):
    self.ids, self.t = list(task_ids), [0] * len(task_ids)
    if 400 in self.ids:
      self.children.append(subprocess.Popen(["sleep", "1000"]))
    n = len(self.ids)
    return self._batch(np.zeros(n), np.zeros(n, bool), np.zeros(n, bool))

  def step(self, actions):
    self.t = [t + 1 for t in self.t]
    if 500 in self.ids:
      with open("transcript", "a") as f:
        f.write(" ".join(actions) + "\n")
    for i, t in zip(self.ids, self.t):
      if t == 2 and i == 100:
        raise RuntimeError("simulated failure inside step")
      if t == 2 and i == 200:
        time.sleep(3600)
      if t == 2 and i == 300:
        os._exit(3)
    wins = np.array([t == 3 for t in self.t])
    return self._batch(wins.astype(float), wins | (np.array(self.t) >= self.max_turns), wins)

  def close(self):
    for c in self.children:
      c.kill()
