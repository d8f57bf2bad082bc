"""Multi-process training (atod_jax.train.distributed): 2 processes with 4 CPU devices
each, joined by jax.distributed on localhost (gloo collectives), give the records and
final parameters of 1 process with 8 devices: for the on-device household run (every
process computes the same global step) and for a text environment (each process plays
its own rows' episodes in its own worker pool). Run with ``pytest -m multiprocess``
(the README's test command does, after the default suite)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = [pytest.mark.multiprocess, pytest.mark.long, pytest.mark.xdist_group("multiprocess")]
TIMING = ("step_seconds", "tokens_per_s")


def _port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(workdir, processes: int, devices: int, config: str, *overrides):
  """The processes, each writing its output to ``<workdir>.<i>.log`` (a file: a pipe
  nobody reads while they run would fill and stop them)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  port = _port()
  procs = []
  for i in range(processes):
    log = f"{workdir}.{i}.log"
    with open(log, "w") as out:  # (the process holds its own)
      p = subprocess.Popen(
          [sys.executable, "-m", "atod_jax.main", f"--config={config}", f"--workdir={workdir}",
           *overrides, f"--config.distributed.num_processes={processes}",
           f"--config.distributed.process_id={i}",
           f"--config.distributed.coordinator={'localhost:%d' % port if processes > 1 else ''}"],
          cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    p.log = log
    procs.append(p)
  return procs


def _logs(procs) -> list[str]:
  out = []
  for p in procs:
    with open(p.log) as f:
      out.append(f.read())
  return out


def _run(workdir, processes: int, devices: int, config: str, *overrides, timeout=900):
  """Runs the processes to their end; fails with each one's output when one fails or
  they are still running after ``timeout`` seconds (one left waiting at a barrier for a
  failed one, which is killed then: its log says why)."""
  procs = _start(workdir, processes, devices, config, *overrides)
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and any(p.poll() is None for p in procs):
    time.sleep(0.5)
  hung = [i for i, p in enumerate(procs) if p.poll() is None]
  for i in hung:
    procs[i].kill()
  for p in procs:
    p.wait()
  logs = _logs(procs)
  report = "\n".join(f"process {i} (exit {procs[i].returncode}):\n{_excerpt(logs[i])}"
                     for i in range(processes))
  assert not hung, f"processes {hung} still running after {timeout} s, killed:\n{report}"
  assert all(p.returncode == 0 for p in procs), report
  return logs


def _excerpt(log: str) -> str:
  """The first error of a process's output (a crash's later abort hides it) and its end."""
  first = log.find("Traceback (most recent call last)")
  head = log[first:first + 2500] + "\n[...]\n" if first >= 0 else ""
  return head + log[-1500:]


def _same_value(x, y) -> bool:
  """A record's field: numbers to 1e-5 (relative or absolute), lists item by item, anything
  else (a string, a bool, None) by equality. pytest.approx refuses strings since 9.2."""
  if isinstance(x, bool) or isinstance(y, bool) or x is None or y is None:
    return x is y or x == y
  if isinstance(x, (int, float)) and isinstance(y, (int, float)):
    return abs(x - y) <= max(1e-5, 1e-5 * abs(y)) or (x != x and y != y)
  if isinstance(x, list) and isinstance(y, list):
    return len(x) == len(y) and all(_same_value(u, v) for u, v in zip(x, y))
  return type(x) is type(y) and x == y


def _same_run(one, two):
  """Equal records (but the timings) and final parameters."""
  def records(w):
    with open(os.path.join(w, "metrics.jsonl")) as f:
      return [json.loads(line) for line in f]
  a, b = records(one), records(two)
  assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
  assert len([r for r in a if r["kind"] == "train"]) == 2
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      if not (k.startswith("seconds/") or k in TIMING):
        assert _same_value(x[k], y[k]), (x["kind"], x["step"], k, x[k], y[k])
  with ocp.StandardCheckpointer() as ckpt:
    p1 = ckpt.restore(os.path.join(one, "student", "params"))
    p2 = ckpt.restore(os.path.join(two, "student", "params"))
  for u, v in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=1e-5)
  return a


