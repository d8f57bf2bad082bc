"""The trainer end to end: real runs of the CLI, resume after kill -9 and SIGINT, NaN stop,
config errors, and the sharded update."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from atod_jax.models import checkpoint as model_io
from atod_jax.train import METHODS, ConfigError, validate
from atod_jax.train.steps import (Batches, PolicyLoss, checkpoint_item, init_state,
                                  make_optimizer, policy_update)

from tests.train import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "tests", "train", "tiny_config.py")
TIMING = ("step_seconds", "tokens_per_s")


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one device, as a user's laptop
  env["ATOD_JAX_CACHE"] = jax.config.jax_compilation_cache_dir or ""
  env["PYTHONPATH"] = ROOT
  return env


def _cmd(workdir, teacher_dir, *extra):
  return [sys.executable, "-m", "atod_jax.main", f"--config={CONFIG}", f"--workdir={workdir}",
          f"--config.teacher.cache_dir={teacher_dir}", *extra]


def _run(workdir, teacher_dir, *extra, check=True):
  proc = subprocess.run(_cmd(workdir, teacher_dir, *extra), env=_env(), cwd=ROOT,
                        capture_output=True, text=True, timeout=900)
  if check and proc.returncode:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
  return proc


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    recs = [json.loads(line) for line in f if line.strip()]
  return [{k: v for k, v in r.items() if k not in TIMING and not k.startswith("seconds/")}
          for r in recs]


def _student_params(workdir):
  return jax.tree.leaves(model_io.load("checkpoint", os.path.join(workdir, "student"))[1])


def _committed_checkpoints(workdir):
  """Steps of the orbax checkpoints written in full (an unfinished one is a tmp folder)."""
  ckpt = os.path.join(workdir, "checkpoints")
  return [d for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []


def _wait_for_train_records(proc, workdir, n, timeout=600, checkpoint=False):
  """Until ``n`` train records are written (and, with ``checkpoint``, a checkpoint is
  committed: the saves are asynchronous, and on a busy machine the first may still be
  in flight several steps on)."""
  path = os.path.join(workdir, "metrics.jsonl")
  start = time.time()
  while time.time() - start < timeout:
    if proc.poll() is not None:
      raise AssertionError(f"run ended early: {proc.stderr.read()[-2000:]}")
    if os.path.exists(path):
      with open(path) as f:
        if sum('"kind": "train"' in line for line in f) >= n and (
            not checkpoint or _committed_checkpoints(workdir)):
          return
    time.sleep(0.2)
  raise AssertionError("timed out")


# The tests that share the reference run go to one xdist worker (--dist loadgroup).
trainer_group = pytest.mark.xdist_group("trainer")


# session-wide: a module-scoped fixture is torn down whenever the worker running the
# group turns to another module's test, and was built twice a suite (5 min on 2 cores)
@pytest.fixture(scope="session")
def reference(tmp_path_factory):
  """One uninterrupted run (it also builds the shared teacher)."""
  root = tmp_path_factory.mktemp("trainer")
  teacher = str(root / "teacher")
  ref = str(root / "ref")
  proc = _run(ref, teacher)
  return root, teacher, ref, proc


@trainer_group
def test_uninterrupted_run_writes_everything(reference):
  _, teacher, ref, proc = reference
  for name in ("metrics.jsonl", "curves.png", "results.md", "summary.json", "config.json",
               "student/model_config.json", "student_best/info.json"):
    assert os.path.exists(os.path.join(ref, name)), name
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(ref, "tensorboard")))
  recs = _records(ref)
  train = [r for r in recs if r["kind"] == "train"]
  assert [r["step"] for r in train] == list(range(6))
  assert [r["step"] for r in recs if r["kind"] == "eval"] == [0, 3, 6]
  kappa = [r["kappa"] for r in train]
  assert kappa[0] == 1.0 and all(a > b for a, b in zip(kappa, kappa[1:]))  # annealing
  # student_best is chosen on the selection split, not on the reported one
  evals = [r for r in recs if r["kind"] == "eval"]
  assert all("select/success" in r and "eval/success" in r for r in evals)
  with open(os.path.join(ref, "student_best", "info.json")) as f:
    kept = json.load(f)["step"]
  best = max(r["select/success"] for r in evals)
  assert kept == max(r["step"] for r in evals if r["select/success"] == best)
  assert "selection" in json.load(open(os.path.join(teacher, "info.json")))
  assert "| teacher |" in proc.stdout and "| student, step 6 (final) |" in proc.stdout
  assert os.path.exists(os.path.join(teacher, "info.json"))
  assert os.path.exists(os.path.join(teacher, "teacher_eval.json"))


# the adaptive hand-off, made to start within the tiny run's 6 steps (a 2-step window,
# flat when the EMA fell by less than half) and to anneal over the 2 steps after it
ADAPTIVE = ("--config.objective.schedule=adaptive", "--config.objective.handoff_window=2",
            "--config.objective.handoff_tol=0.5", "--config.objective.anneal_steps=2")


@pytest.mark.long
@trainer_group
@pytest.mark.parametrize("schedule", ["linear", "adaptive"])
def test_kill_9_then_resume_is_bit_identical(reference, schedule):
  """Killed after 2-4 steps and resumed: the records and parameters of the uninterrupted
  run, bit for bit; with the adaptive hand-off too, whose state (the EMA, its window, the
  start step) is in the checkpoint: its kappa moves only after the trigger, which a
  resumed run that lost the state would fire late or never."""
  root, teacher, ref, _ = reference
  extra = () if schedule == "linear" else ADAPTIVE
  if schedule == "adaptive":
    ref = str(root / "adaptive_ref")
    _run(ref, teacher, *extra)
    train = [r for r in _records(ref) if r["kind"] == "train"]
    kappa = [r["kappa"] for r in train]
    start = int(train[-1]["handoff_start"])
    assert 2 < start < 6, start  # after the window, inside the run
    assert kappa[:start] == [1.0] * start and kappa[-1] < 1.0
  work = str(root / f"killed_{schedule}")
  proc = subprocess.Popen(_cmd(work, teacher, *extra), env=_env(), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _wait_for_train_records(proc, work, int(np.random.default_rng().integers(2, 5)),
                          checkpoint=True)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  out = _run(work, teacher, *extra)
  assert "resuming from the checkpoint" in out.stdout
  assert _records(work) == _records(ref)
  for a, b in zip(_student_params(work), _student_params(ref)):
    np.testing.assert_array_equal(a, b)


@trainer_group
def test_sigint_saves_and_exits_then_resumes(reference):
  root, teacher, ref, _ = reference
  work = str(root / "interrupted")
  proc = subprocess.Popen(_cmd(work, teacher), env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  _wait_for_train_records(proc, work, 2)
  proc.send_signal(signal.SIGINT)
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 130, stderr[-2000:]
  assert "Traceback" not in stderr
  assert "interrupted: saved the checkpoint at step" in stdout
  saved = int(stdout.split("checkpoint at step ")[1].split(";")[0])
  assert 2 <= saved < 6
  assert str(saved) in os.listdir(os.path.join(work, "checkpoints"))
  _run(work, teacher)
  assert _records(work) == _records(ref)


@trainer_group
def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(reference):
  root, teacher, _, _ = reference
  work = str(root / "nan")
  proc = _run(work, teacher, "--config.debug.nan_at_step=3", check=False)
  assert proc.returncode == 3
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: training diverged at step 3") and "(step 3)" in last
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(os.path.join(work, "checkpoints")) as m:
    assert m.latest_step() == 3
    restored = m.restore(3)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(restored))


@pytest.mark.parametrize("override, field", [
    ("--config.method=ppo", "config.method"),
    ("--config.train.steps=-1", "config.train.steps"),
    ("--config.teacher.source=checkpoint", "config.teacher.path"),
    ("--config.rollout.group_size=1", "config.rollout.group_size"),
    ("--config.optim.minibatches=3", "config.optim.minibatches"),
    ("--config.optim.optimizer=sgd", "config.optim.optimizer"),
    ("--config.objective.tdur_mode=entropy", "config.objective.tdur_mode"),
    ("--config.mesh.data=3", "config.mesh"),  # 8 devices here
    ("--config.mesh.fsdp=3", "config.mesh"),
    ("--config.mesh.fsdp=-1", "config.mesh.fsdp"),  # with data=-1: which takes the rest?
    ("--config.objective.kappa_min=-0.1", "config.objective.kappa_min"),
    ("--config.objective.rho_max=-2.0", "config.objective.rho_max"),
    ("--config.env.preset=extreme", "config.env"),
    ("--config.env.invalid_penalty=-1.0", "config.env.invalid_penalty"),
    ("--config.student.init=gguf", "config.student.path"),  # no GGUF file
    ("--config.teacher.build.init=hub", "config.teacher.build.init"),
    ("--config.teacher.build.init=gguf", "config.teacher.build.init_path"),
])
def test_bad_config_fails_in_one_line(override, field):
  config = tiny_config.get_config()
  key, value = override[len("--config."):].split("=")
  node = config
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], str) else value
  with pytest.raises(ConfigError) as e:
    validate(config)
  message = str(e.value)
  assert message.startswith(field) and "\n" not in message


SHIPPED = sorted(f[:-3] for f in os.listdir(tiny_config.CONFIGS) if f.endswith(".py"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_validates(name):
  """A config in configs/ that fails its own validation would only show on a user's first
  run; the paper-scale ones need the user's model directories and say so."""
  config = tiny_config.shipped(name)
  if config.student.init == "hf" and not config.student.path:
    with pytest.raises(ConfigError, match=r"^config\.student\.path: hf directory '' does not"):
      validate(config)
  else:
    validate(config)


