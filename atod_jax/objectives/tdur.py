r"""T-DUR: turn-level disagreement-uncertainty reweighting of the OPD term.

For each model-generated turn ``k`` of a trajectory, with :math:`N_k` sampled tokens:

.. math::
   d_k = \frac{1}{N_k}\sum_{t \in k} |\log\pi_\theta(a_t) - \log\pi_T(a_t)|, \qquad
   h_k = \frac{1}{N_k}\sum_{t \in k} -\log\pi_\theta(a_t)

:math:`\tilde d_k, \tilde h_k` are min-max normalised over the turns of the same
trajectory (0.5 where max - min < 1e-8), and the paper's weight is the soft-OR
:math:`w_k = 1 - (1 - \tilde d_k)(1 - \tilde h_k)`. Weights are constants of the loss.

Turn layout: ``turn_ids`` ``[B, L]`` int is ``k`` on the tokens of generated turn ``k``
(0-based) and -1 elsewhere. A token counts when ``mask > 0`` and ``0 <= turn_id <
max_turns``; ids at or past ``max_turns`` are ignored like -1. Turn ids need not be
contiguous in the sequence, and a turn id with no tokens is simply absent.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp

Mode = Literal["soft_or", "uniform", "disagreement", "uncertainty", "product", "token"]
MODES: tuple[str, ...] = (
    "soft_or", "uniform", "disagreement", "uncertainty", "product", "token")
MINMAX_TOL = 1e-8


class TurnStatistics(NamedTuple):
  """Per-turn statistics, ``[B, K]`` each (K = ``max_turns``); 0 on absent turns."""

  disagreement: jax.Array  # d_k, mean |log pi_theta - log pi_T| over the turn's tokens
  uncertainty: jax.Array  # h_k, mean -log pi_theta over the turn's tokens
  num_tokens: jax.Array  # N_k, int32

  @property
  def present(self) -> jax.Array:
    """``[B, K]`` bool: turn k has at least one generated token."""
    return self.num_tokens > 0


def _check(student_logp, teacher_logp, turn_ids, mask):
  chex.assert_rank([student_logp, teacher_logp, turn_ids, mask], 2)
  chex.assert_equal_shape([student_logp, teacher_logp, turn_ids, mask])
  chex.assert_type(turn_ids, int)


def _active(turn_ids, mask, max_turns):
  return (mask > 0) & (turn_ids >= 0) & (turn_ids < max_turns)


def turn_statistics(
    student_logp: jax.Array,
    teacher_logp: jax.Array,
    turn_ids: jax.Array,
    mask: jax.Array,
    max_turns: int | None = None,
) -> TurnStatistics:
  """Per-turn mean disagreement ``d`` and uncertainty ``h`` (see module docstring).

  Args:
    student_logp: ``[B, L]`` student log-prob of each sampled token; in ATOD this is the
      behaviour (rollout) policy's log-prob.
    teacher_logp: ``[B, L]`` teacher log-prob of the same tokens.
    turn_ids: ``[B, L]`` int turn index, -1 on non-generated tokens.
    mask: ``[B, L]`` generated-token mask.
    max_turns: static number of turn slots ``K``; defaults to ``L`` (always enough).
      A tight bound makes the per-turn arrays smaller.

  Returns:
    :class:`TurnStatistics` with ``[B, K]`` arrays; constants (stop-gradient).
  """
  _check(student_logp, teacher_logp, turn_ids, mask)
  k = student_logp.shape[1] if max_turns is None else int(max_turns)
  if k < 1:
    raise ValueError(f"max_turns must be >= 1, got {max_turns}")
  s = jax.lax.stop_gradient(student_logp).astype(jnp.float32)
  t = jax.lax.stop_gradient(teacher_logp).astype(jnp.float32)
  active = _active(turn_ids, mask, k)
  s = jnp.where(active, s, 0.0)
  t = jnp.where(active, t, 0.0)
  per_token = jnp.stack(
      [jnp.abs(s - t), -s, active.astype(jnp.float32)], axis=-1)  # [B, L, 3]
  slot = jnp.where(active, turn_ids, k)  # slot k collects the inactive tokens

  def row_sums(x, ids):
    return jax.ops.segment_sum(x, ids, num_segments=k + 1)[:k]

  sums = jax.vmap(row_sums)(per_token, slot)  # [B, K, 3]
  count = sums[..., 2]
  denom = jnp.maximum(count, 1.0)
  return TurnStatistics(
      disagreement=sums[..., 0] / denom,
      uncertainty=sums[..., 1] / denom,
      num_tokens=count.astype(jnp.int32),
  )


def minmax_normalize(x: jax.Array, present: jax.Array, tol: float = MINMAX_TOL) -> jax.Array:
  """Min-max normalises ``x`` over the present entries of the last axis.

  Where the present entries of a row span less than ``tol`` (including a row with one
  present entry) the normalised value is 0.5. Absent entries are 0.

  Args:
    x: ``[..., K]`` float.
    present: ``[..., K]`` bool.
  """
  chex.assert_equal_shape([x, present])
  any_present = jnp.any(present, axis=-1, keepdims=True)
  lo = jnp.min(jnp.where(present, x, jnp.inf), axis=-1, keepdims=True)
  hi = jnp.max(jnp.where(present, x, -jnp.inf), axis=-1, keepdims=True)
  lo = jnp.where(any_present, lo, 0.0)
  span = jnp.where(any_present, hi - lo, 0.0)
  flat = span < tol
  out = jnp.where(flat, 0.5, (x - lo) / jnp.where(flat, 1.0, span))
  # clip: approximate division (GPUs) can land a hair outside [0, 1]
  return jnp.where(present, jnp.clip(out, 0.0, 1.0), 0.0)


def _combine(d_norm, h_norm, mode):
  if mode in ("soft_or", "token"):
    return 1.0 - (1.0 - d_norm) * (1.0 - h_norm)
  if mode == "disagreement":
    return d_norm
  if mode == "uncertainty":
    return h_norm
  if mode == "product":
    return d_norm * h_norm
  return jnp.ones_like(d_norm)  # uniform


def _check_mode(mode):
  if mode not in MODES:
    raise ValueError(f"T-DUR mode must be one of {MODES}, got {mode!r}")


def turn_weights(stats: TurnStatistics, mode: Mode = "soft_or") -> jax.Array:
  """Per-turn weights ``[B, K]`` from :class:`TurnStatistics` (0 on absent turns).

  Modes: ``soft_or`` (paper) ``1-(1-d~)(1-h~)``; ``disagreement`` ``d~``;
  ``uncertainty`` ``h~``; ``product`` ``d~ h~``; ``uniform`` 1 (T-DUR off).
  ``token`` is not a per-turn mode: use :func:`tdur_weights`.
  """
  _check_mode(mode)
  if mode == "token":
    raise ValueError("mode 'token' weights tokens, not turns: use tdur_weights")
  present = stats.present
  d = minmax_normalize(stats.disagreement, present)
  h = minmax_normalize(stats.uncertainty, present)
  return jnp.where(present, _combine(d, h, mode), 0.0)


def tdur_weights(
    student_logp: jax.Array,
    teacher_logp: jax.Array,
    turn_ids: jax.Array,
    mask: jax.Array,
    mode: Mode = "soft_or",
    max_turns: int | None = None,
) -> jax.Array:
  """T-DUR weights broadcast to tokens: each generated token carries its turn's weight.

  ``token`` mode is the token-level ablation: ``d_t = |log pi_theta - log pi_T|`` and
  ``h_t = -log pi_theta`` of each token are min-max normalised over the generated tokens
  of the row and combined by soft-OR, with no turn pooling.

  Args:
    student_logp, teacher_logp, turn_ids, mask, max_turns: as in
      :func:`turn_statistics`.
    mode: one of :data:`MODES`.

  Returns:
    ``[B, L]`` float32 weights in ``[0, 1]``, 0 on non-generated tokens; a constant.
  """
  _check(student_logp, teacher_logp, turn_ids, mask)
  _check_mode(mode)
  k = student_logp.shape[1] if max_turns is None else int(max_turns)
  active = _active(turn_ids, mask, k)
  if mode == "uniform":
    return active.astype(jnp.float32)
  if mode == "token":
    s = jax.lax.stop_gradient(student_logp).astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher_logp).astype(jnp.float32)
    d = minmax_normalize(jnp.where(active, jnp.abs(s - t), 0.0), active)
    h = minmax_normalize(jnp.where(active, -s, 0.0), active)
    return jnp.where(active, _combine(d, h, mode), 0.0)
  stats = turn_statistics(student_logp, teacher_logp, turn_ids, mask, k)
  w_turn = turn_weights(stats, mode)
  w_tok = jnp.take_along_axis(w_turn, jnp.clip(turn_ids, 0, k - 1), axis=1)
  return jnp.where(active, w_tok, 0.0)
