"""The trainer. Data flows one way: config (:mod:`~atod_jax.train.defaults`,
:mod:`~atod_jax.train.config`) -> task source (:mod:`~atod_jax.train.sources`) ->
rollout -> ``Trajectory`` -> advantages and update (:mod:`~atod_jax.train.methods`,
:mod:`~atod_jax.train.steps`) -> logs (:mod:`~atod_jax.train.logs`), driven by
:func:`train` (:mod:`~atod_jax.train.loop`); random draws in
:mod:`~atod_jax.train.streams`, the teacher in :mod:`~atod_jax.train.teacher`, the
evaluation protocol in :mod:`~atod_jax.train.evaluation`."""
from atod_jax.train.config import ConfigError, validate
from atod_jax.train.loop import TrainingDiverged, train
from atod_jax.train.methods import METHODS

__all__ = ["METHODS", "ConfigError", "TrainingDiverged", "train", "validate"]