def test_household_two_processes_equal_one_and_resume_after_kill(tmp_path):
  """... and 2 processes killed (SIGKILL) during step 2, once the step-1 checkpoint is
  written, then started again (both restore the orbax checkpoint both wrote) end with
  bit-identical training records and parameters."""
  config = os.path.join(ROOT, "tests", "train", "tiny_config.py")
  two = _run(tmp_path / "two", 2, 4, config, "--config.train.steps=2")
  _run(tmp_path / "one", 1, 8, config, "--config.train.steps=2")
  records = _same_run(tmp_path / "one", tmp_path / "two")
  assert records[-1]["kind"] == "eval"
  assert "wrote" in two[0] and "wrote" not in two[1]  # process 0 speaks and writes
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["1", "2"]

  again = tmp_path / "again"
  procs = _start(again, 2, 4, config, "--config.train.steps=2")
  deadline = time.monotonic() + 600
  while not os.path.isdir(again / "checkpoints" / "1"):  # orbax renames it when complete
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
        [log[-2000:] for p, log in zip(procs, _logs(procs)) if p.poll() is not None]
    time.sleep(0.02)
  for p in procs:
    p.send_signal(signal.SIGKILL)
  for p in procs:
    p.wait()
  assert not os.path.exists(again / "summary.json")  # killed before the run's end
  resumed = _run(again, 2, 4, config, "--config.train.steps=2")
  assert "resuming from the checkpoint at step 1" in resumed[0]

  def train(w):
    with open(os.path.join(w, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if not (k.startswith("seconds/") or k in TIMING)}
            for r in rows if r["kind"] == "train"]
  assert train(tmp_path / "again") == train(tmp_path / "two")
  with ocp.StandardCheckpointer() as ckpt:
    p1 = ckpt.restore(os.path.join(tmp_path / "two", "student", "params"))
    p2 = ckpt.restore(os.path.join(tmp_path / "again", "student", "params"))
  for u, v in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.slow  # three 2-process runs, about 6 min on 2 cores: beyond CI's budget
def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes(tmp_path):
  """A preempted host: SIGTERM to process 1 alone, during the run. Both processes finish
  the step, save the same checkpoint and exit 130; started again, the run ends with the
  training records and parameters of an uninterrupted one."""
  config = os.path.join(ROOT, "tests", "train", "tiny_config.py")
  steps = "--config.train.steps=3"
  _run(tmp_path / "ref", 2, 4, config, steps)
  work = tmp_path / "work"
  procs = _start(work, 2, 4, config, steps)
  deadline = time.monotonic() + 600
  while not os.path.isdir(work / "checkpoints" / "1"):
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
        [log[-2000:] for p, log in zip(procs, _logs(procs)) if p.poll() is not None]
    time.sleep(0.02)
  procs[1].send_signal(signal.SIGTERM)
  for p in procs:
    p.wait(timeout=600)
  logs = _logs(procs)
  assert [p.returncode for p in procs] == [130, 130], [_excerpt(x) for x in logs]
  saved = sorted(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit())
  assert saved and saved[-1] < 3 and not os.path.exists(work / "summary.json")
  assert "interrupted: saved the checkpoint at step" in logs[0]
  resumed = _run(work, 2, 4, config, steps)
  assert f"resuming from the checkpoint at step {saved[-1]}" in resumed[0]

  def train(w):
    with open(os.path.join(w, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if not (k.startswith("seconds/") or k in TIMING)}
            for r in rows if r["kind"] == "train"]
  assert train(work) == train(tmp_path / "ref")
  with ocp.StandardCheckpointer() as ckpt:
    p1 = ckpt.restore(os.path.join(tmp_path / "ref", "student", "params"))
    p2 = ckpt.restore(os.path.join(work, "student", "params"))
  for u, v in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


SMALL = ["--config.train.steps=2", "--config.train.eval_every=2",
         "--config.train.checkpoint_every=1", "--config.teacher.build.sft_steps=3",
         "--config.teacher.build.select_episodes=8", "--config.teacher.build.demo_episodes=8",
         "--config.student.sft.steps=2", "--config.student.sft.demo_episodes=8",
         "--config.env.tokenizer_episodes=4", "--config.rollout.tasks_per_step=4",
         "--config.rollout.group_size=2", "--config.eval.episodes=8", "--config.env.eval_batch=8"]


def test_text_environment_two_processes_equal_one(tmp_path):
  pytest.importorskip("bm25s")
  config = os.path.join(ROOT, "configs", "searchqa_tiny.py")
  _run(tmp_path / "two", 2, 4, config, *SMALL)
  _run(tmp_path / "one", 1, 8, config, *SMALL)
  records = _same_run(tmp_path / "one", tmp_path / "two")
  assert all(r["turns"] >= 1 for r in records if r["kind"] == "train")


