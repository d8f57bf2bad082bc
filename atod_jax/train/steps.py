"""The pure, jitted pieces of a training step.

State is a plain pytree (:class:`TrainState`: NNX parameter state, optax state, step), so
it checkpoints with orbax as is and shards with the mesh's rules. The model's static
structure (the NNX ``graphdef``) is passed separately and stays out of the state.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from atod_jax import objectives as obj
from atod_jax.rollout.trajectory import Trajectory
from atod_jax.sampling.logprobs import token_logprobs


class TrainState(NamedTuple):
  params: Any  # nnx.State of the student
  opt_state: Any  # optax state
  step: jax.Array  # int32 scalar: updates done


def make_optimizer(optim) -> optax.GradientTransformation:
  """AdamW with linear warm-up and global-norm clipping (``max_grad_norm = 0``: off)."""
  lr = optax.linear_schedule(0.0, optim.learning_rate, optim.warmup_steps) \
      if optim.warmup_steps else optim.learning_rate
  adamw = optax.adamw(lr, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay)
  if optim.max_grad_norm:
    return optax.chain(optax.clip_by_global_norm(optim.max_grad_norm), adamw)
  return adamw


def init_state(params, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(params, tx.init(params), jnp.int32(0))


def score(graphdef, params, traj: Trajectory, temperature: float = 1.0) -> jax.Array:
  """``[B, L]`` log-prob of every token of ``traj`` under the model (the teacher's
  scores of the student's tokens), 0 off the generated tokens."""
  logp = token_logprobs(nnx.merge(graphdef, params), traj.tokens, traj.valid,
                        temperature=temperature)
  return jnp.where(traj.gen_mask, jax.lax.stop_gradient(logp), 0.0)


def advantages(traj: Trajectory, teacher_logp: jax.Array, step, *, sched, tdur_mode: str,
               estimator: str, num_groups: int, max_turns: int):
  """The ATOD per-token advantages ``[B, L]`` and their diagnostics."""
  mask = traj.gen_mask & traj.row_valid[:, None]
  dlogp = obj.opd_signal(teacher_logp, traj.behaviour_logp, mask)
  weights = obj.tdur_weights(traj.behaviour_logp, teacher_logp, traj.turn_ids, mask,
                             mode=tdur_mode, max_turns=max_turns)
  a_traj = obj.group_advantages(traj.rewards, traj.group_ids, num_groups, estimator,
                                valid=traj.row_valid)
  kappa, rho = sched.kappa(step), sched.rho(step)
  adv = obj.atod_advantages(dlogp, weights, a_traj, mask, kappa, rho)
  tok = lambda x: obj.aggregate_tokens(x, mask, "token_mean")  # noqa: E731
  return adv, {"kappa": kappa, "rho": rho, "opd_signal": tok(dlogp), "turn_weight": tok(weights),
               "disagreement": tok(jnp.abs(dlogp)), "uncertainty": tok(-traj.behaviour_logp),
               "abs_group_adv": jnp.mean(jnp.abs(a_traj))}


def _minibatch_update(loss_fn, tx, state: TrainState, batch, key, minibatches: int,
                      epochs: int):
  """``epochs`` passes over ``batch`` (a pytree of ``[B, ...]`` arrays) in
  ``minibatches`` shuffled mini-batches; returns the new state and mean metrics."""
  rows = jax.tree.leaves(batch)[0].shape[0]
  size = rows // minibatches
  order = jnp.concatenate([jax.random.permutation(jax.random.fold_in(key, e), rows)
                           for e in range(epochs)]).reshape(epochs * minibatches, size)

  def one(carry, idx):
    params, opt_state = carry
    mb = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), batch)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return (params, opt_state), metrics

  (params, opt_state), metrics = jax.lax.scan(one, (state.params, state.opt_state), order)
  return TrainState(params, opt_state, state.step + 1), jax.tree.map(jnp.mean, metrics)


def policy_update(graphdef, tx, state: TrainState, traj: Trajectory, adv: jax.Array, key, *,
                  minibatches: int, epochs: int, clip_eps: float, clip_eps_high: float,
                  dual_clip: float, aggregation: str, temperature: float):
  """One clipped-surrogate update (all mini-batches and epochs) on a rollout batch."""
  def loss_fn(params, mb):
    traj, adv = mb
    logp = token_logprobs(nnx.merge(graphdef, params), traj.tokens, traj.valid,
                          temperature=temperature)
    mask = traj.gen_mask & traj.row_valid[:, None]
    return obj.clipped_policy_loss(logp, traj.behaviour_logp, adv, mask, clip_eps,
                                   clip_eps_high=clip_eps_high or None,
                                   dual_clip=dual_clip or None, aggregation=aggregation)

  return _minibatch_update(loss_fn, tx, state, (traj, adv), key, minibatches, epochs)


def sft_update(graphdef, tx, state: TrainState, traj: Trajectory, key, *, minibatches: int,
               epochs: int = 1):
  """Behaviour cloning: maximise the log-likelihood of the generated (expert) tokens."""
  def loss_fn(params, traj):
    logp = token_logprobs(nnx.merge(graphdef, params), traj.tokens, traj.valid)
    nll = -obj.aggregate_tokens(logp, traj.gen_mask, "seq_mean_token_mean")
    return nll, {}

  return _minibatch_update(loss_fn, tx, state, traj, key, minibatches, epochs)


# Jitted entry points: the model structure and the optimizer are static; the state is
# donated (updated in place).
jit_policy_update = functools.partial(
    jax.jit, static_argnums=(0, 1),
    static_argnames=("minibatches", "epochs", "clip_eps", "clip_eps_high", "dual_clip",
                     "aggregation", "temperature"),
    donate_argnums=(2,))(policy_update)
jit_sft_update = functools.partial(
    jax.jit, static_argnums=(0, 1), static_argnames=("minibatches", "epochs"),
    donate_argnums=(2,))(sft_update)
jit_score = functools.partial(jax.jit, static_argnums=(0,), static_argnames=("temperature",))(score)
