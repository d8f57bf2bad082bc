"""ATOD on WebShop (our text-mode re-implementation on the real 1k files), tiny models,
CPU-sized.

    python -m atod_jax.main --config configs/webshop_tiny.py --workdir runs/webshop

Needs the `webshop` extra and the data (../shared/data/webshop, or $WEBSHOP_DATA, or
--config.env.options.data_dir=...). Trains on the synthetic train goals (5,410),
evaluates on the first 100 test goals; 15 turns (the paper's limit). Success is a
purchase with reward 1.0; eval/reward is WebShop's score.
"""
from atod_jax.train import defaults as d


def get_config():
  c = d.tiny_text_run("webshop", max_turns=15, train_split="train", eval_split="test",
                      prompt_len=96, response_len=24, obs_len=128, vocab=2048,
                      options=dict(data_dir=""))
  c.eval.episodes = 100
  return c
