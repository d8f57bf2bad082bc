"""The notebooks: each runs on a CPU (small parameters) in a real Jupyter kernel, is
stored without outputs, and the own-loop notebook's objective equals the trainer's."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(ROOT, "notebooks")) if f.endswith(".ipynb"))
notebook_group = pytest.mark.xdist_group("notebooks")  # one kernel at a time


def _read(name):
  import nbformat
  return nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)


def test_there_are_the_three_notebooks():
  assert NOTEBOOKS == ["bring_your_own_model.ipynb", "objective_in_your_loop.ipynb",
                       "quickstart.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
  for cell in _read(name).cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, (name, cell.source[:60])


@notebook_group
@pytest.mark.parametrize("name", [  # the two that run a training loop: the long step
    pytest.param(n, marks=pytest.mark.long) if n != "objective_in_your_loop.ipynb" else n
    for n in NOTEBOOKS])
def test_notebook_runs_on_a_cpu(name, tmp_path, monkeypatch):
  """Executed top to bottom in a fresh kernel with ATOD_JAX_NOTEBOOK_SMALL=1; any
  exception in any cell fails the test."""
  from nbclient import NotebookClient
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # one device, as a CPU runtime
  monkeypatch.setenv("ATOD_JAX_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("ATOD_JAX_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir or "")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = _read(name)
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  text = json.dumps([c.get("outputs", []) for c in nb.cells])
  assert "Traceback" not in text


def _notebook_namespace(name, until):
  """The notebook's code cells up to the one defining ``until``, run in a namespace."""
  ns = {"__name__": "notebook"}
  os.environ["ATOD_JAX_NOTEBOOK_SMALL"] = "1"
  try:
    for cell in _read(name).cells:
      if cell.cell_type != "code" or "google.colab" in cell.source:
        continue
      exec(compile(cell.source, name, "exec"), ns)
      if f"def {until}(" in cell.source:
        return ns
  finally:
    del os.environ["ATOD_JAX_NOTEBOOK_SMALL"]
  raise AssertionError(f"{name} defines no {until}")


@pytest.mark.long
def test_own_loop_objective_equals_the_trainers():
  """The notebook's ``atod_loss`` on a trainer batch (the household rollout of a tiny
  student, scored by a tiny teacher) gives the loss and the gradients of the trainer's
  ATOD update on the same batch, at a step inside the anneal."""
  import optax
  from flax import nnx

  from atod_jax.models import ModelConfig
  from atod_jax.models import checkpoint as model_io
  from atod_jax.rollout import pack, trim
  from atod_jax.rollout.trajectory import trained_mask
  from atod_jax.sampling import SamplingParams
  from atod_jax.train import methods, steps
  from atod_jax.train.sources.device import DeviceSource, rollout_fn, task_keys
  from tests.train import tiny_config

  ns = _notebook_namespace("objective_in_your_loop.ipynb", "atod_loss")
  config = tiny_config.get_config()
  config.rollout.update(tasks_per_step=ns["NUM_GROUPS"], group_size=4)
  config.objective.anneal_steps = ns["ANNEAL"]
  config.optim.minibatches = 1
  spec = DeviceSource(config).spec
  ns["MAX_TURNS"] = spec.max_turns  # the notebook's constants, for this batch
  graphdef, params = model_io.fresh(ModelConfig(**config.student.model), jax.random.key(0))
  teacher = model_io.fresh(ModelConfig(**config.teacher.model), jax.random.key(1))
  keys, groups = task_keys(jax.random.key(2), ns["NUM_GROUPS"], 4)
  traj = trim(pack(rollout_fn(graphdef, spec, "train", SamplingParams(1.0))(
      params, keys, jax.random.key(3), groups)))
  step = 7

  update = methods.make_update(config, "atod", graphdef, max_turns=spec.max_turns,
                               tx=optax.sgd(1.0))
  state = update.init(jax.tree.map(jnp.array, params))._replace(step=jnp.int32(step))
  new, metrics = update(state, traj, jax.random.key(4), teacher)
  trainer_grads = jax.tree.map(lambda a, b: a - b, params, new.params)  # SGD, rate 1

  batch = {"tokens": traj.tokens, "mask": trained_mask(traj), "turn_ids": traj.turn_ids,
           "behaviour_logp": traj.behaviour_logp, "rewards": traj.rewards,
           "group_ids": traj.group_ids,
           "teacher_logp": steps.jit_score(*teacher, traj, temperature=1.0)}

  def loss(p):
    logp = steps._logprobs(nnx.merge(graphdef, p), traj, 1.0)
    return ns["atod_loss"](logp, batch, step)

  (value, nb_metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
  np.testing.assert_allclose(float(value), float(metrics["loss"]), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(nb_metrics["kappa"]), float(metrics["kappa"]), rtol=1e-6)
  moved = 0
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(trainer_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    moved += int(np.any(np.asarray(b) != 0))
  assert moved > 0


def test_quickstart_notebook_builds_the_quickstart_config():
  """The notebook spells out configs/quickstart.py's fields (Colab has no configs/
  folder): the lines it runs give the same config as the file."""
  from atod_jax.train import defaults
  from tests.train import tiny_config
  with open(os.path.join(ROOT, "notebooks", "quickstart.ipynb")) as f:
    cells = ["".join(c["source"]) for c in json.load(f)["cells"] if c["cell_type"] == "code"]
  src = next(c for c in cells if "config = defaults.base(" in c)
  lines = src.splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith("config = defaults.base("))
  end = next(i for i, l in enumerate(lines) if l.startswith("config.eval.select_split"))
  scope = {"defaults": defaults}
  exec("\n".join(lines[start:end + 1]), scope)  # noqa: S102 (the notebook's own lines)
  assert scope["config"].to_dict() == tiny_config.shipped("quickstart").to_dict()
