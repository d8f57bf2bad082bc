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
from atod_jax.rollout.trajectory import Trajectory, flat, model_rows, trained_mask
from atod_jax.objectives.distill import map_sequence_chunks
from atod_jax.sampling.logprobs import logprobs_from_hidden, token_logprobs


class PolicyLoss(NamedTuple):
  """The clipped surrogate's settings (static: hashable, one record instead of keywords)."""

  clip_eps: float = 0.2
  clip_eps_high: float = 0.0  # 0: = clip_eps
  dual_clip: float = 0.0  # 0: off
  aggregation: str = "seq_mean_token_mean"
  temperature: float = 1.0  # the rollout's: log-probs are of the sampling distribution


class Distill(NamedTuple):
  """The full-vocabulary distillation term (GKD, Agarwal et al. 2024), static.

  Per generated token, a divergence between the teacher's and the student's whole
  next-token distributions (temperature 1), differentiated through the student's:
  ``beta = 0`` forward KL ``KL(pi_T || pi_theta)``, ``beta = 1`` reverse KL
  ``KL(pi_theta || pi_T)`` (the on-policy distillation objective, whose sampled-token
  estimate is ATOD's ``log pi_theta - log pi_T``), between them the generalised JSD
  ``beta KL(pi_T || m) + (1 - beta) KL(pi_theta || m)``, ``m = beta pi_T + (1 - beta)
  pi_theta`` (the convention of GKD's paper and TRL's ``GKDTrainer``).
  """

  beta: float = 0.5
  chunk_size: int = 256  # positions whose logits exist at a time

  @property
  def kind(self) -> str:
    return {0.0: "forward_kl", 1.0: "reverse_kl"}.get(float(self.beta), "jsd")


class Batches(NamedTuple):
  """How one update walks its data (static)."""

  minibatches: int = 1  # optimizer steps per epoch
  epochs: int = 1
  microbatches: int = 1  # gradient-accumulation slices of a mini-batch


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


def _logprobs(model, traj: Trajectory, temperature: float = 1.0) -> jax.Array:
  """Log-prob of every token of ``traj`` (either layout: the model reads each sequence
  of :func:`model_rows`), in ``traj.tokens``' shape."""
  logp = token_logprobs(model, model_rows(traj.tokens), model_rows(traj.valid),
                        temperature=temperature)
  return logp.reshape(traj.tokens.shape)


def score(graphdef, params, traj: Trajectory, temperature: float = 1.0,
          chunks: int = 1) -> jax.Array:
  """Log-prob of every token of ``traj`` under the model (the teacher's scores of the
  student's tokens), 0 off the generated tokens; ``traj.tokens``' shape. The rows go
  through the model in ``chunks`` slices, one after another (bounded activations)."""
  def run(params, tokens, valid):
    return _logprobs(nnx.merge(graphdef, params), traj._replace(tokens=tokens, valid=valid),
                     temperature)

  if chunks == 1:
    logp = run(params, traj.tokens, traj.valid)
  else:  # params ride in the carry: an NNX module must live in the trace that uses it
    part = lambda x: x.reshape(chunks, -1, *x.shape[1:])  # noqa: E731
    _, logp = jax.lax.scan(lambda p, tv: (p, run(p, *tv)), params,
                           (part(traj.tokens), part(traj.valid)))
    logp = logp.reshape(traj.tokens.shape)
  return jnp.where(traj.gen_mask, jax.lax.stop_gradient(logp), 0.0)


