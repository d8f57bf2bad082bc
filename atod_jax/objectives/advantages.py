"""Trajectory advantages from group-relative baselines, and the ATOD per-token mix.

Array conventions used throughout :mod:`atod_jax.objectives`:

* ``B`` is the batch axis: one row per trajectory (a whole multi-turn episode).
* ``L`` is the padded token axis of a trajectory.
* ``mask`` ``[B, L]`` is 1 on model-generated tokens (the only tokens trained on) and 0
  on prompt / observation / padding tokens.
"""
from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp

Estimator = Literal["grpo", "drgrpo", "rloo", "reinforce"]
ESTIMATORS: tuple[str, ...] = ("grpo", "drgrpo", "rloo", "reinforce")


def group_advantages(
    rewards: jax.Array,
    group_ids: jax.Array,
    num_groups: int,
    estimator: Estimator = "grpo",
    *,
    valid: jax.Array | None = None,
    eps: float = 1e-6,
) -> jax.Array:
  r"""Per-trajectory advantages with a baseline from the trajectory's group.

  A group is the set of G rollouts of the same task. With ``n`` valid members in the
  group of trajectory ``i``, mean ``m`` and unbiased standard deviation ``s``:

  * ``grpo``:      :math:`A_i = (R_i - m) / (s + \epsilon)`  (GRPO / verl; ``s`` uses n-1)
  * ``drgrpo``:    :math:`A_i = R_i - m`  (Dr. GRPO: no std normalisation)
  * ``rloo``:      :math:`A_i = R_i - \frac{1}{n-1}\sum_{j \ne i} R_j = \frac{n}{n-1}(R_i - m)`
  * ``reinforce``: :math:`A_i = R_i - \bar R` with :math:`\bar R` the mean over all valid
    trajectories of the batch (groups ignored).

  A group whose rewards are all equal gets advantage 0 (``grpo``: 0 / eps). For the
  group estimators a group with a single valid member has no baseline and gets 0
  (verl instead passes its raw reward through). Invalid rows (``valid == 0``, e.g. an
  aborted episode) take no part in any statistic and get advantage 0.

  Args:
    rewards: ``[B]`` float, the return of each trajectory.
    group_ids: ``[B]`` int, the group of each row, in ``[0, num_groups)``. Rows of a
      group need not be contiguous.
    num_groups: static int, number of groups (an upper bound is fine: empty groups
      cost nothing).
    estimator: one of :data:`ESTIMATORS`.
    valid: optional ``[B]`` bool/0-1 mask of trajectories that count.
    eps: added to the group std for ``grpo``.

  Returns:
    ``[B]`` float32 advantages (a constant: no gradient flows to ``rewards``).
  """
  chex.assert_rank([rewards, group_ids], 1)
  chex.assert_equal_shape([rewards, group_ids])
  chex.assert_type(group_ids, int)
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
  if num_groups < 1:
    raise ValueError(f"num_groups must be >= 1, got {num_groups}")

  r = jax.lax.stop_gradient(rewards).astype(jnp.float32)
  if valid is None:
    valid = jnp.ones(r.shape, bool)
  else:
    chex.assert_equal_shape([rewards, valid])
    valid = valid.astype(bool)
  v = valid.astype(jnp.float32)
  r = jnp.where(valid, r, 0.0)

  if estimator == "reinforce":
    baseline = jnp.sum(r) / jnp.maximum(jnp.sum(v), 1.0)
    return jnp.where(valid, r - baseline, 0.0)

  # Group sums through a [B, num_groups] one-hot: plain reductions over the batch axis,
  # which shard cleanly (also under explicit sharding, where a scatter from a sharded
  # batch into a replicated group array is ambiguous). Invalid rows belong to no group.
  member = valid[:, None] & (group_ids[:, None] == jnp.arange(num_groups)[None, :])
  member = member.astype(jnp.float32)

  def per_row(x):  # group sum of x, read back at every row of the group
    return jnp.sum(member * jnp.sum(member * x[:, None], axis=0)[None, :], axis=1)

  n = per_row(v)
  centred = r - per_row(r) / jnp.maximum(n, 1.0)
  has_baseline = valid & (n > 1.0)
  if estimator == "drgrpo":
    adv = centred
  elif estimator == "rloo":
    adv = centred * n / jnp.maximum(n - 1.0, 1.0)
  else:  # grpo
    std = jnp.sqrt(per_row(centred**2 * v) / jnp.maximum(n - 1.0, 1.0))
    adv = centred / (std + eps)
  return jnp.where(has_baseline, adv, 0.0)


