"""The outer training loop: ``train(config, workdir)``.

Read top to bottom, a run is: validate the config; build the mesh and the task source;
get the teacher (load it, or build it once and cache it) and its evaluation;
:func:`restore_or_init` the student's train state (from the newest checkpoint that
restores, else from its initialisation), placed on the mesh; then per step
:func:`run_step` (roll out, score, advantages, update) and :func:`evaluate_and_save` on
their schedules; then :func:`finish_run` (table, plot, summary, exports).

Every random draw comes from ``(seed, stream, step)`` (:mod:`atod_jax.train.streams`)
and the state (parameters, optimizer, step) is checkpointed with orbax, so a run that is
killed and started again with the same command continues exactly as if it had never
stopped.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from atod_jax.models import checkpoint as model_io
from atod_jax.models.config import ModelConfig
from atod_jax.models.sharding import host_values, leaf_shardings, make_mesh, place, shard_batch
from atod_jax.rollout.trajectory import pack, summarize, trim
from atod_jax.sampling.generate import SamplingParams
from atod_jax.train import checks, distributed, evaluation, logs, methods, resume
from atod_jax.train.config import validate
from atod_jax.train.sources import TaskSource, make_source
from atod_jax.train.steps import (TrainState, checkpoint_item, from_checkpoint, init_state,
                                  make_optimizer)
from atod_jax.train.streams import Stream, key
from atod_jax.train.teacher import behaviour_clone, get_teacher


class TrainingDiverged(RuntimeError):
  """The loss or the parameters became non-finite."""


@dataclasses.dataclass
class Run:
  """What the steps of a run share (built once by :func:`train`)."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: Any
  source: TaskSource
  say: Any
  teacher: tuple | None = None  # (graphdef, params) on the mesh
  teacher_cfg: ModelConfig | None = None
  teacher_metrics: dict | None = None
  graphdef: Any = None  # the student's
  model_cfg: ModelConfig | None = None
  update: methods.Update | None = None
  demos: Any = None  # the sft method's expert episodes
  forced: tuple = ()  # fields a forced resume let differ from the run's config.json


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
  distributed.initialize(config.get("distributed"))  # before anything touches a device
  validate(config)
  quiet = quiet or not distributed.is_main()  # one process speaks
  say = (lambda *a: None) if quiet else functools.partial(print, flush=True)  # noqa: E731
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  forced = resume.check(workdir, config)  # the workdir's run, or a fresh one: nothing mixed
  m = config.mesh
  mesh = make_mesh(m.data, m.fsdp, m.tensor)
  source = make_source(config, workdir, mesh, say)
  try:
    # traced under the mesh: the models place their activations' rows on it
    # (models.sharding.constrain_batch); arrays made outside jit stay where they were
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return _train(Run(config, workdir, mesh, source, say, forced=tuple(forced)), quiet)
  finally:
    source.close()


def _train(run: Run, quiet: bool) -> dict:
  config = run.config
  prepare_teacher(run)
  tx = make_optimizer(config.optim)
  ckpt_dir = os.path.join(run.workdir, "checkpoints")
  state, resumed = restore_or_init(run, tx, ckpt_dir)
  run.update = methods.make_update(config, config.method, run.graphdef,
                                   max_turns=run.source.max_turns, tx=tx,
                                   mesh=run.mesh)
  vocab = (run.model_cfg.vocab_size, run.teacher_cfg.vocab_size)
  checks.need(run.update.distill is None or vocab[0] == vocab[1], "objective.opd_signal",
               f"the full-vocabulary divergence needs one vocabulary; the student has "
               f"{vocab[0]} tokens, the teacher {vocab[1]}")
  if run.update.method.update == "supervised":
    run.demos = pack(run.source.expert_demos(key(config.seed, Stream.SFT_DEMOS),
                                             4 * _rows(config), config.student.sft.expert_noise))
  log = logs.MetricsLog(run.workdir, resumed, write=distributed.is_main())
  if distributed.is_main() and (resumed is None or not run.forced):
    # the config the run was started with (a forced resume keeps the first one)
    with open(os.path.join(run.workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  if resumed is not None and run.forced:
    run.say(f"warning: resuming at step {resumed} with other settings (train.resume=force): "
            + ", ".join(run.forced))
    log.note("resume", resumed, forced=list(run.forced))
  if resumed is None:
    log.write("eval", 0, evaluation.evaluate(config.eval, run.graphdef, state.params, run.source,
                                          run.teacher))
  manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
      max_to_keep=config.train.keep_checkpoints, enable_async_checkpointing=True))
  try:
    state, interrupted = _steps(run, state, log, manager, resumed, quiet)
  finally:
    manager.wait_until_finished()
    manager.close()
    log.flush()
  if interrupted:
    log.close()
    run.say(f"interrupted: saved the checkpoint at step {int(state.step)}; run the same "
            "command again to resume")
    return {"interrupted": True, "step": int(state.step)}
  return finish_run(run, state, log)


