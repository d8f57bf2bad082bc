"""Python environments in worker processes, behind the batched protocol.

``EnvPool(factory, num_workers)`` splits a batch of episodes over worker processes,
each holding one environment made by ``factory(worker_index)`` (a picklable callable
that returns a :class:`~atod_jax.envs.base.BatchedEnv`). Steps run in parallel.

Failures never reach the caller as exceptions: a worker that raises, dies (even by
``kill -9``) or does not answer within ``step_timeout`` seconds is killed with its whole
process group (environments that start a JVM or a simulator take it with them) and
restarted; the episodes it held come back ``done`` and ``aborted`` (excluded from the
loss, counted in ``EnvPool.stats``). Workers run in their own session and a
watchdog thread in each ends its process group within a second of the parent process
disappearing, even in the middle of a step that never returns, so nothing is left
behind; ``close`` (also run at interpreter exit) stops them all.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import threading
import time
import traceback
import weakref
from typing import Any, Callable, Sequence

import numpy as np

from atod_jax.envs.base import Batch

_PARENT_CHECK_S = 1.0


def _watch_parent(parent_pid: int) -> None:
  """Ends the worker's whole process group once the trainer is gone, even while the
  environment is busy in a step that never returns (a hung simulator)."""
  while True:
    time.sleep(_PARENT_CHECK_S)
    if os.getppid() != parent_pid:
      try:
        os.killpg(os.getpgrp(), signal.SIGKILL)
      finally:
        os._exit(1)


def _worker(conn, factory, index: int, parent_pid: int) -> None:
  os.setsid()  # own process group: the parent can kill it with everything it started
  threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
  try:
    env = factory(index)  # in the trainer's directory: relative paths mean what they say
  except BaseException:  # noqa: BLE001  (report any failure to build)
    conn.send(("error", traceback.format_exc()))
    return
  # then play in a private scratch directory: files an environment writes as it plays
  # (a Z-machine game's `save` / `script` commands, whose file name is the policy's next
  # command) land there and are removed at close, not in the user's working directory
  scratch = tempfile.mkdtemp(prefix=f"atod-env-worker{index}-")
  os.chdir(scratch)
  conn.send(("ready", (os.getpid(), scratch)))
  while True:
    if not conn.poll(_PARENT_CHECK_S):
      if os.getppid() != parent_pid:  # orphaned: the trainer is gone
        break
      continue
    try:
      cmd, args = conn.recv()
    except (EOFError, OSError):
      break
    if cmd == "close":
      break
    try:
      result = getattr(env, args[0]) if cmd == "getattr" else getattr(env, cmd)(*args)
      conn.send(("ok", result))
    except BaseException:  # noqa: BLE001  (the parent decides what a failure means)
      conn.send(("error", traceback.format_exc()))
  try:
    env.close()
  finally:
    conn.close()
    shutil.rmtree(scratch, ignore_errors=True)


class _Handle:
  def __init__(self, ctx, factory, index: int, start_timeout: float):
    self.index = index
    self.scratch = None  # the worker's scratch directory, once it is ready
    self.conn, child = ctx.Pipe()
    self.proc = ctx.Process(target=_worker, args=(child, factory, index, os.getpid()),
                            name=f"atod-env-{index}", daemon=True)
    self.proc.start()
    child.close()
    if not self.conn.poll(start_timeout):
      self.kill()
      raise RuntimeError(f"env worker {index} did not start within {start_timeout}s")
    status, payload = self.conn.recv()
    if status != "ready":
      self.kill()
      raise RuntimeError(f"env worker {index} failed to build its environment:\n{payload}")
    self.pid, self.scratch = payload

  def kill(self) -> None:
    try:
      os.killpg(self.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
      pass
    self.proc.join(timeout=5)
    self.conn.close()
    if self.scratch:  # a killed worker cannot remove its own
      shutil.rmtree(self.scratch, ignore_errors=True)


class EnvPool:
  """A :class:`~atod_jax.envs.base.BatchedEnv` over worker processes (see module doc)."""

  def __init__(self, factory: Callable[[int], Any], num_workers: int = 2, *,
               step_timeout: float = 60.0, start_timeout: float = 120.0,
               max_turns: int | None = None, start_method: str = "spawn"):
    if num_workers < 1:
      raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    self._factory = factory
    self._ctx = mp.get_context(start_method)
    self.step_timeout = step_timeout
    self.start_timeout = start_timeout
    self._workers = [_Handle(self._ctx, factory, i, start_timeout) for i in range(num_workers)]
    self.max_turns = max_turns if max_turns is not None else self._query(0, "max_turns")
    self.stats = {"restarts": 0, "aborted_episodes": 0, "timeouts": 0, "crashes": 0,
                  "errors": 0}
    self._slices: list[slice] = []
    self._alive = np.zeros(0, bool)  # per episode: its worker still holds it
    self._done = np.zeros(0, bool)
    self._last: Batch | None = None
    # stops the workers on close(), garbage collection or interpreter exit
    self._finalizer = weakref.finalize(self, EnvPool._shutdown, self._workers)

  # ------------------------------------------------------------------ plumbing
  def _query(self, i: int, name: str):
    self._workers[i].conn.send(("getattr", (name,)))
    if not self._workers[i].conn.poll(self.step_timeout):
      raise RuntimeError(f"env worker {i} did not answer")
    status, payload = self._workers[i].conn.recv()
    if status != "ok":
      raise RuntimeError(payload)
    return payload

  def _restart(self, i: int, why: str) -> None:
    self.stats[why] += 1
    self.stats["restarts"] += 1
    self._workers[i].kill()
    self._workers[i] = _Handle(self._ctx, self._factory, i, self.start_timeout)

  def _broadcast(self, calls: dict[int, tuple[str, tuple]]) -> dict[int, Batch | None]:
    """Sends one call per worker, waits for all; ``None`` where the worker failed."""
    sent = {}
    for i, (cmd, args) in calls.items():
      try:
        self._workers[i].conn.send((cmd, args))
        sent[i] = True
      except (BrokenPipeError, OSError):
        sent[i] = False
    results: dict[int, Batch | None] = {}
    deadline = time.monotonic() + self.step_timeout
    for i in calls:
      w = self._workers[i]
      if not sent[i]:
        self._restart(i, "crashes")
        results[i] = None
        continue
      try:
        ready = w.conn.poll(max(0.0, deadline - time.monotonic()))
        if not ready:
          self._restart(i, "timeouts")
          results[i] = None
          continue
        status, payload = w.conn.recv()
      except (EOFError, OSError):
        self._restart(i, "crashes")
        results[i] = None
        continue
      if status != "ok":
        self._restart(i, "errors")
        results[i] = None
        continue
      results[i] = payload
    return results

  # ------------------------------------------------------------------ protocol
  def reset(self, split: str, task_ids: Sequence[int]) -> Batch:
    task_ids = list(task_ids)
    n = len(task_ids)
    chunks = np.array_split(np.arange(n), len(self._workers))
    self._slices = [slice(int(c[0]), int(c[-1]) + 1) if len(c) else slice(0, 0) for c in chunks]
    calls = {i: ("reset", (split, task_ids[s])) for i, s in enumerate(self._slices)
             if s.stop > s.start}
    results = self._broadcast(calls)
    self._alive = np.ones(n, bool)
    self._done = np.zeros(n, bool)
    self._last = None  # nothing carries over from the previous episodes
    return self._merge(results, n, [{"task_id": t, "split": split} for t in task_ids])

  def step(self, actions: Sequence[str | None]) -> Batch:
    n = len(self._alive)
    if len(actions) != n:
      raise ValueError(f"expected {n} actions, got {len(actions)}")
    calls = {}
    for i, s in enumerate(self._slices):
      if s.stop > s.start and self._alive[s].all():  # the env answers for done episodes
        calls[i] = ("step", (list(actions[s]),))
    results = self._broadcast(calls)
    return self._merge(results, n, None)

  def _merge(self, results: dict[int, Batch | None], n: int, infos) -> Batch:
    prev = self._last
    obs, tasks = [""] * n, [""] * n
    rewards = np.zeros(n, np.float32)
    dones = self._done.copy()
    wons = np.zeros(n, bool) if prev is None or len(prev.wons) != n else prev.wons.copy()
    aborted = ~self._alive
    adm: list[list[str]] | None = [[] for _ in range(n)]
    expert: list[str | None] | None = [None] * n
    out_infos = list(infos) if infos is not None else [{} for _ in range(n)]
    if prev is not None and len(prev.tasks) == n:
      tasks = list(prev.tasks)
    for i, s in enumerate(self._slices):
      idx = range(s.start, s.stop)
      if i not in results:  # nothing asked of this worker (its episodes were aborted)
        continue
      b = results[i]
      if b is None:
        self._alive[s] = False
        fresh = ~self._done[s]
        self.stats["aborted_episodes"] += int(fresh.sum())
        dones[s] = True
        aborted = ~self._alive
        for j in idx:
          obs[j] = "[episode aborted: environment failure]"
        continue
      for k, j in enumerate(idx):
        obs[j] = b.observations[k]
        tasks[j] = b.tasks[k]
        if b.admissible is not None:
          adm[j] = b.admissible[k]
        if b.expert is not None:
          expert[j] = b.expert[k]
        if b.infos:
          out_infos[j] = {**out_infos[j], **b.infos[k]}
      rewards[s] = b.rewards
      dones[s] = b.dones
      wons[s] = b.wons
    self._done = dones.copy()
    batch = Batch(observations=obs, tasks=tasks, rewards=rewards, dones=dones, wons=wons,
                  admissible=adm, expert=expert, aborted=aborted.copy(), infos=out_infos)
    self._last = batch
    return batch

  def call(self, method: str, *args):
    """``getattr(env, method)(*args)`` on worker 0 (a question about the environment,
    e.g. ``num_tasks(split)``); raises if it fails."""
    self._workers[0].conn.send((method, args))
    if not self._workers[0].conn.poll(self.step_timeout):
      raise RuntimeError(f"env worker 0 did not answer {method}")
    status, payload = self._workers[0].conn.recv()
    if status != "ok":
      raise RuntimeError(payload)
    return payload

  def num_tasks(self, split: str) -> int:
    return self.call("num_tasks", split)

  @property
  def worker_pids(self) -> list[int]:
    return [w.pid for w in self._workers]

  @staticmethod
  def _shutdown(workers) -> None:
    for w in workers:
      try:
        w.conn.send(("close", ()))
      except (BrokenPipeError, OSError):
        pass
    for w in workers:
      w.proc.join(timeout=5)
      w.kill()

  def close(self) -> None:
    self._finalizer()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