STEP_NORMS: tuple[str, ...] = ("mean", "std")


def discounted_returns(turn_rewards: jax.Array, gamma: float) -> jax.Array:
  r"""``[B, K]`` returns from each turn: :math:`R_{i,k} = \sum_{k' \ge k}
  \gamma^{k'-k} r_{i,k'}`."""
  chex.assert_rank(turn_rewards, 2)
  k = turn_rewards.shape[1]
  lag = jnp.arange(k)[None, :] - jnp.arange(k)[:, None]  # [k, k']: k' - k
  discount = jnp.where(lag >= 0, jnp.float32(gamma) ** jnp.maximum(lag, 0), 0.0)
  return turn_rewards.astype(jnp.float32) @ discount.T


def step_advantages(
    turn_rewards: jax.Array,
    anchors: jax.Array,
    group_ids: jax.Array,
    num_turns: jax.Array,
    *,
    gamma: float = 0.95,
    norm: str = "mean",
    valid: jax.Array | None = None,
    eps: float = 1e-6,
) -> jax.Array:
  r"""GiGPO's step-level advantages (Feng et al. 2025, arXiv 2505.10978), ``[B, K]``.

  Turn ``k`` of trajectory ``i`` acted from anchor state ``anchors[i, k]``. Its step
  group is every turn, of any trajectory of the same episode group (``group_ids``), that
  acted from the same anchor state. With :math:`R_{i,k}` the discounted return from the
  turn (:func:`discounted_returns`) and ``m``, ``s`` the step group's mean and unbiased
  std of :math:`R`:

  * ``norm="mean"``: :math:`A^S_{i,k} = R_{i,k} - m` (verl-agent's ``mean_norm``)
  * ``norm="std"``:  :math:`A^S_{i,k} = (R_{i,k} - m) / (s + \epsilon)` (``mean_std_norm``)

  A turn alone in its step group keeps :math:`A^S = R_{i,k}` (verl-agent: mean 0, std 1).
  Turns not taken (``k >= num_turns``), turns without an anchor (``-1``) and invalid
  rows get 0 and take part in no group. GiGPO's advantage of a turn's tokens is
  :math:`A^E_i + \omega A^S_{i,k}` (:func:`group_advantages` gives :math:`A^E`;
  :func:`turn_values` spreads ``[B, K]`` values over the tokens).

  Args:
    turn_rewards: ``[B, K]`` float, each turn's reward.
    anchors: ``[B, K]`` int, the anchor-state key each turn acted from.
    group_ids: ``[B]`` int, the episode group of each row.
    num_turns: ``[B]`` int, turns taken.
    gamma: discount of the step returns (verl-agent: 0.95).
    norm: one of :data:`STEP_NORMS`.
    valid: optional ``[B]`` mask of rows that count.
    eps: added to the std for ``norm="std"``.

  Returns:
    ``[B, K]`` float32 (a constant: no gradient).
  """
  chex.assert_rank([turn_rewards, anchors], 2)
  chex.assert_equal_shape([turn_rewards, anchors])
  chex.assert_rank([group_ids, num_turns], 1)
  if norm not in STEP_NORMS:
    raise ValueError(f"norm must be one of {STEP_NORMS}, got {norm!r}")
  b, k = turn_rewards.shape
  ret = discounted_returns(jax.lax.stop_gradient(turn_rewards), gamma).reshape(-1)
  taken = (jnp.arange(k)[None, :] < num_turns[:, None]) & (anchors >= 0)
  if valid is not None:
    taken &= valid.astype(bool)[:, None]
  taken = taken.reshape(-1)
  group = jnp.repeat(group_ids, k)
  anchor = anchors.reshape(-1)
  # [N, N] membership of N = B * K turns: plain reductions, which shard over the batch
  same = (taken[:, None] & taken[None, :] & (group[:, None] == group[None, :])
          & (anchor[:, None] == anchor[None, :])).astype(jnp.float32)
  n = jnp.sum(same, axis=1)
  mean = (same @ ret) / jnp.maximum(n, 1.0)
  centred = ret - mean
  if norm == "std":
    var = (same @ (ret * ret) - n * mean * mean) / jnp.maximum(n - 1.0, 1.0)
    centred = centred / (jnp.sqrt(jnp.maximum(var, 0.0)) + eps)
  adv = jnp.where(n > 1.0, centred, ret)
  return jnp.where(taken, adv, 0.0).reshape(b, k)