def test_bad_config_from_the_command_line(tmp_path):
  proc = _run(str(tmp_path / "w"), str(tmp_path / "t"), "--config.method=ppo", check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: config.method: got 'ppo'; allowed: {', '.join(METHODS)}")


@pytest.mark.parametrize("args,line", [
    (["--config.train.stepz=3"], "error: config.train.stepz: no such field; did you mean "
     "config.train.steps? (every field and its default: atod_jax/train/defaults.py)"),
    (["--config.trian.steps=3"], "error: config.trian.steps: no such field; did you mean "
     "config.train? (every field and its default: atod_jax/train/defaults.py)"),
    (["--config.train.steps=abc"], "error: flag --config.train.steps=abc: invalid literal "
     "for int() with base 10: 'abc'"),
])
def test_a_misspelt_field_fails_in_one_line_naming_the_nearest(tmp_path, args, line):
  proc = _run(str(tmp_path / "w"), str(tmp_path / "t"), *args, check=False)
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [line], proc.stderr


def test_a_missing_config_file_fails_in_one_line(tmp_path):
  missing = os.path.join(ROOT, "configs", "quickstrt.py")
  proc = subprocess.run([sys.executable, "-m", "atod_jax.main", f"--config={missing}",
                         f"--workdir={tmp_path}"], env=_env(), cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      f"error: --config: no such file {missing!r}; did you mean "
      f"{os.path.join(ROOT, 'configs', 'quickstart.py')}?"]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_a_cpu_run_with_libtpu_installed_prints_nothing_about_tpus(tmp_path):
  """libtpu (the test extra's jax[tpu]) makes JAX try a TPU at start-up and print its
  errors on a machine without one; the package chooses the CPU first, unasked. The run
  goes as far as the device check (the mesh asks for 3 devices of 1)."""
  env = _env()
  env.pop("JAX_PLATFORMS", None)
  proc = subprocess.run(_cmd(str(tmp_path / "w"), str(tmp_path / "t"), "--config.mesh.data=3"),
                        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and "the 1 devices" in proc.stderr
  assert "tpu" not in proc.stderr.lower(), proc.stderr


def test_a_mesh_that_does_not_match_the_devices_fails_at_start_up(tmp_path):
  proc = _run(str(tmp_path / "w"), str(tmp_path / "t"), "--config.mesh.data=3", check=False)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: config.mesh: data x fsdp x tensor = 3 must equal the 1 devices")


@trainer_group
def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_ends_as_uninterrupted(reference):
  """The newest checkpoint's files cut to half their size (a crash mid-write, a full
  disk): the resume warns in one line, moves it aside, restores the one before, and the
  run ends with the records and parameters of the uninterrupted run."""
  import shutil
  root, teacher, ref, _ = reference
  work = str(root / "damaged")
  shutil.copytree(ref, work)
  newest = os.path.join(work, "checkpoints", "6")
  cut = 0
  for dirpath, _, files in os.walk(newest):
    for f in files:
      path = os.path.join(dirpath, f)
      size = os.path.getsize(path)
      with open(path, "r+b") as fh:
        fh.truncate(size // 2)
      cut += 1
  assert cut > 0
  out = _run(work, teacher)
  warning = [line for line in out.stdout.splitlines() if "does not restore" in line]
  assert len(warning) == 1 and "checkpoint at step 6" in warning[0], out.stdout[-2000:]
  assert "resuming from the checkpoint at step 5" in out.stdout
  assert os.path.isdir(os.path.join(work, "checkpoints_damaged", "6"))
  assert _records(work) == _records(ref)
  for a, b in zip(_student_params(work), _student_params(ref)):
    np.testing.assert_array_equal(a, b)


def _hf_student(tmp_path, config):
  """An HF directory holding a fresh student of ``config``'s shape."""
  from flax import nnx
  from atod_jax.models import ModelConfig, save_pretrained
  cfg = ModelConfig(**config.student.model)
  graphdef, params = model_io.fresh(cfg, jax.random.key(3))
  path = str(tmp_path / "student_hf")
  save_pretrained(nnx.merge(graphdef, params), path)
  return path, params


def test_hf_student_is_read_straight_onto_its_shards(tmp_path, monkeypatch):
  """8 devices, (data 2, fsdp 2, tensor 2): the trainer's HF student load asks every
  device for its own block of each sharded tensor only, and the result equals the
  file."""
  from atod_jax.models.sharding import make_mesh
  from atod_jax.train import loop
  config = tiny_config.get_config()
  config.student.model = dict(config.student.model, hidden_size=64, head_dim=16, num_heads=4,
                              num_kv_heads=2, intermediate_size=128)
  path, params = _hf_student(tmp_path, config)
  config.student.update(init="hf", path=path)
  config.student.model = dict(dtype="float32")
  requested = []
  real = jax.make_array_from_callback

  def spy(shape, sharding, callback, *a, **k):
    def read(index):
      block = callback(index)
      requested.append((tuple(shape), sharding, block.shape))
      return block
    return real(shape, sharding, read, *a, **k)

  monkeypatch.setattr(jax, "make_array_from_callback", spy)
  run = loop.Run(config, str(tmp_path), make_mesh(2, 2, 2), source=None, say=lambda *a: None)
  loaded = loop.student_params(run)
  sharded = [(shape, block) for shape, sh, block in requested if not sh.is_fully_replicated]
  assert len(sharded) >= 4  # embeddings, attention and MLP weights are split
  assert all(block != shape and np.prod(block) < np.prod(shape) for shape, block in sharded)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    assert len(a.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_resuming_an_hf_student_builds_no_throwaway_parameters(tmp_path, monkeypatch):
  """With a checkpoint present, the train state comes from the checkpoint alone: no
  HF read, no random initialisation (both patched to fail), and it equals what was
  saved."""
  import orbax.checkpoint as ocp
  from atod_jax.models import hf
  from atod_jax.models.sharding import make_mesh
  from atod_jax.train import loop
  config = tiny_config.get_config()
  path, params = _hf_student(tmp_path, config)
  config.student.update(init="hf", path=path)
  config.student.model = dict(dtype="float32")
  tx = make_optimizer(config.optim)
  saved = init_state(params, tx)._replace(step=jax.numpy.int32(4))
  ckpt_dir = str(tmp_path / "checkpoints")
  with ocp.CheckpointManager(ckpt_dir) as manager:
    manager.save(4, args=ocp.args.StandardSave(checkpoint_item(saved)))  # as the loop saves
    manager.wait_until_finished()

  def forbidden(*a, **k):
    raise AssertionError("built parameters on resume")

  for target, name in ((model_io, "fresh"), (model_io, "load"), (hf, "load_pretrained"),
                       (loop, "student_params")):
    monkeypatch.setattr(target, name, forbidden)
  mesh = make_mesh(devices=jax.devices()[:1])
  run = loop.Run(config, str(tmp_path), mesh, source=None, say=lambda *a: None)
  state, step = loop.restore_or_init(run, tx, ckpt_dir)
  assert step == 4 and int(state.step) == 4
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_grpo_group_size_one_is_refused_but_opd_allows_it():
  config = tiny_config.get_config()
  config.method = "opd"
  config.rollout.group_size = 1
  config.optim.minibatches = 1
  validate(config)
  config.method = "grpo"
  with pytest.raises(ConfigError, match="group_size"):
    validate(config)


def _student_batch(config):
  """A fresh student and its packed, trimmed rollout batch of 4 tasks x 4 episodes."""
  from atod_jax.models import ModelConfig
  from atod_jax.rollout import pack, trim
  from atod_jax.sampling import SamplingParams
  from atod_jax.train.sources.device import DeviceSource, rollout_fn, task_keys
  spec = DeviceSource(config).spec
  graphdef, params = model_io.fresh(ModelConfig(**config.student.model), jax.random.key(0))
  keys, groups = task_keys(jax.random.key(1), 4, 4)
  traj = trim(pack(rollout_fn(graphdef, spec, "train", SamplingParams(1.0))(
      params, keys, jax.random.key(0), groups)))
  return graphdef, params, traj


def _copy(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


def _policy_update(graphdef, tx, params, traj, adv, *, epochs, microbatches=1):
  """One clipped-surrogate update from fresh optimizer state, 2 mini-batches."""
  update = jax.jit(policy_update, static_argnums=(0, 1, 6, 7))
  return update(graphdef, tx, init_state(params, tx), traj, adv, jax.random.key(5), PolicyLoss(),
                Batches(2, epochs, microbatches))


def test_sharded_update_equals_one_device():
  """8 CPU devices (data 4 x fsdp 2): the whole ATOD update (teacher scoring,
  advantages, two epochs of the clipped surrogate) gives the loss and new parameters of
  one device."""
  from atod_jax.models import ModelConfig
  from atod_jax.models.sharding import make_mesh, shard_batch, state_shardings
  from atod_jax.train.methods import make_update
  config = tiny_config.get_config()
  # 2 gradient slices asked: one device takes them; 8 devices hold one episode each of a
  # mini-batch, so the update aligns to 1 slice (the same gradient: slices are exact)
  config.optim.update(minibatches=2, epochs=2, microbatches=2)
  config.rollout.tasks_per_step = 4
  graphdef, params, traj = _student_batch(config)
  teacher = model_io.fresh(ModelConfig(**config.teacher.model), jax.random.key(1))
  update = make_update(config, "atod", graphdef, max_turns=15)
  one, m1 = update(update.init(_copy(params)), traj, jax.random.key(5), teacher)
  mesh = make_mesh(4, 2, 1)
  p8 = jax.device_put(_copy(params), state_shardings(params, mesh))
  t8 = jax.device_put(teacher[1], state_shardings(teacher[1], mesh))
  # with the mesh, every scoring chunk and gradient slice is placed over its 8 devices
  update8 = make_update(config, "atod", graphdef, max_turns=15, mesh=mesh)
  assert update8.batch_shards == 8
  eight, m8 = update8(update8.init(p8), shard_batch(traj, mesh), jax.random.key(5),
                      (teacher[0], t8))
  assert len(jax.tree.leaves(eight.params)[0].sharding.device_set) == 8
  np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(eight.params), jax.tree.leaves(one.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  assert any(not np.allclose(np.asarray(a), np.asarray(b)) for a, b in
             zip(jax.tree.leaves(one.params), jax.tree.leaves(params)))


def test_gradient_accumulation_equals_the_whole_minibatch():
  """optim.microbatches: 4 slices of accumulated gradients give the update of the whole
  mini-batch (every row trained, row-mean loss); teacher scoring in 4 chunks gives the
  same scores."""
  from atod_jax.train.steps import jit_score
  config = tiny_config.get_config()
  graphdef, params, traj = _student_batch(config)
  assert bool(traj.gen_mask.any(axis=1).all())
  scores = jit_score(graphdef, params, traj)
  np.testing.assert_allclose(jit_score(graphdef, params, traj, chunks=4), scores, atol=1e-6)
  adv = jax.random.normal(jax.random.key(2), traj.tokens.shape) * traj.gen_mask
  tx = make_optimizer(config.optim)
  whole, m1 = _policy_update(graphdef, tx, _copy(params), traj, adv, epochs=1)
  sliced, m4 = _policy_update(graphdef, tx, _copy(params), traj, adv, epochs=1, microbatches=4)
  np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
  for a, b in zip(jax.tree.leaves(sliced.params), jax.tree.leaves(whole.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@trainer_group
def test_teacher_and_student_from_directories_and_hf_export(reference):
  """A teacher from our checkpoint, a student from an HF directory: the run trains it and
  exports it back to HF; the export equals the run's final student."""
  from flax import nnx
  from atod_jax.models import load_pretrained, save_pretrained
  root, teacher, ref, _ = reference
  graphdef, params, _ = model_io.load("checkpoint", os.path.join(ref, "student"))
  hf_dir = str(root / "student_hf_in")
  save_pretrained(nnx.merge(graphdef, params), hf_dir)
  work = str(root / "from_dirs")
  _run(work, teacher, "--config.teacher.source=checkpoint", f"--config.teacher.path={teacher}",
       "--config.student.init=hf", f"--config.student.path={hf_dir}", "--config.train.steps=2",
       "--config.train.eval_every=2")
  exported = load_pretrained(os.path.join(work, "student_hf"), dtype="float32")
  final = model_io.load("checkpoint", os.path.join(work, "student"))[1]
  for a, b in zip(jax.tree.leaves(nnx.state(exported)), jax.tree.leaves(final)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  assert any(not np.allclose(np.asarray(a), np.asarray(b)) for a, b in
             zip(jax.tree.leaves(params), jax.tree.leaves(final)))  # it trained


@pytest.mark.long
@trainer_group
def test_offloaded_teacher_gives_the_same_run(reference):
  """``teacher.offload=True`` (the teacher's weights in host memory, copied to the device
  layer by layer when it scores) changes where the weights live, not a number: the
  records and the final student are the reference run's, bit for bit."""
  root, teacher, ref, _ = reference
  work = str(root / "offloaded")
  proc = _run(work, teacher, "--config.teacher.offload=True")
  assert "teacher: weights in host memory" in proc.stdout + proc.stderr
  assert _records(work) == _records(ref)
  for a, b in zip(_student_params(work), _student_params(ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_teacher_offload_must_be_a_bool():
  config = tiny_config.get_config()
  assert config.teacher.offload is False  # every preset has the field, off
  config.teacher = dict(config.teacher.to_dict(), offload="yes")  # a config written by hand
  with pytest.raises(ConfigError, match="^config.teacher.offload: must be True or False"):
    validate(config)


@pytest.mark.slow  # ~4 min of compilation for the 8-device programs on 2 cores, cold
def test_the_loop_runs_on_8_devices(tmp_path):
  """The whole loop with the batch sharded over a (data 4, fsdp 2) mesh of CPU devices."""
  from atod_jax.train import train
  assert len(jax.devices()) == 8
  config = tiny_config.get_config()
  config.train.update(steps=2, eval_every=2)
  config.mesh.update(data=4, fsdp=2)
  config.teacher.cache_dir = str(tmp_path / "teacher")
  summary = train(config, str(tmp_path / "run"), quiet=True)
  assert summary["steps"] == 2 and 0.0 <= summary["final"]["eval/success"] <= 1.0
  graphdef, params, _ = model_io.load("checkpoint", str(tmp_path / "run" / "student"))
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


@pytest.mark.long
def test_adafactor_state_is_sharded_checkpointed_and_resumed(tmp_path):
  """optim.optimizer='adafactor' on a (data 4, fsdp 2) mesh: its factored second moments
  (rows and columns: not parameter-shaped) are replicated, its parameter-shaped leaves
  sharded as their parameters; a run stopped after step 1 and started again ends with
  the parameters of an uninterrupted run."""
  import optax
  from atod_jax.models.config import ModelConfig
  from atod_jax.models.sharding import make_mesh
  from atod_jax.train import defaults as d, train
  from atod_jax.train.loop import train_state_shardings
  config = tiny_config.get_config()
  config.student.model = d.tiny_model(128, 1, 2, 256)  # its MLP is factored (dims >= 128)
  config.optim.optimizer = "adafactor"
  config.mesh.update(data=4, fsdp=2)
  config.train.update(steps=2, eval_every=2)
  config.teacher.cache_dir = str(tmp_path / "teacher")
  tx = make_optimizer(config.optim)
  _, shapes = model_io.abstract(ModelConfig(**config.student.model))
  abstract = jax.eval_shape(lambda p: init_state(p, tx), shapes)
  sh = train_state_shardings(tx, abstract, make_mesh(4, 2, 1))
  params = {(x.shape, s.spec) for x, s in zip(jax.tree.leaves(abstract.params),
                                              jax.tree.leaves(sh.params))}
  opt = list(zip(jax.tree.leaves(abstract.opt_state), jax.tree.leaves(sh.opt_state)))
  sharded = [(x.shape, s.spec) for x, s in opt if any(a is not None for a in s.spec)]
  assert sharded and all(leaf in params for leaf in sharded)
  for name in ("v_row", "v_col"):  # the factors: replicated
    factors = zip(jax.tree.leaves(optax.tree_utils.tree_get(abstract.opt_state, name)),
                  jax.tree.leaves(optax.tree_utils.tree_get(sh.opt_state, name)))
    factors = [s.spec for x, s in factors if x.size > 1]
    assert factors and not any(any(spec) for spec in factors)

  train(config, str(tmp_path / "whole"), quiet=True)
  with config.unlocked():
    config.train.steps = 1
  train(config, str(tmp_path / "parts"), quiet=True)
  config.train.steps = 2
  train(config, str(tmp_path / "parts"), quiet=True)
  for a, b in zip(_student_params(str(tmp_path / "whole")), _student_params(str(tmp_path / "parts"))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.long
@trainer_group
def test_sft_baseline_trains_on_expert_episodes(reference):
  root, teacher, ref, _ = reference
  work = str(root / "sft")
  _run(work, teacher, "--config.method=sft", "--config.train.steps=2",
       "--config.train.eval_every=2")
  train = [r for r in _records(work) if r["kind"] == "train"]
  assert [r["step"] for r in train] == [0, 1]
  assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in train)  # an NLL
  assert "kappa" not in train[0]  # no teacher, no advantages


@pytest.mark.long
@trainer_group
@pytest.mark.parametrize("method, extra", [("gigpo", ""), ("gkd", ""),
                                           ("atod", "--config.objective.opd_signal=full_vocab")])
def test_baseline_methods_run_through_the_command_line(reference, method, extra):
  """The neighbouring literature's baselines (and ATOD with GKD's divergence as its
  distillation term), two steps each with the shared teacher."""
  root, teacher, _, _ = reference
  work = str(root / f"{method}{'_full' if extra else ''}")
  _run(work, teacher, f"--config.method={method}", "--config.train.steps=2",
       "--config.train.eval_every=2", *([extra] if extra else []))
  train = [r for r in _records(work) if r["kind"] == "train"]
  assert [r["step"] for r in train] == [0, 1]
  assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in train)
  if method == "gigpo":  # the RL term alone, with step-level groups (turn 0 at least)
    assert all(r["kappa"] == 0.0 and r["rho"] == 1.0 for r in train)
    assert any(r["abs_step_adv"] > 0 for r in train)
  else:  # the divergence is a loss term: the whole loss at rho = 0
    assert all(r["divergence"] > 0 and r["distill_loss"] > 0 for r in train)
    if method == "gkd":
      assert all(r["kappa"] == 1.0 and r["rho"] == 0.0 for r in train)
      np.testing.assert_allclose([r["loss"] for r in train],
                                 [r["distill_loss"] for r in train], rtol=1e-5)


def test_bad_text_env_and_hf_fields_fail_in_one_line(tmp_path):
  """The real-environment and paper-scale fields: a wrong layout, gradient-accumulation
  slices that do not divide a mini-batch, an HF model override that is no model field."""
  hf = tmp_path / "hf"
  hf.mkdir()
  for change, field in [(lambda c: c.env.update(layout="stack"), "config.env.layout"),
                        (lambda c: c.optim.update(microbatches=3), "config.optim.microbatches"),
                        (lambda c: c.student.model.update(flash=True),
                         "config.student.model.flash"),
                        (lambda c: c.env.update(history=-1), "config.env.history"),
                        # a growing context keeps each answer's tokens: it needs slots
                        (lambda c: c.env.update(layout="context", obs_len=0),
                         "config.env.obs_len")]:
    config = tiny_config.shipped("searchqa_qwen3")
    config.student.path = config.teacher.path = str(hf)
    change(config)
    with pytest.raises(ConfigError) as e:
      validate(config)
    assert str(e.value).startswith(field) and "\n" not in str(e.value), str(e.value)


def test_cache_fingerprints_survive_their_json_round_trip():
  """A built teacher / tokenizer / teacher evaluation is reused when the stored
  fingerprint equals the run's: with tuples in the config (textworld_tiny's splits) the
  JSON copy holds lists, which used to compare unequal and rebuilt them every run."""
  from atod_jax.train.sources.text import env_fingerprint
  from atod_jax.train.teacher import fingerprint as _fingerprint
  config = tiny_config.get_config()
  config.env.splits = (0, 1, 2)
  for fp in (_fingerprint(config), env_fingerprint(config.env)):
    assert json.loads(json.dumps(fp)) == fp


def test_a_cloned_teacher_serves_any_invalid_penalty_a_reinforced_one_does_not():
  """The invalid-turn penalty is a reward: a teacher built by behaviour cloning alone
  (selected by success) is the same whatever the penalty and is reused; one with a GRPO
  phase learned from the penalised reward and is rebuilt when it changes. Other env
  fields still make a new teacher."""
  from atod_jax.train.teacher import fingerprint as _fingerprint

  def fp(penalty, grpo_steps=0, **env):
    config = tiny_config.get_config()
    config.env.invalid_penalty = penalty
    config.env.update(env)
    config.teacher.build.grpo_steps = grpo_steps
    return _fingerprint(config)

  assert fp(0.1) == fp(0.01) == fp(0.0)
  assert fp(0.1, grpo_steps=2) != fp(0.01, grpo_steps=2)
  assert fp(0.1, grpo_steps=2) == fp(0.1, grpo_steps=2)
  assert fp(0.01, obs_len=12) != fp(0.01)


def test_checkpoint_of_an_older_parameter_layout_fails_in_one_line(tmp_path):
  """Our checkpoints record the parameter layout: one written before the MLP's gate and
  up became one parameter is refused with a one-line reason (not an orbax tree error),
  and a built teacher's fingerprint carries the layout, so an old one is rebuilt."""
  from atod_jax.models import PARAMS_LAYOUT, ModelConfig
  from atod_jax.train.teacher import fingerprint as _fingerprint
  cfg = ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                    head_dim=8, intermediate_size=24, dtype="float32")
  _, params = model_io.fresh(cfg, jax.random.key(0))
  model_io.save(str(tmp_path), params, cfg)
  _, loaded, got_cfg = model_io.load("checkpoint", str(tmp_path))
  assert got_cfg == cfg
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  with open(tmp_path / "model_config.json") as f:
    fields = json.load(f)
  assert fields["params_layout"] == PARAMS_LAYOUT
  del fields["params_layout"]  # as written before the layout was recorded
  with open(tmp_path / "model_config.json", "w") as f:
    json.dump(fields, f)
  with pytest.raises(ValueError, match="layout 1; this atod_jax reads layout") as e:
    model_io.load("checkpoint", str(tmp_path))
  assert "\n" not in str(e.value)
  assert _fingerprint(tiny_config.get_config())["params_layout"] == PARAMS_LAYOUT


@trainer_group
def test_a_run_with_other_settings_does_not_resume_and_force_records_it(reference):
  """The issue's case: a 6-step ATOD run, then the same workdir with GRPO: exit 2, one
  line, nothing written; with train.resume=force it resumes, says so and records the
  fields; the config.json kept is the run's first."""
  import shutil
  root, teacher, ref, _ = reference
  work = str(root / "mixed")
  shutil.copytree(ref, work)
  before = _records(work)
  proc = _run(work, teacher, "--config.method=grpo", "--config.train.steps=8", check=False)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: config.train.resume:") and "method" in last, last
  assert _records(work) == before
  proc = _run(work, teacher, "--config.method=grpo", "--config.train.steps=8",
              "--config.train.resume=force")
  assert "with other settings (train.resume=force): method" in proc.stdout
  recs = _records(work)
  notes = [r for r in recs if r["kind"] == "resume"]
  assert notes == [{"step": 6, "kind": "resume", "forced": ["method"]}]
  assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(8))
  with open(os.path.join(work, "config.json")) as f:
    assert json.load(f)["method"] == "atod"
  # the same command again: the same (forced) run, still refused without force
  proc = _run(work, teacher, "--config.method=grpo", "--config.train.steps=8", check=False)
  assert proc.returncode == 2
