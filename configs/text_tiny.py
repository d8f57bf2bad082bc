"""Shared CPU-sized settings of the ``*_tiny`` configs: ATOD on a real environment
with tiny models, a BPE tokenizer trained on expert episodes, a teacher built by
behaviour cloning. Not a config itself; see alfworld_tiny.py, webshop_tiny.py,
searchqa_tiny.py, textworld_tiny.py."""
import ml_collections


def tiny_model(vocab: int, hidden: int, layers: int, heads: int, ffn: int) -> dict:
  return dict(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
              num_kv_heads=1, head_dim=hidden // heads, intermediate_size=ffn,
              model_type="qwen3", qk_norm=True, rope_theta=10000.0, dtype="float32",
              param_dtype="float32")


def text_config(kind: str, *, max_turns: int, train_split: str, eval_split: str,
                prompt_len: int = 128, response_len: int = 16, obs_len: int = 48,
                vocab: int = 1024, options: dict | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.method = "atod"
  c.env = dict(kind=kind, max_turns=max_turns, prompt_len=prompt_len,
               response_len=response_len, obs_len=obs_len, workers=2, step_timeout=120.0,
               train_split=train_split, eval_split=eval_split, eval_batch=16,
               tokenizer="build", vocab_size=vocab, tokenizer_episodes=32,
               options=options or {})
  c.teacher = dict(source="build", path="", cache_dir="",
                   model=tiny_model(vocab, 128, 2, 2, 384),
                   build=dict(seed=0, demo_episodes=64, sft_steps=100, batch_size=16,
                              learning_rate=3e-3, expert_noise=0.2, grpo_steps=0,
                              grpo_learning_rate=5e-4))
  c.student = dict(init="sft", path="", model=tiny_model(vocab, 64, 2, 2, 192),
                   sft=dict(demo_episodes=32, steps=60, batch_size=16, learning_rate=3e-3,
                            expert_noise=0.2))
  c.rollout = dict(tasks_per_step=4, group_size=4, temperature=1.0)
  c.objective = dict(
      estimator="grpo", tdur_mode="soft_or", schedule="linear", anneal_steps=20,
      kappa_init=1.0, kappa_min=0.1, rho_init=1.0, rho_max=2.0,
      clip_eps=0.2, clip_eps_high=0.0, dual_clip=0.0, aggregation="seq_mean_token_mean")
  c.optim = dict(learning_rate=5e-4, warmup_steps=2, b1=0.9, b2=0.999, weight_decay=0.0,
                 max_grad_norm=1.0, minibatches=2, epochs=1)
  c.train = dict(steps=40, eval_every=10, checkpoint_every=5, keep_checkpoints=3)
  c.eval = dict(episodes=32, temperature=0.4, greedy=False, seed=1234)
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.debug = dict(nan_at_step=-1)
  return c
