r"""The annealed OPD -> RL hand-off: kappa(s) and rho(s) as optax schedules.

Paper (linear shape), with :math:`p(s) = \min(s / T, 1)`:

.. math::
   \kappa(s) = \kappa_0 - (\kappa_0 - \kappa_{min})\, p(s), \qquad
   \rho(s) = \rho_0 + (\rho_{max} - \rho_0)\, p(s)

with T = 80, kappa 1.0 -> 0.1, rho 1.0 -> 2.0.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

Shape = Literal["linear", "cosine", "step", "constant"]
SHAPES: tuple[str, ...] = ("linear", "cosine", "step", "constant")


class AnnealingSchedules(NamedTuple):
  """Two optax schedules (callables of the step, traceable inside ``jax.jit``)."""

  kappa: optax.Schedule  # weight of the OPD term
  rho: optax.Schedule  # weight of the trajectory (GRPO) term


def _progress_complement(shape: str, steps: int) -> optax.Schedule:
  """c(s): 1 at s=0, falling to 0 at s=steps and staying there, in the given shape."""
  if shape == "constant":
    return optax.constant_schedule(1.0)
  if steps == 0:  # every shape is already at its end value
    return optax.constant_schedule(0.0)
  if shape == "linear":
    return optax.linear_schedule(1.0, 0.0, steps)
  if shape == "cosine":
    return optax.cosine_decay_schedule(1.0, steps, alpha=0.0)
  return optax.piecewise_constant_schedule(1.0, {steps: 0.0})  # step: switch at T


def _between(start: float, end: float, c: optax.Schedule) -> optax.Schedule:
  return lambda step: end + (start - end) * c(step)


def annealing_schedules(
    anneal_steps: int = 80,
    kappa_init: float = 1.0,
    kappa_min: float = 0.1,
    rho_init: float = 1.0,
    rho_max: float = 2.0,
    shape: Shape = "linear",
) -> AnnealingSchedules:
  """kappa(s) and rho(s) for the ATOD advantage.

  Shapes of the hand-off over ``anneal_steps`` = T (both move together):

  * ``linear`` (paper): straight line from the init to the end value, then flat.
  * ``cosine``: half-cosine from the init to the end value, then flat.
  * ``step``: init values before step T, end values from step T on.
  * ``constant``: init values for ever (``kappa_min`` / ``rho_max`` unused); with
    ``kappa_init = rho_init = 1`` this is the paper's "w/o annealing" ablation.

  Args:
    anneal_steps: T, the number of steps of the hand-off (>= 0).
    kappa_init, kappa_min: OPD weight at step 0 and after T.
    rho_init, rho_max: RL weight at step 0 and after T.
    shape: one of :data:`SHAPES`.

  Returns:
    :class:`AnnealingSchedules`; ``kappa(step)`` and ``rho(step)`` accept a Python int
    or a traced integer array and return float32 scalars.
  """
  if shape not in SHAPES:
    raise ValueError(f"schedule shape must be one of {SHAPES}, got {shape!r}")
  if anneal_steps < 0:
    raise ValueError(f"anneal_steps must be >= 0, got {anneal_steps}")
  c = _progress_complement(shape, int(anneal_steps))
  return AnnealingSchedules(
      kappa=_between(kappa_init, kappa_min, c), rho=_between(rho_init, rho_max, c))


class HandOff(NamedTuple):
  """State of the adaptive hand-off (:func:`handoff_update`): scalars and one window, a
  pytree that lives in the train state (checkpointed with it)."""

  ema: jax.Array  # float32 []: the smoothed teacher-student disagreement
  past: jax.Array  # float32 [window]: the EMA after each of the last `window` steps, oldest first
  seen: jax.Array  # int32 []: steps folded in
  start: jax.Array  # int32 []: first step of the hand-off (-1: not started)


def handoff_init(window: int = 10) -> HandOff:
  """The state before the first step."""
  if window < 1:
    raise ValueError(f"the hand-off window must be >= 1, got {window}")
  return HandOff(jnp.float32(0.0), jnp.zeros((window,), jnp.float32), jnp.int32(0),
                 jnp.int32(-1))


def handoff_update(h: HandOff, disagreement: jax.Array, decay: float = 0.9,
                   tol: float = 0.05) -> HandOff:
  r"""Folds one step's disagreement ``d_s`` (e.g. the mean ``|log pi_T - log pi_old|``
  over the step's generated tokens) into the hand-off state: TIDE's trigger.

  .. math:: e_s = \text{decay}\, e_{s-1} + (1 - \text{decay})\, d_s, \qquad e_0 = d_0

  The hand-off starts after the first step ``s`` at which the EMA has stopped falling
  over the window: ``e_s >= (1 - tol) e_{s-W}`` with ``W = len(h.past)`` (it fell by
  less than ``tol`` of itself in ``W`` steps; not before ``W`` steps have been seen: an
  EMA of a series that has gone flat still falls geometrically, so ``tol = 0`` waits for
  noise to lift it); it starts at step ``s + 1`` and never stops.
  """
  d = jnp.asarray(disagreement, jnp.float32)
  ema = jnp.where(h.seen == 0, d, decay * h.ema + (1.0 - decay) * d)
  window = h.past.shape[0]
  flat = (h.seen >= window) & (ema >= (1.0 - tol) * h.past[0])
  start = jnp.where((h.start < 0) & flat, h.seen + 1, h.start)
  past = jnp.concatenate([h.past[1:], ema[None]])
  return HandOff(ema, past, h.seen + 1, start.astype(jnp.int32))


def adaptive_weights(h: HandOff, step, anneal_steps: int = 80, kappa_init: float = 1.0,
                     kappa_min: float = 0.1, rho_init: float = 1.0, rho_max: float = 2.0):
  """``(kappa, rho)`` at ``step`` under the adaptive hand-off: the initial weights until
  the hand-off starts (``h.start``), then the paper's linear anneal over
  ``anneal_steps`` counted from that step."""
  started = h.start >= 0
  done = jnp.asarray(step, jnp.float32) - h.start.astype(jnp.float32)
  p = jnp.where(started, jnp.clip(done / max(anneal_steps, 1), 0.0, 1.0), 0.0)
  if anneal_steps == 0:
    p = jnp.where(started, 1.0, 0.0)
  return (kappa_init + (kappa_min - kappa_init) * p, rho_init + (rho_max - rho_init) * p)
