"""ATOD on TextWorld cooking games (made with tw-make, cached), tiny models, CPU-sized.

    python -m atod_jax.main --config configs/textworld_tiny.py --workdir runs/tw

Needs the `textworld` extra. Games: one room, one ingredient (`tw-cooking --recipe 1
--take 1 --go 1`); train on seeds 0-199, evaluate on 100000-100031 (tuples: override
with --config.env.options.splits.train='(0, 1, 2)'). About 10 minutes on a 2-core CPU
(the first run also makes the 232 games: ~2 min).
"""
from atod_jax.train import defaults as d


def get_config():
  c = d.tiny_text_run(
      "textworld", max_turns=10, train_split="train", eval_split="heldout",
      prompt_len=128, response_len=12, obs_len=64, vocab=768,
      options=dict(cache_dir="", splits=dict(train=tuple(range(200)),
                                             heldout=tuple(range(100000, 100032)))))
  # a teacher worth distilling: every training game, 400 steps;
  # a student warm-started on 64 of them, then 200 ATOD steps (results: docs/runs.md)
  c.teacher.build.update(demo_episodes=200, sft_steps=400)
  c.student.sft.update(demo_episodes=64, steps=200)
  c.train.update(steps=200, eval_every=25)
  c.objective.anneal_steps = 100
  return c