def _grads(loss_fn, params, batch, microbatches: int):
  """``(loss, metrics), grads`` of ``loss_fn`` on ``batch``, in ``microbatches`` rows
  slices one after another (gradient accumulation, in float32): the mean of the slices'
  losses and gradients, so the activations of one slice only are alive at a time. With
  row means (the ``seq_mean_*`` aggregations) and every row trained this equals the whole
  batch's gradient; ``token_mean`` weighs the slices equally instead of by their tokens."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if microbatches == 1:
    return grad_fn(params, batch)
  slices = jax.tree.map(lambda x: x.reshape(microbatches, -1, *x.shape[1:]), batch)

  def add(total, mb):
    (loss, metrics), grads = grad_fn(params, mb)
    total = jax.tree.map(lambda t, g: t + g.astype(jnp.float32), total, grads)
    return total, dict(metrics, loss=loss)

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  total, metrics = jax.lax.scan(add, zeros, slices)
  grads = jax.tree.map(lambda t, p: (t / microbatches).astype(p.dtype), total, params)
  metrics = jax.tree.map(jnp.mean, metrics)
  return (metrics.pop("loss"), metrics), grads


def _minibatch_update(loss_fn, tx, state: TrainState, batch, key, walk: Batches):
  """``walk.epochs`` passes over ``batch`` (a pytree of ``[B, ...]`` arrays) in
  ``walk.minibatches`` shuffled mini-batches (one optimizer step each, its gradient
  accumulated over ``walk.microbatches`` slices); returns the new state and mean
  metrics."""
  rows = jax.tree.leaves(batch)[0].shape[0]
  size = rows // walk.minibatches
  order = jnp.concatenate([jax.random.permutation(jax.random.fold_in(key, e), rows)
                           for e in range(walk.epochs)])
  order = order.reshape(walk.epochs * walk.minibatches, size)

  def one(carry, idx):
    params, opt_state = carry
    mb = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), batch)
    (loss, metrics), grads = _grads(loss_fn, params, mb, walk.microbatches)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return (params, opt_state), metrics

  (params, opt_state), metrics = jax.lax.scan(one, (state.params, state.opt_state), order)
  return TrainState(params, opt_state, state.step + 1), jax.tree.map(jnp.mean, metrics)


def _logprobs_and_divergence(model, teacher, traj: Trajectory, temperature: float,
                             distill: Distill):
  """The student's log-probs of ``traj``'s tokens and the per-token :class:`Distill`
  divergence from ``teacher``, both from one pass of each model; ``traj.tokens``' shape."""
  tokens, valid = model_rows(traj.tokens), model_rows(traj.valid)
  hidden, _ = model.hidden_states(tokens, None, valid)
  logp = logprobs_from_hidden(hidden, model.unembed_matrix(hidden.dtype), tokens,
                              temperature=temperature)
  t_hidden = jax.lax.stop_gradient(teacher.hidden_states(tokens, None, valid)[0])
  unembed, t_unembed = model.unembed_matrix(hidden.dtype), teacher.unembed_matrix(t_hidden.dtype)
  if unembed.shape[1] != t_unembed.shape[1]:
    raise ValueError(f"the full-vocabulary term needs one vocabulary: the student has "
                     f"{unembed.shape[1]} tokens, the teacher {t_unembed.shape[1]}")

  def chunk(h, g):  # [B, C, H] each -> [B, C]
    s_logits = (h @ unembed).astype(jnp.float32)
    t_logits = jax.lax.stop_gradient((g @ t_unembed).astype(jnp.float32))
    return obj.vocab_divergence(s_logits, t_logits, jnp.ones(h.shape[:2]), distill.kind,
                                beta=distill.beta, chunk_size=None)

  div = map_sequence_chunks(chunk, hidden[:, :-1], t_hidden[:, :-1],
                            chunk_size=distill.chunk_size)
  div = jnp.pad(div, ((0, 0), (1, 0)))
  return logp.reshape(traj.tokens.shape), div.reshape(traj.tokens.shape)


def policy_update(graphdef, tx, state: TrainState, traj: Trajectory, adv: jax.Array, key,
                  loss: PolicyLoss, walk: Batches, distill: Distill | None = None,
                  teacher_graph=None, teacher_params=None, distill_weights=None):
  """One clipped-surrogate update (all mini-batches and epochs) on a rollout batch; with
  ``distill``, plus the full-vocabulary divergence from the teacher weighted per token
  by ``distill_weights`` (``traj.tokens``' shape, e.g. kappa x T-DUR weight) and
  aggregated as the surrogate is."""
  def loss_fn(params, mb):
    traj, adv, weights = mb
    model = nnx.merge(graphdef, params)
    mask = trained_mask(traj)
    if distill is None:
      logp = _logprobs(model, traj, loss.temperature)
    else:
      logp, div = _logprobs_and_divergence(
          model, nnx.merge(teacher_graph, teacher_params), traj, loss.temperature, distill)
    value, metrics = obj.clipped_policy_loss(flat(logp), flat(traj.behaviour_logp), flat(adv),
                                             mask, loss.clip_eps,
                                             clip_eps_high=loss.clip_eps_high or None,
                                             dual_clip=loss.dual_clip or None,
                                             aggregation=loss.aggregation)
    if distill is not None:
      term = obj.aggregate_tokens(flat(weights * div), mask, loss.aggregation)
      value = value + term
      metrics = dict(metrics, divergence=obj.aggregate_tokens(flat(div), mask, "token_mean"),
                     distill_loss=term)
    return value, metrics

  # without the term, a row-shaped placeholder (mini-batches slice every leaf)
  weights = jnp.zeros(adv.shape[:1]) if distill_weights is None else distill_weights
  return _minibatch_update(loss_fn, tx, state, (traj, adv, weights), key, walk)


def sft_update(graphdef, tx, state: TrainState, traj: Trajectory, key, walk: Batches):
  """Behaviour cloning: maximise the log-likelihood of the generated (expert) tokens."""
  def loss_fn(params, traj):
    logp = _logprobs(nnx.merge(graphdef, params), traj)
    nll = -obj.aggregate_tokens(flat(logp), flat(traj.gen_mask), "seq_mean_token_mean")
    return nll, {}

  return _minibatch_update(loss_fn, tx, state, traj, key, walk)


# Jitted entry points: the model structure, the optimizer and the settings records are
# static; the state is donated (updated in place).
jit_policy_update = functools.partial(
    jax.jit, static_argnums=(0, 1, 6, 7, 8, 9), donate_argnums=(2,))(policy_update)
jit_sft_update = functools.partial(
    jax.jit, static_argnums=(0, 1, 5), donate_argnums=(2,))(sft_update)
jit_score = functools.partial(jax.jit, static_argnums=(0,),
                              static_argnames=("temperature", "chunks"))(score)
