"""Every field of a trainer config, with its default: the parts ``configs/*.py`` share.

A config file builds on these and changes what it needs (big_vision's ``common``
style)::

    from atod_jax.train import defaults as d

    def get_config():
      c = d.base()
      c.env = d.household_env("easy")
      c.teacher = d.built_teacher(d.tiny_model(128, 3, 2, 384), demo_episodes=512)
      c.student = d.warm_started_student(d.tiny_model(64, 2, 2, 192), steps=200)
      return c

Sections (validated at start-up by :func:`atod_jax.train.validate`): ``method``,
``seed``; ``env``; ``teacher``; ``student``; ``rollout``; ``objective``; ``optim``;
``train``; ``eval``; ``mesh``; ``distributed``; ``debug``. ``teacher.build`` exists only for a built
teacher, ``student.sft`` only for a warm-started student (or the ``sft`` method).
"""
from __future__ import annotations

import ml_collections


def tiny_model(hidden: int, layers: int, heads: int, ffn: int, vocab: int = 128) -> dict:
  """A CPU-sized Qwen3-shaped model, f32. Few, wide heads: on a CPU the attention
  scores' element-wise work, which grows with heads x length^2, costs more than the
  matmuls at these sizes."""
  return dict(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
              num_kv_heads=1, head_dim=hidden // heads, intermediate_size=ffn,
              model_type="qwen3", qk_norm=True, rope_theta=10000.0, dtype="float32",
              param_dtype="float32")


def objective() -> dict:
  """The ``objective`` section: the paper's (kappa 1 -> 0.1 and rho 1 -> 2 linearly over
  80 steps, GRPO group advantages, soft-OR T-DUR, clip 0.2, the sequence-mean
  token-mean loss)."""
  return dict(
      estimator="grpo",  # group advantages: objectives.ESTIMATORS
      tdur_mode="soft_or",  # T-DUR turn weights: objectives.MODES
      schedule="linear", anneal_steps=80,  # kappa(s), rho(s): shape (objectives.SHAPES or
      # "adaptive": the anneal starts when the smoothed disagreement stops falling) and length
      # adaptive: window W, EMA decay (TIDE's) and the fall over W that counts as flat
      handoff_window=10, handoff_decay=0.9, handoff_tol=0.05,
      kappa_init=1.0, kappa_min=0.1, rho_init=1.0, rho_max=2.0,
      clip_eps=0.2, clip_eps_high=0.0, dual_clip=0.0,  # 0: off (clip_eps_high 0: = clip_eps)
      aggregation="seq_mean_token_mean",  # objectives.AGGREGATIONS
      rl_advantage="episode",  # the RL term: episode | gigpo (GiGPO's step-level groups)
      gigpo_gamma=0.95, gigpo_weight=1.0,  # GiGPO: step-return discount, step-term weight
      gigpo_norm="mean",  # GiGPO step groups: mean (verl-agent's mean_norm) | std
      opd_signal="sampled",  # the distillation term: sampled | full_vocab (GKD's divergence)
      opd_clip=0.0,  # sampled signal clamped to [-c, c] (0: off, the paper's form)
      divergence_beta=0.5,  # full_vocab: 0 forward KL(T||S), 1 reverse KL(S||T), else JSD
      behaviour_logp="sampler")  # pi_old: the sampler's log-probs | recompute (a training
      # forward before the update, as verl does; see experiments/behaviour_gap.py)


