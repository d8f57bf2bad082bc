"""Quickstart: ATOD on the on-device household task family, tiny models, CPU-sized.

    python -m atod_jax.main --config configs/quickstart.py --workdir runs/quick

On its first run it builds the teacher (a 3-layer model trained by behaviour cloning on
expert episodes) and caches it in the workdir; the student (2 layers) starts from a
short behaviour-cloning warm start and is trained with ATOD. Override any field, e.g.

    python -m atod_jax.main --config configs/quickstart.py --workdir runs/q \\
        --config.method=grpo --config.train.steps=40

Every field and its default: atod_jax/train/defaults.py.
"""
from atod_jax.train import defaults as d


def get_config():
  c = d.base("atod")
  c.env = d.household_env("easy", obs_len=24)
  c.teacher = d.built_teacher(d.tiny_model(128, 3, 2, 384), demo_episodes=512, sft_steps=150)
  c.student = d.warm_started_student(d.tiny_model(64, 2, 2, 192), demo_episodes=64, steps=200)
  c.objective.anneal_steps = 50
  return c