def test_hf_student_and_teacher_sharded_over_two_processes_equal_one(tmp_path):
  """configs/searchqa_qwen3.py (shrunk): HF student and teacher read straight onto an
  fsdp axis of all 8 devices that spans both processes (each process reads its own
  blocks of every tensor), the windowed chat prompts, pi_old recomputed, the HF export
  written by process 0."""
  pytest.importorskip("bm25s")
  from atod_jax.envs.searchqa import default_data_dir
  from atod_jax.models import load_pretrained
  from tests.train.qwen3_dir import tiny_qwen3_dir

  hotpot = os.path.join(default_data_dir(), "searchqa", "hotpot_distractor",
                        "hotpot_dev_distractor_100.json")
  if not os.path.exists(hotpot):
    pytest.skip("shared data not found")
  hf, _ = tiny_qwen3_dir(str(tmp_path))
  config = os.path.join(ROOT, "configs", "searchqa_qwen3.py")
  args = [f"--config.student.path={hf}", f"--config.teacher.path={hf}",
          "--config.student.model.dtype=float32", "--config.teacher.model.dtype=float32",
          "--config.teacher.model.param_dtype=float32", f"--config.env.options.corpus={hotpot}",
          "--config.env.workers=2", "--config.env.prompt_len=256",
          "--config.env.response_len=16", "--config.env.eval_batch=8",
          "--config.optim.microbatches=2", "--config.rollout.tasks_per_step=4",
          "--config.rollout.group_size=2", "--config.optim.minibatches=2",
          "--config.optim.learning_rate=1e-3", "--config.train.steps=2",
          "--config.train.eval_every=2", "--config.eval.episodes=8"]
  two = _run(tmp_path / "two", 2, 4, config, *args)
  _run(tmp_path / "one", 1, 8, config, *args)
  _same_run(tmp_path / "one", tmp_path / "two")
  assert "student_hf" in os.listdir(tmp_path / "two") and "wrote" not in two[1]
  a = load_pretrained(str(tmp_path / "one" / "student_hf"), dtype="float32")
  b = load_pretrained(str(tmp_path / "two" / "student_hf"), dtype="float32")
  for u, v in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=1e-5)


LATE = """
import sys, time
import jax
import numpy as np
from jax.experimental import multihost_utils
from atod_jax.train import distributed
distributed.initialize({"coordinator": sys.argv[1], "num_processes": 2,
                        "process_id": int(sys.argv[2])})
if jax.process_index() == 0:
  time.sleep(float(sys.argv[3]))  # process 0 writing plots, or compiling, on a loaded machine
if sys.argv[4] == "sync":
  distributed.sync("late")
if sys.argv[4] == "together":  # the first program with a collective, compiled apart
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from atod_jax.models.sharding import Together, make_mesh
  mesh = make_mesh()  # one device a process: data = 2
  x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")),
                                             np.asarray([jax.process_index() + 1.0]), (2,))
  total = Together(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P())))(x)
  print(int(np.asarray(total.addressable_data(0))))  # 1 + 2
else:
  print(multihost_utils.process_allgather(np.arange(2) + jax.process_index()).sum())
"""


# CI runs "together" (the wrapper of every jitted step, which waits at the barrier "sync"
# tests alone); "sync" and "none" (the plain collective that fails) are slow: these runs
# are serial on one worker, the long suite's critical path
@pytest.mark.parametrize("barrier", [pytest.param("sync", marks=pytest.mark.slow), "together",
                                     pytest.param("none", marks=pytest.mark.slow)])
def test_a_process_40s_late_is_waited_for(tmp_path, barrier):
  """distributed.sync is a barrier of the coordination service: a process that gets to
  it 40 s after the other is waited for (up to an hour), and the collective after it
  starts together; so does the first call of a program compiled apart by
  models.sharding.Together (the trainer's jitted steps and host gathers). Without
  either, the first collective over a new set of devices fails: gloo sets up its
  communicator with a 30 s deadline (this case shows that the test's 40 s matter)."""
  script = tmp_path / "late.py"
  script.write_text(LATE)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  port = _port()
  outs = [open(tmp_path / f"{i}.log", "w") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, str(script), f"localhost:{port}", str(i), "40",
                             barrier], cwd=ROOT, env=env, stdout=outs[i],
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  for f in outs:  # (the processes hold their own)
    f.close()
  if barrier != "none":
    for p in procs:
      p.wait(timeout=600)
    logs = [(tmp_path / f"{i}.log").read_text() for i in range(2)]
    assert all(p.returncode == 0 for p in procs), [_excerpt(g) for g in logs]
    expected = {"sync": "4", "together": "3"}[barrier]  # (0 + 1) + (1 + 2); 1 + 2
    assert [g.strip().splitlines()[-1] for g in logs] == [expected, expected]
  else:  # process 1 fails at 30 s (then both wait for each other at shutdown, for minutes)
    deadline = time.monotonic() + 300
    failure = "Gloo context initialization failed"
    while (failure not in (tmp_path / "1.log").read_text() and time.monotonic() < deadline
           and procs[1].poll() is None):
      time.sleep(0.5)
    for p in procs:
      p.kill()
      p.wait()
    log = (tmp_path / "1.log").read_text()
    assert failure in log, _excerpt(log)
