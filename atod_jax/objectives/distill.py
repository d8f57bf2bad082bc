"""Distillation signals: the sampled-token OPD signal and full-vocabulary divergences."""
from __future__ import annotations

import functools
import math
from typing import Callable, Literal

import chex
import jax
import jax.numpy as jnp

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")


def opd_signal(
    teacher_logp: jax.Array, behaviour_logp: jax.Array, mask: jax.Array,
    clip: float | None = None,
) -> jax.Array:
  r"""On-policy-distillation signal on the sampled tokens.

  .. math:: \Delta\log p_t = \log\pi_T(a_t \mid s_t) - \log\pi_{old}(a_t \mid s_t)

  the single-sample estimate of the (negative) reverse KL, used as a per-token
  advantage. It is a constant of the loss (stop-gradient through both inputs).

  Args:
    teacher_logp: ``[B, L]`` teacher log-prob of each sampled token.
    behaviour_logp: ``[B, L]`` log-prob of the same token under the policy that sampled
      it (:math:`\pi_{old}`).
    mask: ``[B, L]`` generated-token mask; the result is 0 where it is 0 (padding
      values, even ``-inf``, never leak out).
    clip: ``None`` (the paper's form) or ``c > 0``: the signal clamped to ``[-c, c]``,
      so a token the teacher gives almost no mass (``log pi_T`` of -20 and below) weighs
      as much as one it gives ``e^-c`` of the student's, not a hundred times a typical
      token.

  Returns:
    ``[B, L]`` float32.
  """
  chex.assert_rank([teacher_logp, behaviour_logp, mask], 2)
  chex.assert_equal_shape([teacher_logp, behaviour_logp, mask])
  on = mask > 0
  delta = (jnp.where(on, teacher_logp, 0.0).astype(jnp.float32)
           - jnp.where(on, behaviour_logp, 0.0).astype(jnp.float32))
  if clip is not None:
    delta = jnp.clip(delta, -clip, clip)
  return jax.lax.stop_gradient(jnp.where(on, delta, 0.0))


def _xlogy_diff(logp: jax.Array, logq: jax.Array) -> jax.Array:
  """sum_v p_v (log p_v - log q_v), with 0 log 0 = 0 (masked-out vocabulary entries)."""
  p = jnp.exp(logp)
  return jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)


def _token_divergence(s_logits, t_logits, kind: str, beta: float, temperature: float):
  logs = jax.nn.log_softmax(s_logits.astype(jnp.float32) / temperature, axis=-1)
  logt = jax.nn.log_softmax(
      jax.lax.stop_gradient(t_logits).astype(jnp.float32) / temperature, axis=-1)
  if kind == "forward_kl":
    return _xlogy_diff(logt, logs)
  if kind == "reverse_kl":
    return _xlogy_diff(logs, logt)
  logm = jnp.logaddexp(logt + math.log(beta), logs + math.log1p(-beta))
  return beta * _xlogy_diff(logt, logm) + (1.0 - beta) * _xlogy_diff(logs, logm)


def map_sequence_chunks(
    fn: Callable[..., jax.Array], *arrays: jax.Array, chunk_size: int | None
) -> jax.Array:
  """Applies ``fn`` to slices ``[:, i:i+chunk_size]`` of ``arrays`` and concatenates.

  The body is rematerialised (``jax.checkpoint``), so neither the forward nor the
  backward pass holds more than one chunk of ``fn``'s intermediates. Slicing is along
  the sequence axis (1), so a batch sharded over devices stays sharded. A tail shorter
  than ``chunk_size`` is handled by one more call, without padding copies.

  Args:
    fn: maps arrays ``[B, C, ...]`` to ``[B, C]`` (or ``[B, C, ...]``: trailing axes are
      kept).
    arrays: arrays sharing their first two axes ``[B, L, ...]``.
    chunk_size: chunk length ``C``; ``None`` (or ``>= L``) means a single call.
  """
  length = arrays[0].shape[1]
  if chunk_size is None or chunk_size >= length:
    return fn(*arrays)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  n_full = length // chunk_size
  body = jax.checkpoint(fn)

  def step(carry, i):
    parts = [jax.lax.dynamic_slice_in_dim(a, i * chunk_size, chunk_size, axis=1)
             for a in arrays]
    return carry, body(*parts)

  _, out = jax.lax.scan(step, None, jnp.arange(n_full))  # [n_full, B, C]
  out = jnp.moveaxis(out, 0, 1)
  out = out.reshape(out.shape[0], n_full * chunk_size, *out.shape[3:])
  if n_full * chunk_size < length:
    tail = [a[:, n_full * chunk_size:] for a in arrays]
    out = jnp.concatenate([out, body(*tail)], axis=1)
  return out