def _rows(config) -> int:
  return config.rollout.tasks_per_step * config.rollout.group_size


def prepare_teacher(run: Run) -> None:
  """The teacher on the mesh and its evaluation (the method may not use it; the table
  always compares with it)."""
  graphdef, params, run.teacher_cfg, info = get_teacher(run.config, run.source, run.workdir,
                                                         run.mesh, run.say)
  params = place(params, leaf_shardings(params, run.mesh))
  run.teacher_metrics = evaluation.teacher_metrics(run.config, graphdef, params, run.source,
                                                   info, run.workdir)
  run.say(f"teacher: held-out success {run.teacher_metrics['eval/success']:.3f} "
          f"(T={run.config.eval.temperature})")
  if run.config.teacher.offload:
    # evaluated on the devices (its rollout decodes token by token), then moved to the
    # host before the student's state exists: its scoring copies one layer at a time
    params = place(params, leaf_shardings(params, run.mesh, memory_kind="pinned_host"))
    run.say("teacher: weights in host memory (teacher.offload), copied to the devices "
            "layer by layer when it scores")
  run.teacher = (graphdef, params)


def train_state_shardings(tx, state_shapes: TrainState, mesh) -> TrainState:
  """Parameters by the logical-axis rules; the optimizer's copies of the parameter tree
  (AdamW's moments) like the parameters; everything else (counts, the step, Adafactor's
  factored rows and columns, which are not parameter-shaped) replicated."""
  p_shard = leaf_shardings(state_shapes.params, mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  o_shard = optax.tree_utils.tree_map_params(
      tx, lambda x, sh, p: sh if x.shape == p.shape else replicated,
      state_shapes.opt_state, p_shard, state_shapes.params,
      transform_non_params=lambda _: replicated)
  return TrainState(p_shard, o_shard, replicated,
                    jax.tree.map(lambda _: replicated, state_shapes.handoff))


def restore_or_init(run: Run, tx, ckpt_dir: str) -> tuple[TrainState, int | None]:
  """The student's train state on the mesh and the step it was restored from (None: a
  new run). The structure comes from the config alone (``nnx.eval_shape``: no parameter
  is computed to be thrown away); the values from the newest checkpoint that restores
  (one that does not, e.g. cut short on disk, is moved aside with a warning and the
  next older one is tried), else from :func:`student_params`."""
  s = run.config.student
  if s.init in model_io.SOURCES:
    run.model_cfg = model_io.config_of(s.init, s.path, s.model.to_dict())
  else:
    run.model_cfg = ModelConfig(**s.model)
  run.graphdef, shapes = model_io.abstract(run.model_cfg)
  handoff = methods.initial_handoff(run.config)
  abstract = jax.eval_shape(lambda p: init_state(p, tx, handoff), shapes)
  shardings = train_state_shardings(tx, abstract, run.mesh)
  target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        abstract, shardings)
  restored = _restore_newest(ckpt_dir, target, run.say)
  if restored is not None:
    return restored
  params = student_params(run)
  return place(init_state(params, tx, handoff), shardings), None


