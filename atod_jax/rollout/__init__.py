"""The agent <-> environment loop: produces :class:`Trajectory` batches."""
from atod_jax.rollout.device import HouseholdRollout, rollout
from atod_jax.rollout.trajectory import Trajectory, pack, summarize, trim

__all__ = ["HouseholdRollout", "Trajectory", "pack", "rollout", "summarize", "trim"]