def vocab_divergence(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    mask: jax.Array,
    kind: Divergence = "forward_kl",
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int | None = 256,
) -> jax.Array:
  r"""Per-token full-vocabulary divergence between teacher and student (GKD-style).

  With :math:`p_T = \mathrm{softmax}(z_T/\tau)` and :math:`p_S = \mathrm{softmax}(z_S/\tau)`
  over the vocabulary at each position:

  * ``forward_kl``: :math:`KL(p_T \| p_S)` (mode-covering; supervised KD)
  * ``reverse_kl``: :math:`KL(p_S \| p_T)` (mode-seeking)
  * ``jsd``: generalised :math:`JSD_\beta = \beta KL(p_T\|m) + (1-\beta) KL(p_S\|m)`,
    :math:`m = \beta p_T + (1-\beta) p_S`, :math:`0<\beta<1` (Agarwal et al., GKD;
    :math:`\beta=0.5` is the symmetric JSD).

  Memory: the softmaxes and products (several ``[B, L, V]`` f32 buffers if done at once)
  are formed for ``chunk_size`` positions at a time, so intermediates are
  ``O(B * chunk_size * V)``. Under differentiation the per-token gradient is formed in
  the same pass and kept (one ``[B, L, V]`` buffer in the logits' dtype, the size of
  the gradient itself); the backward pass only scales it. Inputs may be bf16; the math
  is f32. Gradients flow to ``student_logits`` only; the teacher is a constant.

  Args:
    student_logits: ``[B, L, V]``.
    teacher_logits: ``[B, L, V]`` (same vocabulary).
    mask: ``[B, L]``; result is 0 where it is 0.
    kind: one of :data:`DIVERGENCES`.
    beta: mixture weight of ``jsd``.
    temperature: softmax temperature applied to both.
    chunk_size: positions per chunk (``None``: all at once).

  Returns:
    ``[B, L]`` float32 per-token divergence; aggregate it with
    :func:`atod_jax.objectives.aggregate_tokens`.
  """
  chex.assert_rank([student_logits, teacher_logits], 3)
  chex.assert_equal_shape([student_logits, teacher_logits])
  chex.assert_rank(mask, 2)
  chex.assert_equal_shape_prefix([student_logits, mask], 2)
  if kind not in DIVERGENCES:
    raise ValueError(f"kind must be one of {DIVERGENCES}, got {kind!r}")
  if kind == "jsd" and not 0.0 < beta < 1.0:
    raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")

  div = _divergence(student_logits, teacher_logits, kind, beta, temperature, chunk_size)
  return jnp.where(mask > 0, div, 0.0)


# The divergence of a token depends on that token's logits only, so its gradient is
# known per chunk in the forward pass. Keeping that gradient as the only residual makes
# the backward pass a broadcast multiply: no second pass over the vocabulary and no
# full-size intermediates beyond the one [B, L, V] gradient the caller asked for.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _divergence(s, t, kind, beta, temperature, chunk_size):
  def fn(s_, t_):
    return _token_divergence(s_, t_, kind, beta, temperature)
  return map_sequence_chunks(fn, s, t, chunk_size=chunk_size)


def _value_and_token_grad(s, t, kind, beta, temperature):
  val, vjp = jax.vjp(lambda s_: _token_divergence(s_, t, kind, beta, temperature), s)
  (grad,) = vjp(jnp.ones_like(val))
  return val, grad.astype(s.dtype)


def _divergence_fwd(s, t, kind, beta, temperature, chunk_size):
  length = s.shape[1]
  if chunk_size is None or chunk_size >= length:
    return _value_and_token_grad(s, t, kind, beta, temperature)
  n_full = length // chunk_size

  def step(carry, i):
    vals, grads = carry
    start = i * chunk_size
    part = [jax.lax.dynamic_slice_in_dim(a, start, chunk_size, axis=1) for a in (s, t)]
    v, g = _value_and_token_grad(*part, kind, beta, temperature)
    vals = jax.lax.dynamic_update_slice_in_dim(vals, v, start, axis=1)
    grads = jax.lax.dynamic_update_slice_in_dim(grads, g, start, axis=1)
    return (vals, grads), None

  init = (jnp.zeros_like(s[..., 0], jnp.float32), jnp.zeros_like(s))  # keep s's sharding
  (vals, grads), _ = jax.lax.scan(step, init, jnp.arange(n_full))
  done = n_full * chunk_size
  if done < length:
    v, g = _value_and_token_grad(s[:, done:], t[:, done:], kind, beta, temperature)
    vals = vals.at[:, done:].set(v)
    grads = grads.at[:, done:].set(g)
  return vals, grads


def _divergence_bwd(kind, beta, temperature, chunk_size, grads, ct):
  del kind, beta, temperature, chunk_size
  return ct[..., None].astype(grads.dtype) * grads, None


_divergence.defvjp(_divergence_fwd, _divergence_bwd)
