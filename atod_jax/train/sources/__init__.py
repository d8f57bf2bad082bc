"""Where a run's episodes come from (a :class:`TaskSource`), built from the config by
:func:`make_source`: an environment written in JAX is played on device
(:class:`~atod_jax.train.sources.device.DeviceSource`), a Python one through a pool of
worker processes (:class:`~atod_jax.train.sources.text.TextSource`). The trainer sees
only this protocol; which one a kind is comes from :mod:`atod_jax.envs.registry`.
"""
from __future__ import annotations

from typing import Protocol

import jax

from atod_jax.envs import registry
from atod_jax.rollout.trajectory import Trajectory
from atod_jax.sampling.generate import SamplingParams


class TaskSource(Protocol):
  """Training episodes, expert episodes and held-out evaluation of one environment."""

  name: str  # for titles: "household-easy", "textworld", ...
  max_turns: int

  def train_batch(self, graphdef, params, task_key: jax.Array, policy_key: jax.Array,
                  sampling: SamplingParams, tasks: int, group_size: int) -> Trajectory:
    """``tasks`` training tasks drawn with ``task_key``, each played ``group_size``
    times by the model (sampling with ``policy_key``); group ids ``0 .. tasks - 1``."""

  def expert_demos(self, key: jax.Array, episodes: int, noise: float = 0.0) -> Trajectory:
    """The expert on ``episodes`` training tasks drawn with ``key``; with ``noise``, that
    share of its turns a random command, played but not imitated."""

  def evaluate(self, graphdef, params, *, episodes: int, temperature: float, seed: int,
               split: str | None = None) -> dict[str, float]:
    """Metrics (``success``, ``reward``, ``turns``, ``invalid_rate``, ...) on the first
    ``episodes`` tasks of ``split`` (default: the evaluation split); the same ``seed``,
    the same episodes."""

  def close(self) -> None:
    """Frees worker processes."""


def make_source(config, workdir: str, mesh, say=print) -> TaskSource:
  """The :class:`TaskSource` of ``config.env``."""
  entry = registry.get(config.env.kind)
  if entry.device is not None:
    from atod_jax.train.sources.device import DeviceSource
    return DeviceSource(config, mesh)
  from atod_jax.train.sources.text import TextSource
  return TextSource(config, workdir, mesh, say)
