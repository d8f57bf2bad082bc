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
  return d.quickstart()  # the settings, spelled out: atod_jax/train/defaults.py
