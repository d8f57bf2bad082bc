"""The quickstart config shrunk to seconds per run (for the trainer's tests)."""
import importlib.util
import os

from atod_jax.train import defaults as d

_QS = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "quickstart.py")


def get_config():
  spec = importlib.util.spec_from_file_location("quickstart_config", _QS)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.teacher.model = d.tiny_model(32, 2, 2, 64)
  c.teacher.build.update(demo_episodes=16, sft_steps=3, batch_size=8, select_episodes=8)
  c.student.model = d.tiny_model(32, 1, 2, 64)
  c.student.sft.update(demo_episodes=8, steps=2, batch_size=8)
  c.rollout.update(tasks_per_step=2, group_size=4)
  c.optim.minibatches = 2
  c.train.update(steps=6, eval_every=3, checkpoint_every=1, keep_checkpoints=2)
  c.eval.update(episodes=8, greedy=False)
  return c
