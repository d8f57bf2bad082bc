"""The frozen teacher: loaded from a directory, or built once and cached.

Building (``teacher.source = "build"``): a model of ``teacher.model`` shape is trained by
behaviour cloning on expert demonstrations of training tasks, optionally followed by
``teacher.build.grpo_steps`` GRPO steps on its own rollouts (as the paper's teachers
were), then saved with the
fingerprint of everything that shaped it; a later run whose fingerprint matches loads it
instead of building again. The student's optional warm start (``student.init = "sft"``)
is the same procedure with its own (smaller) budget.
"""
from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import optax
from tqdm.auto import tqdm

from atod_jax.models import PARAMS_LAYOUT
from atod_jax.rollout.trajectory import pack, trim
from atod_jax.train import agents
from atod_jax.train.config import model_config
from atod_jax.objectives.schedules import annealing_schedules
from atod_jax.sampling.generate import SamplingParams
from atod_jax.train.steps import (
    advantages, init_state, jit_policy_update, jit_sft_update, make_optimizer)


def behaviour_clone(graphdef, params, tasks, *, episodes: int, steps: int,
                    batch_size: int, learning_rate: float, seed: int, desc: str,
                    noise: float = 0.0):
  """``steps`` SFT updates on mini-batches of ``episodes`` expert episodes of ``tasks``
  (see ``atod_jax.train.tasks``)."""
  if steps == 0:
    return params
  demos = pack(tasks.expert_demos(seed, episodes, noise))
  valid = jax.device_get(demos.row_valid)
  if not valid.all():  # episodes lost to an environment failure are not demonstrations
    demos = jax.tree.map(lambda x: x[valid], demos)
    if not valid.any():
      raise RuntimeError(f"{desc}: all {episodes} expert episodes were lost to environment "
                         "failures (a worker crashed or a step outlasted env.step_timeout; "
                         "the log above has the workers' errors)")
    episodes = int(valid.sum())
  # warm-up then cosine decay: a constant rate leaves the clone's success swinging by tens
  # of points from one step to the next
  tx = optax.adam(optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, max(1, steps // 10), steps, learning_rate * 0.05))
  state = init_state(params, tx)
  bar = tqdm(range(steps), desc=desc, unit="step", leave=False, dynamic_ncols=True)
  for i in bar:
    idx = jax.random.choice(agents.draw(seed, agents.SHUFFLE, i), episodes, (batch_size,),
                            replace=episodes < batch_size)
    batch = trim(jax.tree.map(lambda x: x[idx], demos))
    state, metrics = jit_sft_update(graphdef, tx, state, batch, agents.draw(seed, agents.SHUFFLE, i),
                                    minibatches=1)
    if i % 10 == 0 or i == steps - 1:
      bar.set_postfix(nll=f"{float(metrics['loss']):.3f}")
  return state.params


def reinforce(graphdef, params, tasks, config, *, steps: int, learning_rate: float,
              desc: str = "teacher GRPO"):
  """``steps`` GRPO updates of a model on its own rollouts of training tasks (kappa = 0,
  rho = 1: the sparse reward only, uniform turn weights), with the run's rollout,
  objective and optimizer settings at ``learning_rate``: how the paper's teachers were
  trained after their start. Returns the new parameters and the per-step success."""
  if steps == 0:
    return params, []
  r, o = config.rollout, config.objective
  optim = ml_collections.ConfigDict(dict(config.optim.to_dict(), learning_rate=learning_rate,
                                         warmup_steps=0))
  tx = make_optimizer(optim)
  adv_fn = jax.jit(functools.partial(
      advantages, sched=annealing_schedules(0, 0.0, 0.0, 1.0, 1.0, "constant"),
      tdur_mode="uniform", estimator=o.estimator, num_groups=r.tasks_per_step,
      max_turns=tasks.max_turns))
  sampling = SamplingParams(temperature=r.temperature)
  state = init_state(params, tx)
  success = []
  bar = tqdm(range(steps), desc=desc, unit="step", leave=False, dynamic_ncols=True)
  for i in bar:
    step = _TEACHER_STEPS + i  # draws of their own, apart from the student's steps
    traj = trim(pack(tasks.train_batch(graphdef, state.params, step, sampling)))
    # the teacher's own log-probs as "teacher" scores: the OPD term is exactly 0
    adv, _ = adv_fn(traj, traj.behaviour_logp, state.step)
    state, _ = jit_policy_update(
        graphdef, tx, state, traj, adv, agents.draw(config.seed, agents.SHUFFLE, step),
        minibatches=optim.minibatches, epochs=optim.epochs, clip_eps=o.clip_eps,
        clip_eps_high=o.clip_eps_high, dual_clip=o.dual_clip, aggregation=o.aggregation,
        temperature=r.temperature, microbatches=optim.get("microbatches", 1))
    success.append(float(jnp.mean(traj.won.astype(jnp.float32) * traj.row_valid) /
                         jnp.maximum(jnp.mean(traj.row_valid.astype(jnp.float32)), 1e-9)))
    bar.set_postfix(success=f"{success[-1]:.2f}")
  return state.params, success


_TEACHER_STEPS = 1_000_000


def _fingerprint(config: ml_collections.ConfigDict) -> dict:
  """What makes a built teacher, as JSON gives it back (tuples as lists: the stored copy
  must compare equal)."""
  return json.loads(json.dumps({"params_layout": PARAMS_LAYOUT,
                                "model": config.teacher.model.to_dict(),
                                "build": config.teacher.build.to_dict(),
                                "env": config.env.to_dict()}))


def get_teacher(config: ml_collections.ConfigDict, tasks, workdir: str, say=print):
  """``(graphdef, params, cfg, info)`` of the frozen teacher; ``info`` holds how it was
  made and its evaluation (computed once and cached with it)."""
  t = config.teacher
  if t.source in ("hf", "checkpoint"):
    graphdef, params, cfg = agents.load_any(t.source, t.path, t.model.to_dict())
    return graphdef, params, cfg, {"source": t.source, "path": t.path}
  cache = os.path.abspath(os.path.expanduser(t.cache_dir or os.path.join(workdir, "teacher")))
  fingerprint = _fingerprint(config)
  info_file = os.path.join(cache, "info.json")
  if os.path.exists(info_file):
    with open(info_file) as f:
      info = json.load(f)
    if info.get("fingerprint") == fingerprint:
      graphdef, params, cfg = agents.load_model(cache)
      say(f"teacher: reusing the one built in {cache}")
      return graphdef, params, cfg, dict(info, dir=cache)
    say(f"teacher: {cache} holds a teacher built with other settings; rebuilding")
  b = t.build
  cfg = model_config(t.model)
  start = time.time()
  graphdef, params = agents.fresh_model(cfg, b.seed)
  say(f"teacher: building ({cfg.num_layers} layers, hidden {cfg.hidden_size}) by behaviour "
      f"cloning on {b.demo_episodes} expert episodes for {b.sft_steps} steps")
  params = behaviour_clone(graphdef, params, tasks, episodes=b.demo_episodes, steps=b.sft_steps,
                           batch_size=b.batch_size, learning_rate=b.learning_rate, seed=b.seed,
                           desc="teacher", noise=b.expert_noise)
  grpo_steps = b.get("grpo_steps", 0)
  if grpo_steps:
    say(f"teacher: then {grpo_steps} GRPO steps on its own rollouts")
  params, grpo_success = reinforce(graphdef, params, tasks, config, steps=grpo_steps,
                                   learning_rate=b.get("grpo_learning_rate", 5e-4))
  info = {"source": "build", "fingerprint": fingerprint, "build_seconds": time.time() - start,
          "grpo_steps": grpo_steps, "grpo_success": grpo_success}
  agents.save_model(cache, graphdef, params, cfg, info)
  return graphdef, params, cfg, dict(info, dir=cache)


def teacher_eval(config, graphdef, params, tasks, info: dict, workdir: str) -> dict:
  """The teacher's held-out evaluation under the run's protocol, cached by protocol next
  to a built teacher (so runs sharing it evaluate it once) or in the workdir."""
  e = config.eval
  protocol = json.loads(json.dumps({"episodes": e.episodes, "temperature": e.temperature,
                                    "seed": e.seed, "env": config.env.to_dict()}))
  cache_file = os.path.join(info.get("dir", workdir), "teacher_eval.json")
  who = info.get("fingerprint", info.get("path"))
  if os.path.exists(cache_file):
    with open(cache_file) as f:
      cached = json.load(f)
    if cached.get("protocol") == protocol and cached.get("teacher") == who:
      return cached["metrics"]
  metrics = agents.evaluate_protocol(e, graphdef, params, tasks)
  with open(cache_file, "w") as f:
    json.dump({"protocol": protocol, "teacher": who, "metrics": metrics}, f, indent=1)
  return metrics
