"""The frozen teacher: loaded from a directory, or built once and cached.

Building (``teacher.source = "build"``): a model of ``teacher.model`` shape (or a
pretrained one, ``teacher.build.init`` / ``init_path``) is trained by behaviour cloning on expert demonstrations of training tasks, optionally followed by
``teacher.build.grpo_steps`` GRPO steps on its own rollouts (as the paper's teachers
were), then saved with the fingerprint of everything that shaped it; a later run whose
fingerprint matches loads it instead of building again. The student's optional warm
start (``student.init = "sft"``) is the same behaviour cloning with its own budget.
All draws use the build's seed (``teacher.build.seed``) and its own streams.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import optax
from tqdm.auto import tqdm

from atod_jax.models import PARAMS_LAYOUT, ModelConfig
from atod_jax.models import checkpoint as model_io
from atod_jax.rollout.trajectory import pack, trim
from atod_jax.sampling.generate import SamplingParams
from atod_jax.train import methods
from atod_jax.train.streams import Stream, key


def behaviour_clone(config, graphdef, params, source, *, sft, seed: int,
                    streams: tuple[Stream, Stream, Stream], desc: str, select=None):
  """``sft.steps`` supervised updates on batches of ``sft.batch_size`` drawn from
  ``sft.demo_episodes`` expert episodes of ``source`` (``sft.expert_noise`` of their
  turns random, not imitated); ``streams``: the demos', the batches' and the shuffles'.
  With ``select`` (a :class:`Selector`), the parameters it scores best are returned."""
  if sft.steps == 0:
    return params
  demos_stream, pick_stream, shuffle_stream = streams
  demos = pack(source.expert_demos(key(seed, demos_stream), sft.demo_episodes,
                                   sft.expert_noise))
  valid = jax.device_get(demos.row_valid)
  if not valid.any():
    raise RuntimeError(f"{desc}: all {sft.demo_episodes} expert episodes were lost to "
                       "environment failures (a worker crashed or a step outlasted "
                       "env.step_timeout; the log above has the workers' errors)")
  demos = jax.tree.map(lambda x: x[valid], demos)  # lost episodes are no demonstrations
  episodes = int(valid.sum())
  # warm-up then cosine decay: a constant rate leaves the clone's success swinging by tens
  # of points from one step to the next
  warmup = max(1, sft.steps // 10) if sft.steps > 1 else 0  # (one step: no warm-up)
  tx = optax.adam(optax.warmup_cosine_decay_schedule(
      0.0, sft.learning_rate, warmup, sft.steps, sft.learning_rate * 0.05))
  once = ml_collections.ConfigDict(dict(minibatches=1, epochs=1, microbatches=1))
  update = methods.make_update(config, "sft", graphdef, max_turns=source.max_turns,
                               optim=once, tx=tx)
  state = update.init(params)
  bar = tqdm(range(sft.steps), desc=desc, unit="step", leave=False, dynamic_ncols=True,
             disable=jax.process_index() != 0)  # one process speaks
  for i in bar:
    idx = jax.random.choice(key(seed, pick_stream, i), episodes, (sft.batch_size,),
                            replace=episodes < sft.batch_size)
    state, metrics = update(state, trim(jax.tree.map(lambda x: x[idx], demos)),
                            key(seed, shuffle_stream, i))
    if select is not None:
      select.offer(i + 1, graphdef, state.params, last=i == sft.steps - 1)
    if i % 10 == 0 or i == sft.steps - 1:
      bar.set_postfix(nll=f"{float(metrics['loss']):.3f}")
  return state.params if select is None else select.best


class Selector:
  """Keeps the best parameters of a build by success on the selection split
  (``eval.select_split``, else the training split), scored every ``every`` steps and at
  the end on ``episodes`` episodes at the validation temperature; ``history`` records
  ``(step, success)``."""

  def __init__(self, config, source, *, every: int, episodes: int, phase: str):
    self.source, self.every, self.phase = source, every, phase
    self.split = config.eval.select_split or config.env.get("train_split", "train")
    self.episodes, self.temperature = episodes, config.eval.temperature
    self.seed = config.eval.seed
    self.best, self.best_score, self.history = None, -1.0, []

  def offer(self, step: int, graphdef, params, last: bool = False) -> None:
    if step % self.every and not last:
      return
    score = self.source.evaluate(graphdef, params, episodes=self.episodes,
                                 temperature=self.temperature, seed=self.seed,
                                 split=self.split)["success"]
    self.history.append((self.phase, step, score))
    if score > self.best_score:  # a copy: the update donates the state it is given
      self.best, self.best_score = jax.tree.map(jnp.copy, params), score


def reinforce(config, graphdef, params, source, *, steps: int, learning_rate: float,
              seed: int, desc: str = "teacher GRPO", select: Selector | None = None):
  """``steps`` GRPO updates of a model on its own rollouts of training tasks (the
  ``grpo`` method: the sparse reward only), with the run's rollout, objective and
  optimizer settings at ``learning_rate``: how the paper's teachers were trained after
  their start. Returns the new parameters (with ``select``, the best it scored, the
  starting ones included) and the per-step success."""
  if steps == 0:
    return params, []
  r = config.rollout
  optim = ml_collections.ConfigDict(dict(config.optim.to_dict(), learning_rate=learning_rate,
                                         warmup_steps=0))
  update = methods.make_update(config, "grpo", graphdef, max_turns=source.max_turns,
                               optim=optim)
  sampling = SamplingParams(temperature=r.temperature)
  # a copy: the update donates its state, and ``params`` may be the selector's best
  # (kept from behaviour cloning), which must outlive the first update
  state = update.init(jax.tree.map(jnp.copy, params))
  success = []
  bar = tqdm(range(steps), desc=desc, unit="step", leave=False, dynamic_ncols=True)
  for i in bar:
    traj = trim(pack(source.train_batch(
        graphdef, state.params, key(seed, Stream.TEACHER_RL_TASKS, i),
        key(seed, Stream.TEACHER_RL_POLICY, i), sampling, r.tasks_per_step, r.group_size)))
    state, _ = update(state, traj, key(seed, Stream.TEACHER_RL_SHUFFLE, i))
    success.append(float(jnp.mean(traj.won.astype(jnp.float32) * traj.row_valid) /
                         jnp.maximum(jnp.mean(traj.row_valid.astype(jnp.float32)), 1e-9)))
    if select is not None:
      select.offer(i + 1, graphdef, state.params, last=i == steps - 1)
    bar.set_postfix(success=f"{success[-1]:.2f}")
  return (state.params if select is None else select.best), success


def fingerprint(config: ml_collections.ConfigDict) -> dict:
  """What makes a built teacher, as JSON gives it back (tuples as lists: the stored copy
  must compare equal)."""
  e = config.eval  # the selection's protocol shapes the build too
  env = config.env.to_dict()
  if not config.teacher.build.grpo_steps:
    # the invalid-turn penalty is a reward: behaviour cloning and the selection (by
    # success) never see it, so a cloned teacher serves any penalty
    env.pop("invalid_penalty", None)
  return json.loads(json.dumps({"params_layout": PARAMS_LAYOUT,
                                "model": config.teacher.model.to_dict(),
                                "build": config.teacher.build.to_dict(),
                                "env": env,
                                "select": [e.select_split, e.temperature, e.seed]}))


def _build(config, source, cache: str, say) -> tuple:
  b = config.teacher.build
  start = time.time()
  init = b.init
  if init == "fresh":
    cfg = ModelConfig(**config.teacher.model)
    graphdef, params = model_io.fresh(cfg, key(b.seed, Stream.TEACHER_INIT))
    origin = ""
  else:  # a pretrained start
    graphdef, params, cfg = model_io.load(init, b.init_path, config.teacher.model.to_dict())
    origin = f" from {os.path.basename(os.path.normpath(b.init_path))}"
  say(f"teacher: building ({cfg.num_layers} layers, hidden {cfg.hidden_size}{origin}) by "
      f"behaviour cloning on {b.demo_episodes} expert episodes for {b.sft_steps} steps")
  sft = ml_collections.ConfigDict(dict(steps=b.sft_steps, demo_episodes=b.demo_episodes,
                                       batch_size=b.batch_size, learning_rate=b.learning_rate,
                                       expert_noise=b.expert_noise))
  every = b.select_every
  select = Selector(config, source, every=every, episodes=b.select_episodes,
                    phase="sft") if every else None
  params = behaviour_clone(config, graphdef, params, source, sft=sft, seed=b.seed, desc="teacher",
                           streams=(Stream.TEACHER_DEMOS, Stream.TEACHER_PICK,
                                    Stream.TEACHER_SHUFFLE), select=select)
  grpo_steps = b.grpo_steps
  if grpo_steps:
    say(f"teacher: then {grpo_steps} GRPO steps on its own rollouts")
    if select is not None:
      select.phase = "grpo"
  params, grpo_success = reinforce(config, graphdef, params, source, steps=grpo_steps,
                                   learning_rate=b.grpo_learning_rate, seed=b.seed,
                                   select=select if grpo_steps else None)
  info = {"source": "build", "fingerprint": fingerprint(config),
          "build_seconds": time.time() - start, "grpo_steps": grpo_steps,
          "grpo_success": grpo_success}
  if select is not None:
    phase, step, score = max(select.history, key=lambda h: h[2])
    info["selection"] = {"split": select.split, "history": select.history,
                         "chosen": {"phase": phase, "step": step, "success": score}}
    say(f"teacher: kept the {phase} step {step} ({score:.3f} success on {select.split!r}, "
        f"{select.episodes} episodes)")
  model_io.save(cache, params, cfg, info)
  return graphdef, params, cfg, dict(info, dir=cache)


def get_teacher(config: ml_collections.ConfigDict, source, workdir: str, mesh=None, say=print):
  """``(graphdef, params, cfg, info)`` of the frozen teacher (on ``mesh``); ``info`` holds
  how it was made."""
  t = config.teacher
  if t.source in model_io.SOURCES:
    graphdef, params, cfg = model_io.load(t.source, t.path, t.model.to_dict(), mesh=mesh)
    return graphdef, params, cfg, {"source": t.source, "path": t.path}
  cache = os.path.abspath(os.path.expanduser(t.cache_dir or os.path.join(workdir, "teacher")))
  info_file = os.path.join(cache, "info.json")
  if os.path.exists(info_file):
    with open(info_file) as f:
      info = json.load(f)
    if info.get("fingerprint") == fingerprint(config):
      graphdef, params, cfg = model_io.load("checkpoint", cache, mesh=mesh)
      say(f"teacher: reusing the one built in {cache}")
      return graphdef, params, cfg, dict(info, dir=cache)
    say(f"teacher: {cache} holds a teacher built with other settings; rebuilding")
  return _build(config, source, cache, say)
