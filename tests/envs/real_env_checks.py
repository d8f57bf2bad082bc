"""Checks every real environment passes: its expert through a 2-worker pool gives what
it gives in process, a worker killed with SIGKILL mid-episode aborts only its own
episodes and is replaced, and the expert's episodes build the demonstrations dataset."""
import os
import signal

import numpy as np

from atod_jax.data.demos import (
    build_demonstrations, collect_expert_episodes, decode_episode, load_demonstrations)
from atod_jax.envs.pool import EnvPool


def play_expert(env, split, task_ids):
  """Runs the expert; returns (first observations, wons, per-episode reward sums)."""
  batch = env.reset(split, task_ids)
  first = list(batch.observations)
  total = np.zeros(len(task_ids))
  while not batch.dones.all():
    batch = env.step([None if d else e for d, e in zip(batch.dones, batch.expert)])
    total += batch.rewards
  return first, batch.wons.copy(), total


def check_pool(factory, split, task_ids, local=None, step_timeout=120.0):
  """``task_ids`` has 4 ids; worker 0 plays the first two, worker 1 the last two."""
  assert len(task_ids) == 4
  with EnvPool(factory, num_workers=2, step_timeout=step_timeout,
               start_timeout=300.0) as pool:
    first, wons, total = play_expert(pool, split, task_ids)
    assert wons.all(), wons
    np.testing.assert_allclose(total, 1.0)
    if local is not None:
      l_first, l_wons, l_total = play_expert(local, split, task_ids)
      assert l_first == first
      np.testing.assert_array_equal(l_wons, wons)
      np.testing.assert_allclose(l_total, total)
    # kill -9 of worker 0 after one step: its two episodes abort, the others go on to win
    batch = pool.reset(split, task_ids)
    batch = pool.step(batch.expert)
    os.kill(pool.worker_pids[0], signal.SIGKILL)
    while not batch.dones.all():
      batch = pool.step([None if d else e for d, e in zip(batch.dones, batch.expert)])
    np.testing.assert_array_equal(batch.aborted, [True, True, False, False])
    np.testing.assert_array_equal(batch.wons, [False, False, True, True])
    assert pool.stats["crashes"] == 1 and pool.stats["aborted_episodes"] == 2
    # the replaced worker serves the next episodes
    _, wons, _ = play_expert(pool, split, task_ids)
    assert wons.all()


def check_demonstrations(env, split, task_ids, tmp_path, name):
  episodes = list(collect_expert_episodes(env, split, task_ids, batch_size=len(task_ids)))
  assert len(episodes) == len(task_ids) and all(ep["won"] for ep in episodes)
  build_demonstrations(episodes, tmp_path, name)
  source = load_demonstrations(tmp_path, name, split)
  assert len(source) == len(task_ids)
  got = decode_episode(source[0])
  want = next(ep for ep in episodes if ep["task_id"] == got["task_id"])
  assert got["actions"] == want["actions"] and got["task"] == want["task"]
  assert got["observations"] == want["observations"] and got["won"]
  return episodes
