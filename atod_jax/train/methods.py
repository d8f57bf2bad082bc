"""What each training method is, and the one update every phase of a run uses.

A :class:`Method` is a record: how the OPD and RL terms are weighted over the steps
(kappa(s), rho(s)), which T-DUR turn weights it uses, whether it needs the teacher and
groups of rollouts, and what kind of update it makes. :func:`make_update` turns a method
and the config into an :class:`Update`, the callable that takes a batch to the next
train state (through :func:`atod_jax.train.steps.atod_update`). The main loop, the
teacher's GRPO phase and behaviour cloning (the teacher's build, the student's warm
start, the ``sft`` baseline) all go through it. The ``objective`` section
of the config is read here only (its fields and defaults:
:func:`atod_jax.train.defaults.objective`); :func:`validate_objective` checks them.

Adding a method: one entry in :data:`METHODS`; a new term adds its settings to
:func:`atod_jax.train.defaults.objective` / :func:`validate_objective`, its math to
:mod:`atod_jax.objectives` and its use to :func:`atod_jax.train.steps.advantages` (or,
for a loss term, to :func:`atod_jax.train.steps.policy_update`).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple

import jax
import ml_collections
import optax

from atod_jax import objectives as obj
from atod_jax.objectives.schedules import AnnealingSchedules, annealing_schedules
from atod_jax.rollout.trajectory import Trajectory
from atod_jax.train import steps
from atod_jax.train.checks import choice, need, number


@dataclasses.dataclass(frozen=True)
class Method:
  """One training method.

  ``weights``: ``None`` anneals kappa and rho as ``config.objective`` says; a pair is a
  constant (kappa, rho). ``tdur``: ``None`` takes ``objective.tdur_mode``; a mode forces
  it. ``update``: ``"policy"`` (the clipped surrogate on per-token advantages) or
  ``"supervised"`` (the likelihood of expert episodes). ``rl``: the RL term's advantage,
  ``None`` takes ``objective.rl_advantage`` (``"episode"``: group advantages of the
  episode return; ``"gigpo"``: GiGPO's episode plus step-level advantages). ``signal``:
  the distillation term, ``None`` takes ``objective.opd_signal`` (``"sampled"``: the
  sampled token's ``log pi_T - log pi_old`` in the advantage; ``"full_vocab"``: the
  full-vocabulary divergence of :class:`~atod_jax.train.steps.Distill` as a loss term,
  weighted per token by ``kappa x w_k``).
  """

  doc: str
  weights: tuple[float, float] | None = None
  tdur: str | None = None
  update: str = "policy"
  rl: str | None = None
  signal: str | None = None

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
    "gigpo": Method("GiGPO (verl-agent): GRPO with step-level advantages of anchor states",
                    weights=(0.0, 1.0), tdur="uniform", rl="gigpo"),
    "gkd": Method("GKD: on-policy distillation with a full-vocabulary divergence "
                  "(objective.divergence_beta), no reward", weights=(1.0, 0.0),
                  tdur="uniform", signal="full_vocab"),
}
RL_ADVANTAGES = ("episode", "gigpo")
OPD_SIGNALS = ("sampled", "full_vocab")
BEHAVIOUR_LOGPS = ("sampler", "recompute")


def validate_objective(config: ml_collections.ConfigDict) -> None:
  """Raises :class:`~atod_jax.train.checks.ConfigError` (one line) for a bad ``objective`` field or a method
  the rollout cannot feed."""
  need(config.method in METHODS, "method",
       f"got {config.method!r}; allowed: {', '.join(METHODS)}")
  o = config.objective
  choice(config, "objective.estimator", obj.ESTIMATORS)
  choice(config, "objective.tdur_mode", obj.MODES)
  choice(config, "objective.schedule", obj.SHAPES + ("adaptive",))
  if o.schedule == "adaptive":
    need(isinstance(o.handoff_window, int) and o.handoff_window >= 1,
         "objective.handoff_window", f"must be a whole number >= 1, got {o.handoff_window!r}")
    for f in ("handoff_decay", "handoff_tol"):
      need(isinstance(o[f], (int, float)) and 0.0 <= o[f] < 1.0, f"objective.{f}",
           f"must be in [0, 1), got {o[f]!r}")
  choice(config, "objective.aggregation", obj.AGGREGATIONS)
  number(config, "objective.clip_eps")
  # kappa and rho weigh the two terms: a negative one flips the sign of its term
  for f in ("anneal_steps", "kappa_init", "kappa_min", "rho_init", "rho_max", "clip_eps_high",
            "dual_clip", "opd_clip"):
    number(config, f"objective.{f}", strict=False)
  if o.dual_clip:
    number(config, "objective.dual_clip", low=1.0)
  choice(config, "objective.rl_advantage", RL_ADVANTAGES)
  choice(config, "objective.gigpo_norm", obj.STEP_NORMS)
  number(config, "objective.gigpo_weight", strict=False)
  need(0.0 <= o.gigpo_gamma <= 1.0, "objective.gigpo_gamma",
       f"must be in [0, 1], got {o.gigpo_gamma!r}")
  choice(config, "objective.opd_signal", OPD_SIGNALS)
  choice(config, "objective.behaviour_logp", BEHAVIOUR_LOGPS)
  need(0.0 <= o.divergence_beta <= 1.0, "objective.divergence_beta",
       f"must be in [0, 1], got {o.divergence_beta!r}")
  if METHODS[config.method].needs_groups:
    need(config.rollout.group_size >= 2, "rollout.group_size",
         f"must be >= 2 for method {config.method!r} (group advantages need a group), "
         f"got {config.rollout.group_size}")


def schedules(config: ml_collections.ConfigDict, method: Method) -> AnnealingSchedules:
  """kappa(s) and rho(s) of ``method`` under ``config.objective`` (the adaptive hand-off:
  the linear ones, counted from the step it starts: :class:`Update`)."""
  if method.weights is not None:
    kappa, rho = method.weights
    return annealing_schedules(0, kappa, kappa, rho, rho, "constant")
  o = config.objective
  shape = "linear" if o.schedule == "adaptive" else o.schedule
  return annealing_schedules(o.anneal_steps, o.kappa_init, o.kappa_min, o.rho_init, o.rho_max,
                             shape)


class AdaptiveHandOff(NamedTuple):
  """The adaptive schedule's settings (static): the trigger's window and EMA decay, the
  anneal that follows it."""

  window: int
  decay: float
  tol: float
  anneal_steps: int
  weights: tuple[float, float, float, float]  # kappa_init, kappa_min, rho_init, rho_max


def adaptive_handoff(config: ml_collections.ConfigDict, method: Method
                     ) -> AdaptiveHandOff | None:
  """The hand-off of ``method`` when ``objective.schedule = "adaptive"`` (None: the
  schedule is a function of the step alone)."""
  o = config.objective
  if method.update != "policy" or method.weights is not None or o.schedule != "adaptive":
    return None
  return AdaptiveHandOff(int(o.handoff_window), float(o.handoff_decay), float(o.handoff_tol),
                         int(o.anneal_steps),
                         (o.kappa_init, o.kappa_min, o.rho_init, o.rho_max))


def initial_handoff(config: ml_collections.ConfigDict, method: str | Method | None = None):
  """The train state's ``handoff`` at step 0: :func:`~atod_jax.objectives.handoff_init`
  for the adaptive schedule, else ``()``."""
  m = METHODS[method or config.method] if not isinstance(method, Method) else method
  spec = adaptive_handoff(config, m)
  return () if spec is None else obj.handoff_init(spec.window)


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
  distill: steps.Distill | None = None  # the full-vocabulary term
  recompute: bool = False  # pi_old from a training forward, not the sampler
  handoff: AdaptiveHandOff | None = None  # kappa / rho from the state's hand-off
  rows: Any = None  # steps.rows_sharding of the run's mesh (None: one device)

  @property
  def batch_shards(self) -> int:
    """Devices the batch's rows are split over (the mesh's data x fsdp)."""
    if self.rows is None:
      return 1
    return self.rows.mesh.shape["data"] * self.rows.mesh.shape["fsdp"]

  def slicing(self, batch: Trajectory) -> tuple[int, steps.Batches]:
    """The scoring chunks and the update's walk for ``batch``: the configured counts
    (``score_chunks``, ``walk.microbatches``) moved to the nearest that split each
    device's sequences evenly (:func:`~atod_jax.train.steps.aligned_chunks`; the
    update's sum over slices is exact whatever their number)."""
    seqs = batch.tokens.shape[0] * (batch.tokens.shape[1] if batch.windowed else 1)
    chunks = steps.aligned_chunks(seqs, self.score_chunks, self.batch_shards)
    per_minibatch = seqs // self.walk.minibatches
    micro = steps.aligned_chunks(per_minibatch, self.walk.microbatches, self.batch_shards)
    return chunks, self.walk._replace(microbatches=micro, rows=self.rows)

  def init(self, params) -> steps.TrainState:
    h = () if self.handoff is None else obj.handoff_init(self.handoff.window)
    return steps.init_state(params, self.tx, h)

  def weights(self, state: steps.TrainState):
    """``(kappa, rho)`` for the update of ``state``."""
    if self.handoff is None:
      return self.sched.kappa(state.step), self.sched.rho(state.step)
    return obj.adaptive_weights(state.handoff, state.step, self.handoff.anneal_steps,
                                *self.handoff.weights)

  @property
  def scores_tokens(self) -> bool:
    """Whether the teacher scores the sampled tokens: for the sampled OPD signal, or for
    T-DUR's turn weights (GKD's loss reads the teacher's logits itself, and with uniform
    weights needs no scores: one teacher forward less a step)."""
    return self.method.uses_teacher and (self.advantage.signal == "sampled"
                                         or self.advantage.tdur_mode != "uniform")

  def __call__(self, state: steps.TrainState, batch: Trajectory, key: jax.Array,
               teacher: tuple | None = None):
    """Also returns where the time went: ``seconds/score`` (the teacher's scoring and a
    recomputed pi_old) and ``seconds/update`` (advantages and the optimizer steps)."""
    t0 = time.perf_counter()
    if self.method.update == "supervised":
      spec = steps.UpdateSpec(self.graphdef, self.tx, self.walk)
      state, upd = steps.jit_atod_update(spec, state, batch, key)
      jax.block_until_ready(upd)
      return state, {**upd, "seconds/score": 0.0, "seconds/update": time.perf_counter() - t0}
    chunks, walk = self.slicing(batch)
    if self.recompute:  # pi_old as the update's own forward computes it
      batch = batch._replace(behaviour_logp=steps.jit_score(
          self.graphdef, state.params, batch, temperature=self.loss.temperature,
          chunks=chunks, rows=self.rows))
    if self.scores_tokens:
      t_graph, t_params = teacher
      teacher_logp = steps.jit_score(t_graph, t_params, batch, temperature=1.0,
                                     chunks=chunks, rows=self.rows)
    else:  # the policy's own log-probs: the sampled OPD term is exactly 0
      teacher_logp = batch.behaviour_logp
    jax.block_until_ready((teacher_logp, batch.behaviour_logp))
    t1 = time.perf_counter()
    t_graph, t_params = teacher if self.distill is not None else (None, None)
    spec = steps.UpdateSpec(self.graphdef, self.tx, walk, self.loss, self.advantage,
                            self.distill, t_graph,
                            None if self.handoff is None else (self.handoff.decay,
                                                               self.handoff.tol))
    kappa, rho = self.weights(state)
    state, upd = steps.jit_atod_update(spec, state, batch, key, teacher_logp, kappa, rho,
                                       t_params)
    jax.block_until_ready(upd)
    return state, {**upd, "seconds/score": t1 - t0, "seconds/update": time.perf_counter() - t1}


