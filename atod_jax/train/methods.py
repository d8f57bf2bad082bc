"""What each training method is, and the one update every phase of a run uses.

A :class:`Method` is a record: how the OPD and RL terms are weighted over the steps
(kappa(s), rho(s)), which T-DUR turn weights it uses, whether it needs the teacher and
groups of rollouts, and what kind of update it makes. :func:`make_update` turns a
method and the config into an :class:`Update`, the callable that takes a batch to the
next train state. The main loop, the teacher's GRPO phase and behaviour cloning (the
teacher's build, the student's warm start, the ``sft`` baseline) all go through it.

Adding a method: one entry in :data:`METHODS` (and, if it needs a new term, that term
in :mod:`atod_jax.train.steps` and :func:`Update.__call__`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import optax

from atod_jax.objectives.schedules import AnnealingSchedules, annealing_schedules
from atod_jax.rollout.trajectory import Trajectory
from atod_jax.train import steps


@dataclasses.dataclass(frozen=True)
class Method:
  """One training method.

  ``weights``: ``None`` anneals kappa and rho as ``config.objective`` says; a pair is a
  constant (kappa, rho). ``tdur``: ``None`` takes ``objective.tdur_mode``; a mode forces
  it. ``update``: ``"policy"`` (the clipped surrogate on per-token advantages) or
  ``"supervised"`` (the likelihood of expert episodes).
  """

  doc: str
  weights: tuple[float, float] | None = None
  tdur: str | None = None
  update: str = "policy"

  @property
  def uses_teacher(self) -> bool:
    return self.update == "policy" and (self.weights is None or self.weights[0] != 0.0)

  @property
  def needs_groups(self) -> bool:
    return self.update == "policy" and (self.weights is None or self.weights[1] != 0.0)


METHODS: dict[str, Method] = {
    "atod": Method("ATOD: annealed kappa/rho, T-DUR turn weights (the paper's method)"),
    "opd": Method("on-policy distillation alone: kappa = 1, rho = 0, uniform turn weights",
                  weights=(1.0, 0.0), tdur="uniform"),
    "grpo": Method("GRPO alone: the sparse reward, kappa = 0, rho = 1", weights=(0.0, 1.0),
                   tdur="uniform"),
    "sft": Method("behaviour cloning on expert episodes (no teacher, no reward)",
                  update="supervised"),
    "atod_fixed": Method("ablation: ATOD without annealing (kappa = rho = 1)",
                         weights=(1.0, 1.0)),
    "atod_uniform": Method("ablation: ATOD without T-DUR (uniform turn weights)",
                           tdur="uniform"),
}


def schedules(config: ml_collections.ConfigDict, method: Method) -> AnnealingSchedules:
  """kappa(s) and rho(s) of ``method`` under ``config.objective``."""
  if method.weights is not None:
    kappa, rho = method.weights
    return annealing_schedules(0, kappa, kappa, rho, rho, "constant")
  o = config.objective
  return annealing_schedules(o.anneal_steps, o.kappa_init, o.kappa_min, o.rho_init, o.rho_max,
                             o.schedule)


@dataclasses.dataclass(frozen=True)
class Update:
  """``update(state, batch, key, teacher=None) -> (state, metrics)``: one step of a
  method. ``batch`` is a packed, trimmed :class:`Trajectory` (the student's rollouts, or
  expert episodes for a supervised update); ``teacher`` is ``(graphdef, params)``."""

  method: Method
  graphdef: Any
  tx: optax.GradientTransformation
  sched: AnnealingSchedules
  advantage: steps.AdvantageSpec | None
  loss: steps.PolicyLoss
  walk: steps.Batches
  score_chunks: int = 1

  def init(self, params) -> steps.TrainState:
    return steps.init_state(params, self.tx)

  def __call__(self, state: steps.TrainState, batch: Trajectory, key: jax.Array,
               teacher: tuple | None = None):
    if self.method.update == "supervised":
      return steps.jit_sft_update(self.graphdef, self.tx, state, batch, key, self.walk)
    if self.method.uses_teacher:
      t_graph, t_params = teacher
      teacher_logp = steps.jit_score(t_graph, t_params, batch, temperature=1.0,
                                     chunks=self.score_chunks)
    else:  # the policy's own log-probs: the OPD term is exactly 0
      teacher_logp = batch.behaviour_logp
    kappa, rho = self.sched.kappa(state.step), self.sched.rho(state.step)
    adv, metrics = steps.jit_advantages(batch, teacher_logp, kappa, rho, self.advantage)
    state, upd = steps.jit_policy_update(self.graphdef, self.tx, state, batch, adv, key,
                                         self.loss, self.walk)
    return state, {**metrics, **upd}


def make_update(config: ml_collections.ConfigDict, method: str | Method, graphdef, *,
                max_turns: int, optim: ml_collections.ConfigDict | None = None,
                tx: optax.GradientTransformation | None = None) -> Update:
  """The :class:`Update` of ``method`` with the run's objective, rollout and optimizer
  settings (``optim`` replaces ``config.optim``; ``tx`` replaces the optimizer it
  makes)."""
  m = METHODS[method] if isinstance(method, str) else method
  o, r = config.objective, config.rollout
  optim = optim or config.optim
  micro = optim.get("microbatches", 1)
  advantage = None
  if m.update == "policy":
    advantage = steps.AdvantageSpec(m.tdur or o.tdur_mode, o.estimator, r.tasks_per_step,
                                    max_turns)
  return Update(
      method=m, graphdef=graphdef, tx=tx or steps.make_optimizer(optim),
      sched=schedules(config, m), advantage=advantage,
      loss=steps.PolicyLoss(o.clip_eps, o.clip_eps_high, o.dual_clip, o.aggregation,
                            r.temperature),
      walk=steps.Batches(optim.minibatches, optim.epochs, micro),
      score_chunks=optim.minibatches * micro)