def base(method: str = "atod", seed: int = 0) -> ml_collections.ConfigDict:
  """Everything but ``env``, ``teacher`` and ``student``: the paper's objective (kappa
  1 -> 0.1 and rho 1 -> 2 linearly over 80 steps, clip 0.2, the sequence-mean token-mean
  loss), AdamW, a 100-step run evaluated every 10 steps on 256 held-out episodes at the
  paper's validation temperature 0.4."""
  c = ml_collections.ConfigDict()
  c.seed = seed
  c.method = method  # a name of atod_jax.train.methods.METHODS
  c.rollout = dict(tasks_per_step=8, group_size=8, temperature=1.0)
  c.objective = objective()
  c.optim = dict(optimizer="adamw",  # or "adafactor" (factored, no moments: less memory)
                 learning_rate=5e-4, warmup_steps=5, b1=0.9, b2=0.999, weight_decay=0.0,
                 max_grad_norm=1.0,  # 0: no clipping
                 minibatches=4, epochs=1,
                 microbatches=1)  # gradient accumulation; also the teacher's scoring chunks
  c.train = dict(steps=100, eval_every=10, checkpoint_every=10, keep_checkpoints=3,
                 resume="")  # "": resume only the workdir's own run; "force": any (resume.py)
  c.eval = dict(episodes=256, temperature=0.4, greedy=True, seed=1234,
                select_split="",  # where student_best is chosen ("": on the report split)
                report_splits=(),  # reported splits ((): the env's evaluation split)
                kl=True)  # the exact KL(student || teacher) on the evaluation episodes
  c.mesh = dict(data=-1, fsdp=1, tensor=1)  # -1: every device left (data, or else fsdp)
  # several processes (hosts) in one run (atod_jax.train.distributed): empty / 0 / -1 are
  # read from the environment (JAX_COORDINATOR_ADDRESS, a TPU slice, SLURM, Open MPI)
  c.distributed = dict(coordinator="", num_processes=0, process_id=-1)
  c.debug = dict(nan_at_step=-1)  # fault injection for the tests: NaN loss at this step
  return c


# verl-agent's ratio: its scripts charge an invalid turn 0.1 (invalid_action_penalty_coef)
# against a success reward of 10 (ALFWorld, WebShop, ScienceWorld: 10 * won); every
# environment here rewards a success with 1, so the same ratio is 0.01. A larger penalty
# lets a 30-turn episode's penalties outweigh its success, and the RL term then trades
# success for valid turns (experiments/RESULTS.md, the long household preset).
INVALID_PENALTY = 0.01


def household_env(preset: str = "easy", obs_len: int = 24) -> dict:
  """The on-device household family (``easy`` / ``medium`` / ``hard`` / ``long``); ``obs_len``
  words of each answer kept."""
  return dict(kind="household", preset=preset, obs_len=obs_len,
              invalid_penalty=INVALID_PENALTY)


def text_env(kind: str, *, max_turns: int, train_split: str, eval_split: str,
             prompt_len: int = 128, response_len: int = 16, obs_len: int = 48,
             tokenizer: str = "build", vocab: int = 1024, options: dict | None = None,
             **more) -> dict:
  """A real environment through the worker pool. ``tokenizer``: ``build`` (a ``vocab``-
  token BPE trained on expert episodes, cached beside the teacher), ``student`` (the HF
  student's) or a directory. ``layout``: ``context`` (one growing context) or ``window``
  (the paper's prompt re-rendered each turn with the last ``history`` turns). ``more``
  overrides any of them (``workers``, ``step_timeout``, ``eval_batch``, ...)."""
  return dict(dict(kind=kind, max_turns=max_turns, prompt_len=prompt_len,
                   response_len=response_len, obs_len=obs_len, workers=2, step_timeout=120.0,
                   train_split=train_split, eval_split=eval_split, eval_batch=16,
                   tokenizer=tokenizer, vocab_size=vocab, tokenizer_episodes=32,
                   invalid_penalty=INVALID_PENALTY, options=options or {},
                   layout="context", history=2), **more)


def built_teacher(model: dict, *, cache_dir: str = "", **build) -> dict:
  """A teacher the run builds (behaviour cloning on expert episodes, then optionally
  ``grpo_steps`` of GRPO on its own rollouts), keeping the parameters that score best on
  the selection split (``eval.select_split``, else the training split) along the way,
  and caches in ``cache_dir`` (default ``<workdir>/teacher``)."""
  defaults = dict(seed=0,
                  # where the build starts: "fresh" (a new model of ``model``'s shape) or a
                  # pretrained one, "hf" / "gguf" / "checkpoint" at ``init_path`` (then
                  # ``model`` holds overrides of its config, e.g. dtype)
                  init="fresh", init_path="",
                  demo_episodes=512, sft_steps=150, batch_size=32, learning_rate=3e-3,
                  expert_noise=0.3,  # share of random commands in the demos (DART)
                  grpo_steps=0, grpo_learning_rate=5e-4,
                  # keep the build's best parameters on the selection split, scored every
                  # select_every steps on select_episodes episodes (0: keep the last)
                  select_every=25, select_episodes=128)
  return dict(source="build", path="", cache_dir=cache_dir, offload=False, model=model,
              build=dict(defaults, **build))


