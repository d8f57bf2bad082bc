"""The clipped policy-gradient surrogate (PPO / GRPO style) and token aggregation."""
from __future__ import annotations

from typing import Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp

Aggregation = Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum"]
AGGREGATIONS: tuple[str, ...] = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum")
LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 5e8: keeps the ratio finite for stale tokens


def aggregate_tokens(
    values: jax.Array, mask: jax.Array, mode: Aggregation = "seq_mean_token_mean"
) -> jax.Array:
  """Reduces per-token values ``[B, L]`` to a scalar over the masked tokens.

  * ``seq_mean_token_mean`` (paper): mean over a row's tokens, then mean over rows.
  * ``token_mean``: mean over all tokens of the batch (long rows weigh more).
  * ``seq_mean_token_sum``: sum over a row's tokens, then mean over rows.

  Rows without any masked-in token take no part in the row mean; an all-masked batch
  gives 0.
  """
  chex.assert_rank([values, mask], 2)
  chex.assert_equal_shape([values, mask])
  if mode not in AGGREGATIONS:
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")
  m = (mask > 0).astype(jnp.float32)
  v = jnp.where(mask > 0, values, 0.0).astype(jnp.float32)
  if mode == "token_mean":
    return jnp.sum(v) / jnp.maximum(jnp.sum(m), 1.0)
  row_n = jnp.sum(m, axis=1)
  row = jnp.sum(v, axis=1)
  if mode == "seq_mean_token_mean":
    row = row / jnp.maximum(row_n, 1.0)
  rows = (row_n > 0).astype(jnp.float32)
  return jnp.sum(row * rows) / jnp.maximum(jnp.sum(rows), 1.0)


def aggregation_weights(mask: jax.Array,
                        mode: Aggregation = "seq_mean_token_mean") -> jax.Array:
  """Per-token weights ``w`` (``mask``'s shape ``[B, L]``) with
  ``weighted_sum(values, w) == aggregate_tokens(values, mask, mode)`` for any ``values``:
  the aggregation as a sum of weighted tokens. Computed once over a whole batch, they let
  its tokens be processed in any slices (e.g. a window layout's turns) whose weighted sums
  add up to the batch's aggregate: exact gradient accumulation."""
  chex.assert_rank(mask, 2)
  if mode not in AGGREGATIONS:
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")
  m = (mask > 0).astype(jnp.float32)
  if mode == "token_mean":
    return m / jnp.maximum(jnp.sum(m), 1.0)
  row_n = jnp.sum(m, axis=1, keepdims=True)
  n_rows = jnp.maximum(jnp.sum((row_n > 0).astype(jnp.float32)), 1.0)
  if mode == "seq_mean_token_mean":
    return m / jnp.maximum(row_n, 1.0) / n_rows
  return m / n_rows


def weighted_sum(values: jax.Array, weights: jax.Array) -> jax.Array:
  """``sum(values * weights)`` over the tokens with a weight (a value elsewhere, even a
  NaN, takes no part), in float32."""
  return jnp.sum(jnp.where(weights > 0, values.astype(jnp.float32), 0.0) * weights)


class ClippedTerms(NamedTuple):
  """Per-token pieces of the clipped surrogate (:func:`clipped_token_terms`)."""

  loss: jax.Array  # the surrogate's per-token loss (0 off the mask)
  clip_active: jax.Array  # bool: the clipped branch is the active one
  dual_active: jax.Array  # bool: the dual clip bound is active
  ratio: jax.Array  # pi_theta / pi_old (stop-gradient)
  log_ratio: jax.Array  # its log (stop-gradient)


def clipped_token_terms(logp, behaviour_logp, advantages, mask, clip_eps: float = 0.2, *,
                        clip_eps_high: float | None = None,
                        dual_clip: float | None = None) -> ClippedTerms:
  """The per-token terms of :func:`clipped_policy_loss` (arrays of any one shape), before
  aggregation."""
  chex.assert_equal_shape([logp, behaviour_logp, advantages, mask])
  eps_lo = clip_eps
  eps_hi = clip_eps if clip_eps_high is None else clip_eps_high
  if not (0.0 <= eps_lo < 1.0 and eps_hi >= 0.0):
    raise ValueError(f"need 0 <= clip_eps < 1 and clip_eps_high >= 0, got {eps_lo}, {eps_hi}")
  if dual_clip is not None and dual_clip <= 1.0:
    raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
  on = mask > 0
  adv = jax.lax.stop_gradient(jnp.where(on, advantages, 0.0)).astype(jnp.float32)
  old = jax.lax.stop_gradient(jnp.where(on, behaviour_logp, 0.0)).astype(jnp.float32)
  log_ratio = jnp.where(on, logp.astype(jnp.float32), 0.0) - old
  log_ratio = jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
  ratio = jnp.exp(log_ratio)
  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, 1.0 - eps_lo, 1.0 + eps_hi)
  per_token = jnp.maximum(unclipped, clipped)
  clip_active = clipped > unclipped
  if dual_clip is not None:
    bound = -adv * dual_clip
    dual_active = (adv < 0) & (bound < per_token)
    per_token = jnp.where(dual_active, bound, per_token)
  else:
    dual_active = jnp.zeros_like(clip_active)
  return ClippedTerms(per_token, clip_active, dual_active, jax.lax.stop_gradient(ratio),
                      jax.lax.stop_gradient(log_ratio))


