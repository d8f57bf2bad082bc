"""ATOD on TextWorld cooking games (made with tw-make, cached), tiny models, CPU-sized.

    python -m atod_jax.main --config configs/textworld_tiny.py --workdir runs/tw

Needs the `textworld` extra. Games: one room, one ingredient (`tw-cooking --recipe 1
--take 1 --go 1`); train on seeds 0-199, evaluate on 100000-100031 (tuples: override
with --config.env.options.splits.train='(0, 1, 2)').
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from text_tiny import text_config  # noqa: E402


def get_config():
  return text_config(
      "textworld", max_turns=10, train_split="train", eval_split="heldout",
      prompt_len=128, response_len=12, obs_len=64, vocab=768,
      options=dict(cache_dir="", splits=dict(train=tuple(range(200)),
                                             heldout=tuple(range(100000, 100032)))))
