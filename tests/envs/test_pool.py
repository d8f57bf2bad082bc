"""Worker-pool fault tests: exceptions, hangs, crashes and kill -9 abort only the
episodes of the failed worker; nothing is left running."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from atod_jax.envs.pool import EnvPool
from tests.envs.faulty_env import FaultyEnv


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # a zombie counts as gone
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split()[2] != "Z"
  except FileNotFoundError:
    return False


def _descendants(pid):
  out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,pgid="], capture_output=True, text=True)
  rows = [tuple(map(int, line.split())) for line in out.stdout.splitlines()]
  kids, frontier = set(), {pid}
  while frontier:
    frontier = {p for p, pp, _ in rows if pp in frontier} - kids
    kids |= frontier
  return kids


@pytest.mark.parametrize("fault,stat", [(100, "errors"), (200, "timeouts"), (300, "crashes")])
def test_fault_aborts_only_that_workers_episodes(fault, stat):
  with EnvPool(FaultyEnv, num_workers=2, step_timeout=3.0) as pool:
    batch = pool.reset("train", [fault, 1, 2, 3])  # worker 0: [fault, 1], worker 1: [2, 3]
    first_pids = pool.worker_pids
    for _ in range(3):
      batch = pool.step(["act"] * 4)
    np.testing.assert_array_equal(batch.aborted, [True, True, False, False])
    np.testing.assert_array_equal(batch.wons, [False, False, True, True])
    assert batch.dones.all()
    assert pool.stats[stat] == 1 and pool.stats["restarts"] == 1
    assert pool.stats["aborted_episodes"] == 2
    assert not _alive(first_pids[0]) and pool.worker_pids[0] != first_pids[0]
    # the restarted worker serves the next episodes normally
    pool.reset("train", [5, 6, 7, 8])
    for _ in range(3):
      batch = pool.step(["act"] * 4)
    assert batch.wons.all() and not batch.aborted.any()


def test_kill_minus_9_of_a_worker_mid_episode():
  with EnvPool(FaultyEnv, num_workers=2, step_timeout=3.0) as pool:
    pool.reset("train", [1, 2, 3, 4])
    pool.step(["a"] * 4)
    os.kill(pool.worker_pids[1], signal.SIGKILL)
    batch = pool.step(["a"] * 4)
    np.testing.assert_array_equal(batch.aborted, [False, False, True, True])
    batch = pool.step(["a"] * 4)
    np.testing.assert_array_equal(batch.wons, [True, True, False, False])
    assert pool.stats["crashes"] == 1


def test_close_leaves_no_process_behind():
  pool = EnvPool(FaultyEnv, num_workers=2, step_timeout=3.0)
  pool.reset("train", [400, 1, 2, 3])  # worker 0 starts a `sleep` child, like a JVM
  procs = set(pool.worker_pids).union(*(_descendants(p) for p in pool.worker_pids))
  assert len(procs) == 3
  pool.step(["a"] * 4)
  pool.close()
  time.sleep(0.5)
  assert not [p for p in procs if _alive(p)]


def test_hung_worker_with_child_is_killed_with_its_group():
  with EnvPool(FaultyEnv, num_workers=1, step_timeout=2.0) as pool:
    pool.reset("train", [400, 200])  # one worker: starts a child, then hangs at step 2
    procs = set(pool.worker_pids) | _descendants(pool.worker_pids[0])
    assert len(procs) == 2
    pool.step(["a", "a"])
    t0 = time.monotonic()
    batch = pool.step(["a", "a"])
    assert time.monotonic() - t0 < 10
    assert batch.aborted.all()
    time.sleep(0.5)
    assert not [p for p in procs if _alive(p)]  # worker and its `sleep` child are gone


def test_workers_exit_when_the_trainer_is_killed(tmp_path):
  script = textwrap.dedent(f"""
      import os, signal, sys
      sys.path.insert(0, {os.getcwd()!r})
      from atod_jax.envs.pool import EnvPool
      from tests.envs.faulty_env import FaultyEnv
      pool = EnvPool(FaultyEnv, num_workers=2)
      pool.reset("train", [400, 1])
      print(" ".join(map(str, pool.worker_pids)), flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
  """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
  pids = [int(p) for p in out.stdout.split()]
  assert len(pids) == 2
  deadline = time.time() + 10
  while time.time() < deadline and any(_alive(p) for p in pids):
    time.sleep(0.2)
  assert not any(_alive(p) for p in pids)


@pytest.mark.long
def test_household_tasks_through_the_pool_match_in_process():
  import functools

  from atod_jax.envs import household as hh
  from atod_jax.envs.household_text import HouseholdTextEnv, make_household_env

  params = hh.HouseholdParams.preset("medium")
  local = HouseholdTextEnv(params, seed=3)
  with EnvPool(functools.partial(make_household_env, params, 3), num_workers=2) as pool:
    assert pool.max_turns == params.max_turns
    a, b = local.reset("heldout", [4, 5, 6]), pool.reset("heldout", [4, 5, 6])
    while not a.dones.all():
      assert a.observations == b.observations and a.expert == b.expert
      assert a.admissible == b.admissible
      a, b = local.step(a.expert), pool.step(b.expert)
      np.testing.assert_array_equal(a.rewards, b.rewards)
    assert b.wons.all() and not b.aborted.any()


def test_a_worker_hung_in_a_step_exits_when_the_trainer_is_killed():
  """The watchdog thread: the worker is stuck in a step that never returns, so only
  something outside the step can notice the parent is gone."""
  script = textwrap.dedent(f"""
      import os, signal, sys, threading
      sys.path.insert(0, {os.getcwd()!r})
      from atod_jax.envs.pool import EnvPool
      from tests.envs.faulty_env import FaultyEnv
      pool = EnvPool(FaultyEnv, num_workers=1, step_timeout=600.0)
      pool.reset("train", [400, 200])  # a child process like a JVM, then a hang at step 2
      pool.step(["a", "a"])
      print(" ".join(map(str, pool.worker_pids)), flush=True)
      threading.Timer(2.0, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
      pool.step(["a", "a"])  # hangs in the worker; the trainer is killed meanwhile
  """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120)
  pids = [int(p) for p in out.stdout.split()]
  assert len(pids) == 1
  procs = set(pids) | _descendants(pids[0])
  deadline = time.time() + 10
  while time.time() < deadline and any(_alive(p) for p in procs):
    time.sleep(0.2)
  assert not any(_alive(p) for p in procs)


def test_files_an_environment_writes_stay_out_of_the_working_directory(tmp_path, monkeypatch):
  """A game that writes files as it plays (Frotz's `save` / `script` take the policy's
  next command as the file name) writes into its worker's scratch directory, removed
  when the pool closes, and relative paths given to the factory still resolve from the
  trainer's directory."""
  monkeypatch.chdir(tmp_path)
  with EnvPool(FaultyEnv, num_workers=2, step_timeout=10.0) as pool:
    pool.reset("train", [500, 1, 2, 3])
    batch = pool.step(["look"] * 4)
    scratch = {info["cwd"] for info in batch.infos}
    assert len(scratch) == 2 and str(tmp_path) not in scratch
    written = os.path.join(batch.infos[0]["cwd"], "transcript")
    assert os.path.exists(written)
  assert not os.listdir(tmp_path)  # nothing landed in the user's directory
  assert not any(os.path.exists(d) for d in scratch)  # and the scratch folders are gone