def clip_metrics(terms: ClippedTerms, mean_weights: jax.Array) -> dict[str, jax.Array]:
  """The clipped surrogate's diagnostics from its :class:`ClippedTerms`, as sums weighted
  by ``mean_weights`` (``aggregation_weights(mask, "token_mean")``: token means over the
  masked tokens; weights of a slice of the batch give the slice's share, which add up):
  ``clip_fraction``, ``dual_clip_fraction``, ``approx_kl`` (the k3 estimate of
  ``KL(pi_old || pi_theta)``, :math:`E[(r-1) - \\log r]`), ``ratio_mean`` and
  ``ratio_max`` (the largest ratio over the tokens with weight, 0 when there are none)."""
  on = mean_weights > 0
  return {"clip_fraction": weighted_sum(terms.clip_active, mean_weights),
          "dual_clip_fraction": weighted_sum(terms.dual_active, mean_weights),
          "approx_kl": weighted_sum(terms.ratio - 1.0 - terms.log_ratio, mean_weights),
          "ratio_mean": weighted_sum(terms.ratio, mean_weights),
          "ratio_max": jnp.max(jnp.where(on, terms.ratio, -jnp.inf), initial=0.0)}


def clipped_policy_loss(
    logp: jax.Array,
    behaviour_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    clip_eps: float = 0.2,
    *,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    aggregation: Aggregation = "seq_mean_token_mean",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  r"""PPO/GRPO clipped surrogate on sampled tokens.

  With :math:`r_t = \exp(\log\pi_\theta(a_t) - \log\pi_{old}(a_t))`:

  .. math::
     \ell_t = \max\big(-A_t r_t,\; -A_t\, \mathrm{clip}(r_t, 1-\epsilon_{lo}, 1+\epsilon_{hi})\big)

  and with dual clip ``c > 1`` (Ye et al. 2020), for :math:`A_t < 0`:
  :math:`\ell_t \leftarrow \min(\ell_t, -c A_t)`, which bounds the loss of a token whose
  ratio has run far above 1. The loss is ``aggregate_tokens(l, mask, aggregation)``.
  In the unclipped region :math:`\partial\ell_t/\partial\log\pi_\theta = -A_t r_t`; where a
  clip is active the token gives no gradient. No reference-KL term (as in the paper).

  Args:
    logp: ``[B, L]`` log-probs of the sampled tokens under the current policy (the
      only input that carries gradient).
    behaviour_logp: ``[B, L]`` log-probs under the policy that sampled them.
    advantages: ``[B, L]`` per-token advantages (e.g. from ``atod_advantages``).
    mask: ``[B, L]`` generated-token mask.
    clip_eps: :math:`\epsilon_{lo}` (and :math:`\epsilon_{hi}` unless given).
    clip_eps_high: optional :math:`\epsilon_{hi}` for asymmetric ("clip-higher") clipping.
    dual_clip: optional ``c > 1``; ``None`` disables dual clipping.
    aggregation: one of :data:`AGGREGATIONS`.

  Returns:
    ``(loss, metrics)``: the scalar loss and token-mean diagnostics over masked tokens:
    ``clip_fraction`` (tokens where the clipped branch is active), ``dual_clip_fraction``,
    ``approx_kl`` (:math:`E[(r-1) - \log r]`, the non-negative k3 estimator of
    :math:`KL(\pi_{old}\|\pi_\theta)`), ``ratio_mean``, ``ratio_max``.
  """
  chex.assert_rank([logp, behaviour_logp, advantages, mask], 2)
  t = clipped_token_terms(logp, behaviour_logp, advantages, mask, clip_eps,
                          clip_eps_high=clip_eps_high, dual_clip=dual_clip)
  loss = aggregate_tokens(t.loss, mask, aggregation)
  return loss, clip_metrics(t, aggregation_weights(mask, "token_mean"))
