"""Pure, jit-able ATOD objective terms on padded ``[batch, length]`` arrays.

Import these into your own JAX code; they depend on jax, optax and chex only.

Typical composition (one update of ATOD)::

    from atod_jax import objectives as obj
    sched = obj.annealing_schedules()                      # paper: T=80, 1->0.1, 1->2
    a_traj = obj.group_advantages(rewards, group_ids, num_groups)          # [B]
    dlogp = obj.opd_signal(teacher_logp, behaviour_logp, mask)             # [B, L]
    w = obj.tdur_weights(behaviour_logp, teacher_logp, turn_ids, mask)     # [B, L]
    adv = obj.atod_advantages(dlogp, w, a_traj, mask, sched.kappa(step), sched.rho(step))
    loss, metrics = obj.clipped_policy_loss(logp, behaviour_logp, adv, mask)
"""
from atod_jax.objectives.advantages import (
    ESTIMATORS, STEP_NORMS, atod_advantages, discounted_returns, group_advantages,
    step_advantages, turn_values)
from atod_jax.objectives.distill import (
    DIVERGENCES, map_sequence_chunks, opd_signal, vocab_divergence)
from atod_jax.objectives.policy_loss import (
    AGGREGATIONS, ClippedTerms, aggregate_tokens, aggregation_weights, clip_metrics,
    clipped_policy_loss,
    clipped_token_terms, weighted_sum)
from atod_jax.objectives.schedules import (
    SHAPES, AnnealingSchedules, HandOff, adaptive_weights, annealing_schedules, handoff_init,
    handoff_update)
from atod_jax.objectives.tdur import (
    MODES, TurnStatistics, minmax_normalize, tdur_weights, turn_statistics, turn_weights)

__all__ = [
    "AGGREGATIONS", "DIVERGENCES", "ESTIMATORS", "MODES", "SHAPES", "STEP_NORMS",
    "AnnealingSchedules", "ClippedTerms", "HandOff", "TurnStatistics", "adaptive_weights",
    "handoff_init", "handoff_update",
    "aggregate_tokens", "aggregation_weights", "annealing_schedules", "atod_advantages",
    "clip_metrics", "clipped_policy_loss", "clipped_token_terms", "weighted_sum",
    "discounted_returns", "group_advantages", "step_advantages", "turn_values", "map_sequence_chunks", "minmax_normalize", "opd_signal",
    "tdur_weights", "turn_statistics", "turn_weights", "vocab_divergence",
]
