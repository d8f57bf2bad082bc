"""ATOD on Search-QA (HotpotQA sample, BM25 over its paragraphs), tiny models, CPU-sized.

    python -m atod_jax.main --config configs/searchqa_tiny.py --workdir runs/searchqa

Needs the `search` extra and ../shared/data/searchqa (or $ATOD_JAX_DATA). 80 training
questions, 20 held out; 4 turns (the paper's limit); reward = exact match.
"""
from atod_jax.train import defaults as d


def get_config():
  c = d.tiny_text_run("searchqa", max_turns=4, train_split="train", eval_split="heldout",
                      prompt_len=64, response_len=64, obs_len=192, vocab=2048,
                      options=dict(path=""))
  c.eval.episodes = 20
  return c
