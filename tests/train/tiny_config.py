"""The quickstart config shrunk to seconds per run (for the trainer's tests)."""
import importlib.util
import os

from atod_jax.train import defaults as d

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs")


def shipped(name: str):
  """``configs/<name>.py``'s config, as ``--config`` loads it."""
  spec = importlib.util.spec_from_file_location(f"{name}_config",
                                                os.path.join(CONFIGS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  c = shipped("quickstart")
  c.teacher.model = d.tiny_model(32, 2, 2, 64)
  c.teacher.build.update(demo_episodes=16, sft_steps=3, batch_size=8, select_episodes=8)
  c.student.model = d.tiny_model(32, 1, 2, 64)
  c.student.sft.update(demo_episodes=8, steps=2, batch_size=8)
  c.rollout.update(tasks_per_step=2, group_size=4)
  c.optim.minibatches = 2
  c.train.update(steps=6, eval_every=3, checkpoint_every=1, keep_checkpoints=2)
  c.eval.update(episodes=8, greedy=False)
  return c
