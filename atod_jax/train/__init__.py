"""The trainer: train state and jitted update, teacher, evaluation, checkpoints, loop."""
from atod_jax.train.config import METHODS, ConfigError, validate
from atod_jax.train.loop import TrainingDiverged, train

__all__ = ["METHODS", "ConfigError", "TrainingDiverged", "train", "validate"]
