"""Quickstart: ATOD on the on-device household task family, tiny models, CPU-sized.

    python -m atod_jax.main --config configs/quickstart.py --workdir runs/quick

On its first run it builds the teacher (a 4-layer model trained by behaviour cloning on
expert episodes) and caches it in the workdir; the student (2 layers) starts from a
short behaviour-cloning warm start and is trained with ATOD. Override any field, e.g.

    python -m atod_jax.main --config configs/quickstart.py --workdir runs/q \
        --config.method=grpo --config.train.steps=40
"""
import ml_collections


def tiny_model(hidden: int, layers: int, heads: int, ffn: int) -> dict:
  # Few, wide heads: on a CPU the attention scores' element-wise work, which grows with
  # heads x length^2, costs more than the matmuls at these sizes.
  return dict(vocab_size=128, hidden_size=hidden, num_layers=layers, num_heads=heads,
              num_kv_heads=1, head_dim=hidden // heads,
              intermediate_size=ffn, model_type="qwen3", qk_norm=True, rope_theta=10000.0,
              dtype="float32", param_dtype="float32")


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.method = "atod"  # atod | opd | grpo | sft | atod_fixed | atod_uniform
  c.env = dict(kind="household", preset="easy", obs_len=24)
  c.teacher = dict(
      source="build",  # build | hf | checkpoint
      path="",  # the directory for hf / checkpoint
      cache_dir="",  # where a built teacher is kept (default: <workdir>/teacher)
      model=tiny_model(128, 3, 2, 384),
      build=dict(seed=0, demo_episodes=512, sft_steps=150, batch_size=32, learning_rate=3e-3,
                 expert_noise=0.3,  # share of random commands in the demos (DART)
                 grpo_steps=0, grpo_learning_rate=5e-4),  # then GRPO on its own rollouts
  )
  c.student = dict(
      init="sft",  # fresh | sft (short behaviour-cloning warm start) | hf | checkpoint
      path="",
      model=tiny_model(64, 2, 2, 192),
      sft=dict(demo_episodes=64, steps=200, batch_size=32, learning_rate=3e-3,
               expert_noise=0.3),
  )
  c.rollout = dict(tasks_per_step=8, group_size=8, temperature=1.0)
  c.objective = dict(
      estimator="grpo", tdur_mode="soft_or", schedule="linear", anneal_steps=50,
      kappa_init=1.0, kappa_min=0.1, rho_init=1.0, rho_max=2.0,
      clip_eps=0.2, clip_eps_high=0.0, dual_clip=0.0,  # 0: off (clip_eps_high 0: = clip_eps)
      aggregation="seq_mean_token_mean")
  c.optim = dict(learning_rate=5e-4, warmup_steps=5, b1=0.9, b2=0.999, weight_decay=0.0,
                 max_grad_norm=1.0, minibatches=4, epochs=1)
  c.train = dict(steps=100, eval_every=10, checkpoint_every=10, keep_checkpoints=3)
  c.eval = dict(episodes=256, temperature=0.4, greedy=True, seed=1234)
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.debug = dict(nan_at_step=-1)  # fault injection for the tests: NaN loss at this step
  return ml_collections.ConfigDict(c)