def _restore_newest(ckpt_dir: str, target, say) -> tuple[TrainState, int] | None:
  if not os.path.isdir(ckpt_dir):
    return None
  with ocp.CheckpointManager(ckpt_dir) as manager:
    found = sorted(manager.all_steps(), reverse=True)
  for step in found:
    try:
      with ocp.CheckpointManager(ckpt_dir) as manager:
        state = manager.restore(step, args=ocp.args.StandardRestore(checkpoint_item(target)))
      say(f"resuming from the checkpoint at step {step} in {ckpt_dir}")
      return from_checkpoint(state), step
    except Exception as e:  # noqa: BLE001  (any damage: orbax raises many kinds)
      aside = os.path.join(os.path.dirname(ckpt_dir), "checkpoints_damaged", str(step))
      if os.path.exists(aside):
        shutil.rmtree(aside)
      shutil.move(os.path.join(ckpt_dir, str(step)), aside)
      reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
      say(f"warning: the checkpoint at step {step} does not restore ({type(e).__name__}: "
          f"{reason}); moved to {aside}, trying the one before")
  return None


def student_params(run: Run):
  """The student's initial parameters, on the mesh: an HF directory or our checkpoint
  (read straight onto their shards), or fresh (``student.init = "fresh"``), or fresh
  then behaviour-cloned on expert episodes (``"sft"``)."""
  config, s = run.config, run.config.student
  if s.init in model_io.SOURCES:
    _, params, _ = model_io.load(s.init, s.path, s.model.to_dict(), mesh=run.mesh)
    run.say(f"student: loaded from {s.path}")
    return params
  _, params = model_io.fresh(run.model_cfg, key(config.seed, Stream.STUDENT_INIT))
  if s.init == "sft":
    params = behaviour_clone(config, run.graphdef, params, run.source, sft=s.sft,
                             seed=config.seed, desc="student warm start",
                             streams=(Stream.WARM_DEMOS, Stream.WARM_PICK, Stream.WARM_SHUFFLE))
  return params


def run_step(run: Run, state: TrainState, step: int) -> tuple[TrainState, dict]:
  """One training step: the student's rollouts of this step's tasks, then the method's
  update (on them, or on expert episodes for ``sft``). Returns the metrics on the host."""
  config, r = run.config, run.config.rollout
  t0 = time.perf_counter()
  traj = run.source.train_batch(run.graphdef, state.params, key(config.seed, Stream.TASKS, step),
                                key(config.seed, Stream.POLICY, step),
                                SamplingParams(temperature=r.temperature), r.tasks_per_step,
                                r.group_size)
  jax.block_until_ready(traj)
  rollout_seconds = time.perf_counter() - t0
  valid = traj.row_valid.astype(jnp.float32)  # episodes lost to a worker do not count
  per_episode = jnp.sum(traj.invalid * valid) / jnp.maximum(jnp.sum(valid), 1.0)
  metrics = dict(summarize(traj), generated_tokens=traj.num_tokens,
                 invalid_penalty=config.env.invalid_penalty * per_episode)
  if run.demos is not None:  # supervised: a batch of the expert episodes
    idx = jax.random.choice(key(config.seed, Stream.SFT_PICK, step), run.demos.tokens.shape[0],
                            (_rows(config),), replace=False)
    batch = trim(jax.tree.map(lambda x: x[idx], run.demos))
  else:
    batch = trim(pack(traj))  # the layout's padding dropped: same math, shorter rows
  batch = shard_batch(batch, run.mesh)
  if step == config.debug.nan_at_step:  # fault injection (tests): a NaN loss
    batch = batch._replace(behaviour_logp=batch.behaviour_logp * jnp.nan)
  state, upd = run.update(state, batch, key(config.seed, Stream.SHUFFLE, step), run.teacher)
  metrics = {k: float(v) for k, v in jax.device_get({**metrics, **upd}).items()}
  seconds = time.perf_counter() - t0
  metrics["tokens_per_s"] = metrics.pop("generated_tokens") / seconds
  metrics["step_seconds"] = seconds
  metrics["seconds/rollout"] = rollout_seconds
  return state, metrics


def evaluate_and_save(run: Run, state: TrainState, log: logs.MetricsLog, done: int) -> None:
  """The evaluation after step ``done``; the student is kept as ``student_best/`` when
  it is the best so far on the selection metric (:func:`evaluation.selection_key`)."""
  result = evaluation.evaluate(run.config.eval, run.graphdef, state.params, run.source,
                               run.teacher)
  key_ = evaluation.selection_key(run.config.eval)
  best = max((r[key_] for r in log.records if r["kind"] == "eval"), default=-1.0)
  log.write("eval", done, result)
  if result[key_] >= best:  # (every process: orbax writes with all of them)
    model_io.save(os.path.join(run.workdir, "student_best"), state.params, run.model_cfg,
                  {"step": done, **result})