def make_update(config: ml_collections.ConfigDict, method: str | Method, graphdef, *,
                max_turns: int, optim: ml_collections.ConfigDict | None = None,
                tx: optax.GradientTransformation | None = None, mesh=None) -> Update:
  """The :class:`Update` of ``method`` with the run's objective, rollout and optimizer
  settings (``optim`` replaces ``config.optim``; ``tx`` replaces the optimizer it
  makes; ``mesh``: the run's, whose data axes the batch's rows are split over)."""
  m = METHODS[method] if isinstance(method, str) else method
  o, r = config.objective, config.rollout
  optim = optim or config.optim
  micro = optim.microbatches
  advantage, distill = None, None
  if m.update == "policy":
    signal = m.signal or o.opd_signal
    advantage = steps.AdvantageSpec(m.tdur or o.tdur_mode, o.estimator, r.tasks_per_step, max_turns,
                              m.rl or o.rl_advantage,
                              (o.gigpo_gamma, o.gigpo_weight, o.gigpo_norm), signal,
                              float(o.opd_clip))
    if signal == "full_vocab" and m.uses_teacher:
      distill = steps.Distill(float(o.divergence_beta))
  return Update(
      method=m, graphdef=graphdef, tx=tx or steps.make_optimizer(optim),
      sched=schedules(config, m), advantage=advantage,
      loss=steps.PolicyLoss(o.clip_eps, o.clip_eps_high, o.dual_clip, o.aggregation,
                            r.temperature),
      walk=steps.Batches(optim.minibatches, optim.epochs, micro),
      score_chunks=optim.minibatches * micro, distill=distill,
      recompute=m.update == "policy" and o.behaviour_logp == "recompute",
      rows=steps.rows_sharding(mesh), handoff=adaptive_handoff(config, m))


