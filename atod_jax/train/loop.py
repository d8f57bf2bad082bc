"""The outer training loop: ``train(config, workdir)``.

Per step ``s``: draw tasks, roll out ``group_size`` episodes per task with the student,
score the generated tokens with the frozen teacher, compute the ATOD advantages with
kappa(s) / rho(s), apply the clipped-surrogate update; evaluate and checkpoint on their
schedules. Every random draw comes from ``(seed, purpose, step)``, and the state
(parameters, optimizer, step) is checkpointed with orbax, so a run that is killed and
started again with the same command continues exactly as if it had never stopped.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from atod_jax.models.hf import save_pretrained
from atod_jax.models.sharding import make_mesh, shard_batch, state_shardings
from atod_jax.rollout.trajectory import pack, summarize, trim
from atod_jax.sampling.generate import SamplingParams
from atod_jax.train import agents, logs
from atod_jax.train.config import model_config, schedules, validate
from atod_jax.train.steps import (
    TrainState, advantages, init_state, jit_policy_update, jit_score, jit_sft_update, make_optimizer)
from atod_jax.train.tasks import make_tasks
from atod_jax.train.teacher import behaviour_clone, get_teacher, teacher_eval


class TrainingDiverged(RuntimeError):
  """The loss or the parameters became non-finite."""


def _student(config, tasks, say):
  s = config.student
  if s.init in ("hf", "checkpoint"):
    graphdef, params, cfg = agents.load_any(s.init, s.path, s.model.to_dict())
    say(f"student: loaded from {s.path}")
    return graphdef, params, cfg
  cfg = model_config(s.model)
  graphdef, params = agents.fresh_model(cfg, config.seed, 1)
  if s.init == "sft":
    params = behaviour_clone(graphdef, params, tasks, episodes=s.sft.demo_episodes,
                             steps=s.sft.steps, batch_size=s.sft.batch_size,
                             learning_rate=s.sft.learning_rate, seed=config.seed + 10_000,
                             desc="student warm start", noise=s.sft.expert_noise)
  return graphdef, params, cfg


def _student_model_config(config):
  if config.student.init in ("hf", "checkpoint"):
    return agents.config_of(config.student.init, config.student.path,
                            config.student.model.to_dict())
  return model_config(config.student.model)


class _Interrupt:
  """SIGINT / SIGTERM: finish the current step, save, exit."""

  def __init__(self):
    self.hit = False
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.hit:  # second Ctrl-C: stop now
      raise KeyboardInterrupt
    self.hit = True

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def train(config: ml_collections.ConfigDict, workdir: str, *, quiet: bool = False) -> dict:
  """Runs (or resumes) the run in ``workdir``; returns the final summary dict.

  Writes ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``, ``curves.png``,
  ``results.md``, ``summary.json``, ``student/`` (the final student), ``student_best/``
  (the one with the best held-out success so far) and ``student_hf/`` (when the student
  came from an HF directory) into ``workdir``.
  """
  validate(config)
  say = (lambda *a: None) if quiet else functools.partial(print, flush=True)  # noqa: E731
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=1))
  m = config.mesh
  mesh = make_mesh(m.data, m.fsdp, m.tensor)
  tasks = make_tasks(config, workdir, mesh, say)
  try:
    return _train(config, workdir, say, quiet, mesh, tasks)
  finally:
    tasks.close()


def _train(config, workdir, say, quiet, mesh, tasks) -> dict:
  t_graph, t_params, _, t_info = get_teacher(config, tasks, workdir, say)
  teacher_metrics = teacher_eval(config, t_graph, t_params, tasks, t_info, workdir)
  say(f"teacher: held-out success {teacher_metrics['eval/success']:.3f} "
      f"(T={config.eval.temperature})")

  tx = make_optimizer(config.optim)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
      max_to_keep=config.train.keep_checkpoints, enable_async_checkpointing=True))
  latest = manager.latest_step()
  s_model_cfg = _student_model_config(config)
  if latest is None:
    graphdef, params, _ = _student(config, tasks, say)
    state = init_state(params, tx)
  else:  # the structure from the config, the values from the checkpoint
    graphdef, params = agents.fresh_model(s_model_cfg, config.seed, 1)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, init_state(params, tx))
    state = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
    say(f"resuming from the checkpoint at step {latest} in {ckpt_dir}")
  # Place the state on the mesh: parameters by the logical-axis rules, the rest alike.
  # The optimizer's copies of the parameter tree (moments) follow the parameters;
  # everything else in its state (counts) is replicated.
  p_shard = state_shardings(state.params, mesh)
  like_params = jax.tree.unflatten(jax.tree.structure(state.params), jax.tree.leaves(p_shard))
  o_shard = optax.tree_utils.tree_map_params(
      tx, lambda _, sh: sh, state.opt_state, like_params,
      transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()))
  state = TrainState(jax.device_put(state.params, p_shard),
                     jax.device_put(state.opt_state, o_shard),
                     jax.device_put(state.step, NamedSharding(mesh, PartitionSpec())))
  t_params = jax.device_put(t_params, state_shardings(t_params, mesh))
  log = logs.MetricsLog(workdir, latest)
  start_step = int(state.step)
  if start_step == 0:
    log.write("eval", 0, agents.evaluate_protocol(config.eval, graphdef, state.params, tasks))

  r, o, opt = config.rollout, config.objective, config.optim
  sched, tdur_mode = schedules(config)
  rows = r.tasks_per_step * r.group_size
  micro = opt.get("microbatches", 1)
  sampling = SamplingParams(temperature=r.temperature)
  adv_fn = jax.jit(functools.partial(
      advantages, sched=sched, tdur_mode=tdur_mode, estimator=o.estimator,
      num_groups=r.tasks_per_step, max_turns=tasks.max_turns))
  demos = None
  if config.method == "sft":
    demos = pack(tasks.expert_demos(config.seed + 20_000, 4 * rows,
                                    config.student.sft.expert_noise))
  steps = config.train.steps
  bar = tqdm(total=steps, initial=start_step, desc=config.method, unit="step",
             dynamic_ncols=True, disable=quiet)
  interrupted = False
  last_saved = latest

  def save(step):
    nonlocal last_saved
    if last_saved != step:
      manager.save(step, args=ocp.args.StandardSave(state))
      last_saved = step

  try:
    with _Interrupt() as stop:
      for step in range(start_step, steps):
        t0 = time.perf_counter()
        traj = tasks.train_batch(graphdef, state.params, step, sampling)
        metrics = dict(summarize(traj), generated_tokens=traj.num_tokens)
        traj = shard_batch(trim(pack(traj)), mesh)  # the layout's padding dropped: same
        # math, shorter rows
        shuffle = agents.draw(config.seed, agents.SHUFFLE, step)
        if config.method == "sft":
          idx = jax.random.choice(shuffle, demos.tokens.shape[0], (rows,), replace=False)
          batch = shard_batch(trim(jax.tree.map(lambda x: x[idx], demos)), mesh)
          state, upd = jit_sft_update(graphdef, tx, state, batch, shuffle,
                                      minibatches=opt.minibatches, epochs=opt.epochs,
                                      microbatches=micro)
        else:
          t_logp = jit_score(t_graph, t_params, traj, temperature=1.0,
                             chunks=opt.minibatches * micro)
          adv, adv_metrics = adv_fn(traj, t_logp, state.step)
          if step == config.debug.nan_at_step:
            adv = adv * jnp.nan
          state, upd = jit_policy_update(
              graphdef, tx, state, traj, adv, shuffle, minibatches=opt.minibatches,
              epochs=opt.epochs, clip_eps=o.clip_eps, clip_eps_high=o.clip_eps_high,
              dual_clip=o.dual_clip, aggregation=o.aggregation, temperature=r.temperature,
              microbatches=micro)
          metrics.update(adv_metrics)
        metrics.update(upd)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}  # one transfer
        # finite loss and gradients (before clipping) mean finite updated parameters
        if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
          raise TrainingDiverged(
              f"training diverged at step {step}: loss is {metrics['loss']}; the last good "
              f"checkpoint (step {last_saved}) in {ckpt_dir} is intact")
        seconds = time.perf_counter() - t0
        metrics["tokens_per_s"] = metrics.pop("generated_tokens") / seconds
        metrics["step_seconds"] = seconds
        log.write("train", step, metrics)
        done = step + 1
        if done % config.train.eval_every == 0 or done == steps:
          result = agents.evaluate_protocol(config.eval, graphdef, state.params, tasks)
          best = max((r["eval/success"] for r in log.records if r["kind"] == "eval"),
                     default=-1.0)
          log.write("eval", done, result)
          if result["eval/success"] >= best:  # the paper reports the best validation
            agents.save_model(os.path.join(workdir, "student_best"), graphdef,
                              jax.device_get(state.params), s_model_cfg,
                              {"step": done, **result})
        if done % config.train.checkpoint_every == 0 or done == steps:
          save(done)
        bar.update(1)
        bar.set_postfix(success=f"{metrics['success']:.2f}",
                        kappa=f"{metrics.get('kappa', 0):.2f}", rho=f"{metrics.get('rho', 0):.2f}",
                        tok_s=f"{metrics['tokens_per_s']:.0f}")
        if stop.hit and done < steps:
          save(done)
          interrupted = True
          break
  finally:
    bar.close()
    manager.wait_until_finished()
    manager.close()
    log.flush()
  if interrupted:
    log.close()
    say(f"interrupted: saved the checkpoint at step {int(state.step)}; run the same command "
        "again to resume")
    return {"interrupted": True, "step": int(state.step)}

  title = f"{config.method} on {tasks.name}, seed {config.seed}"
  try:
    logs.plot(log, teacher_metrics, os.path.join(workdir, "curves.png"), title)
  except ImportError:  # a dependency, but a broken install should not lose the results
    say("matplotlib is not importable: no curves.png")
  table = logs.results_table(log, teacher_metrics)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(f"# {title}\n\n{table}\n")
  evals = [rec for rec in log.records if rec["kind"] == "eval"]
  summary = {"method": config.method, "seed": config.seed, "steps": steps,
             "final": evals[-1], "best_success": max(e["eval/success"] for e in evals),
             "step0": evals[0], "teacher": teacher_metrics}
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  log.close()
  final_params = jax.device_get(state.params)
  agents.save_model(os.path.join(workdir, "student"), graphdef, final_params, s_model_cfg)
  if config.student.init == "hf":
    from flax import nnx
    save_pretrained(nnx.merge(graphdef, final_params), os.path.join(workdir, "student_hf"),
                    tokenizer_dir=config.student.path)
  say("\n" + table)
  say(f"\nwrote {workdir}/curves.png, results.md, metrics.jsonl, tensorboard/, student/, "
      "student_best/")
  return summary