def warm_started_student(model: dict, **sft) -> dict:
  """A fresh student warm-started by a short behaviour cloning (``init="sft"``)."""
  defaults = dict(demo_episodes=64, steps=200, batch_size=32, learning_rate=3e-3,
                  expert_noise=0.3)
  return dict(init="sft", path="", model=model, sft=dict(defaults, **sft))


def teacher_from(kind: str = "hf", path: str = "", **model_fields) -> dict:
  """A teacher read from an HF directory (``kind="hf"``) or our checkpoint
  (``"checkpoint"``); ``model_fields`` override the directory's config (``dtype``,
  ``remat``)."""
  return dict(source=kind, path=path, cache_dir="", offload=False, model=model_fields)


def student_from(kind: str = "hf", path: str = "", **model_fields) -> dict:
  """A student read from an HF directory or our checkpoint (as :func:`teacher_from`)."""
  return dict(init=kind, path=path, model=model_fields)


def tiny_text_run(kind: str, *, vocab: int = 1024, **env) -> ml_collections.ConfigDict:
  """The CPU-sized settings of the ``*_tiny`` configs: ATOD on a real environment with
  tiny models, a ``vocab``-token BPE tokenizer trained on expert episodes, a teacher
  built by behaviour cloning, a warm-started student, 40 steps of 4 tasks x 4 rollouts.
  ``env``: :func:`text_env`'s arguments."""
  c = base("atod")
  c.env = text_env(kind, vocab=vocab, **env)
  c.teacher = built_teacher(tiny_model(128, 2, 2, 384, vocab=vocab), demo_episodes=64,
                            sft_steps=100, batch_size=16, expert_noise=0.2,
                            select_every=50, select_episodes=32)
  c.student = warm_started_student(tiny_model(64, 2, 2, 192, vocab=vocab), demo_episodes=32,
                                   steps=60, batch_size=16, expert_noise=0.2)
  c.rollout.update(tasks_per_step=4, group_size=4)
  c.objective.anneal_steps = 20
  c.optim.update(warmup_steps=2, minibatches=2)
  c.train.update(steps=40, eval_every=10, checkpoint_every=5)
  c.eval.update(episodes=32, greedy=False)
  return c


def paper_run(env: dict) -> ml_collections.ConfigDict:
  """The paper's hyperparameters with an HF student and teacher (paths to fill in):
  150 steps, 8 tasks x 8 rollouts, learning rate 1e-6, kappa 1 -> 0.1 and rho 1 -> 2
  over 80 steps, bf16 compute with per-layer remat (a bf16 teacher, f32 student master
  weights), 8 gradient-accumulation slices per mini-batch, pi_old recomputed by a
  forward (bf16), evaluation every 10 steps without greedy runs."""
  c = base("atod")
  c.env = env
  # the frozen teacher computes in bf16 and has no update: bf16 weights are the same
  # numbers at half the memory (the student keeps f32 master weights)
  c.teacher = teacher_from("hf", dtype="bfloat16", param_dtype="bfloat16", remat=True)
  c.student = student_from("hf", dtype="bfloat16", remat=True)
  c.optim.update(learning_rate=1e-6, warmup_steps=0, weight_decay=0.01, microbatches=8)
  # bf16: the sampler's log-probs are ~1e-2 from a forward's on a Qwen3-0.6B shape (mean
  # 8e-3, p99 2e-2: the size of T-DUR's disagreement signal), so pi_old is recomputed;
  # f32 keeps the sampler's (1e-6 apart). experiments/behaviour_gap.py measures it.
  c.objective.behaviour_logp = "recompute"
  # parameters and optimizer state split over every device: what the ahead-of-time plan
  # fits on v5e-8 / v6e-8 / v5p-8 (docs/scaling.md: python -m atod_jax.scaling)
  c.mesh.update(data=1, fsdp=-1)
  c.train.update(steps=150, keep_checkpoints=2)
  c.eval.update(episodes=140, greedy=False)
  return c