def _steps(run: Run, state, log, manager, resumed, quiet) -> tuple[TrainState, bool]:
  """Steps from the restored one to ``train.steps``; checkpoints on schedule and on an
  interrupt. Returns the state and whether the run was interrupted."""
  t, steps = run.config.train, run.config.train.steps
  start = int(state.step)
  last_saved = resumed
  bar = tqdm(total=steps, initial=start, desc=run.config.method, unit="step",
             dynamic_ncols=True, disable=quiet)
  try:
    with _Interrupt() as stop:
      for step in range(start, steps):
        state, metrics = run_step(run, state, step)
        if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
          raise TrainingDiverged(
              f"training diverged at step {step}: loss is {metrics['loss']}; the last good "
              f"checkpoint (step {last_saved}) in {manager.directory} is intact")
        log.write("train", step, metrics)
        done = step + 1
        if done % t.eval_every == 0 or done == steps:
          evaluate_and_save(run, state, log, done)
        # a signal to any one process (a preempted host) stops every process at this step
        interrupted = distributed.any_process(stop.hit) and done < steps
        if done % t.checkpoint_every == 0 or done == steps or interrupted:
          if last_saved != done:
            distributed.sync(f"checkpoint {done}")  # orbax's barriers are collectives
            manager.save(done, args=ocp.args.StandardSave(checkpoint_item(state)))
            last_saved = done
        bar.update(1)
        bar.set_postfix(success=f"{metrics['success']:.2f}",
                        kappa=f"{metrics.get('kappa', 0):.2f}",
                        rho=f"{metrics.get('rho', 0):.2f}",
                        tok_s=f"{metrics['tokens_per_s']:.0f}")
        if interrupted:
          return state, True
  finally:
    bar.close()
  return state, False


def finish_run(run: Run, state: TrainState, log: logs.MetricsLog) -> dict:
  """The curves, the results table, ``summary.json``, the final student (ours, and HF
  when it came from an HF directory)."""
  config, workdir = run.config, run.workdir
  main = distributed.is_main()  # writes the files; orbax saves with every process
  title = f"{config.method} on {run.source.name}, seed {config.seed}"
  table = logs.results_table(log, run.teacher_metrics, evaluation.selection_key(config.eval))
  evals = [rec for rec in log.records if rec["kind"] == "eval"]
  chosen = max(evals, key=lambda r: r[evaluation.selection_key(config.eval)])
  summary = {"method": config.method, "seed": config.seed, "steps": config.train.steps,
             "final": evals[-1], "best_success": max(e["eval/success"] for e in evals),
             "selected": chosen, "step0": evals[0], "teacher": run.teacher_metrics}
  final_params = host_values(state.params)  # (a collective: before process 0's writing)
  if main:
    try:
      logs.plot(log, run.teacher_metrics, os.path.join(workdir, "curves.png"), title)
    except ImportError:  # a dependency, but a broken install should not lose the results
      run.say("matplotlib is not importable: no curves.png")
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(f"# {title}\n\n{table}\n")
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=1)
  log.close()
  model_io.save(os.path.join(workdir, "student"), final_params, run.model_cfg)
  if main and config.student.init in ("hf", "gguf"):
    from flax import nnx

    from atod_jax.models.hf import save_pretrained
    out = os.path.join(workdir, "student_hf")
    gguf_student = config.student.init == "gguf"
    save_pretrained(nnx.merge(run.graphdef, final_params), out,
                    tokenizer_dir=None if gguf_student else config.student.path)
    if gguf_student:
      from atod_jax.models.tokenizer import Tokenizer
      Tokenizer.from_gguf(config.student.path).save_pretrained(out)
  run.say("\n" + table)
  run.say(f"\nwrote {workdir}/curves.png, results.md, metrics.jsonl, tensorboard/, student/, "
          "student_best/")
  return summary
