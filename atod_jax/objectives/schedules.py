r"""The annealed OPD -> RL hand-off: kappa(s) and rho(s) as optax schedules.

Paper (linear shape), with :math:`p(s) = \min(s / T, 1)`:

.. math::
   \kappa(s) = \kappa_0 - (\kappa_0 - \kappa_{min})\, p(s), \qquad
   \rho(s) = \rho_0 + (\rho_{max} - \rho_0)\, p(s)

with T = 80, kappa 1.0 -> 0.1, rho 1.0 -> 2.0.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

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