def turn_values(values: jax.Array, turn_ids: jax.Array) -> jax.Array:
  """``[B, K]`` per-turn values -> ``[B, L]``: each token gets its turn's value (0 where
  ``turn_ids`` is -1 or past ``K``)."""
  chex.assert_rank([values, turn_ids], 2)
  k = values.shape[1]
  idx = jnp.clip(turn_ids, 0, k - 1)
  picked = jnp.take_along_axis(values, idx, axis=1)
  return jnp.where((turn_ids >= 0) & (turn_ids < k), picked, 0.0)


def atod_advantages(
    opd: jax.Array,
    token_weights: jax.Array,
    trajectory_advantages: jax.Array,
    mask: jax.Array,
    kappa: jax.Array | float,
    rho: jax.Array | float,
) -> jax.Array:
  r"""The ATOD per-token advantage.

  .. math:: A_t = \kappa(s)\, w_{k(t)}\, \Delta\log p_t + \rho(s)\, A_{i}

  on generated tokens (0 elsewhere). The turn weight multiplies only the OPD term.
  ``A_i`` is per trajectory (``[B]``, :func:`group_advantages`) or per token (``[B, L]``,
  e.g. GiGPO's :math:`A^E_i + \omega A^S_{i,k(t)}`).

  Args:
    opd: ``[B, L]`` the OPD signal :math:`\log\pi_T - \log\pi_{old}` (see
      :func:`atod_jax.objectives.opd_signal`).
    token_weights: ``[B, L]`` T-DUR weight of each token's turn
      (:func:`atod_jax.objectives.tdur_weights`); ones for "T-DUR off".
    trajectory_advantages: ``[B]`` from :func:`group_advantages`, or ``[B, L]`` per token.
    mask: ``[B, L]`` generated-token mask.
    kappa, rho: scalars (Python floats or traced arrays, e.g. from
      :func:`atod_jax.objectives.annealing_schedules` at the current step).

  Returns:
    ``[B, L]`` float32 advantages, a constant (stop-gradient).
  """
  chex.assert_rank([opd, token_weights, mask], 2)
  chex.assert_equal_shape([opd, token_weights, mask])
  chex.assert_rank(trajectory_advantages, {1, 2})
  chex.assert_equal_shape_prefix([opd, trajectory_advantages], trajectory_advantages.ndim)
  rl = trajectory_advantages.astype(jnp.float32)
  adv = (kappa * token_weights.astype(jnp.float32) * opd.astype(jnp.float32)
         + rho * (rl[:, None] if rl.ndim == 1 else rl))
  return jax.lax.stop_gradient(jnp.where(mask > 0, adv, 0.0))
