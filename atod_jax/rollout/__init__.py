"""The agent <-> environment loop: produces :class:`Trajectory` batches."""
from atod_jax.rollout.device import DeviceRollout, rollout
from atod_jax.rollout.trajectory import Trajectory, pack, summarize, trim

__all__ = ["DeviceRollout", "Trajectory", "pack", "rollout", "summarize", "trim"]
