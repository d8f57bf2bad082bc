"""The two environment protocols: the batched multi-turn text protocol every Python
environment implements (:class:`BatchedEnv`), and the per-episode JAX protocol of the
environments played on device (:class:`DeviceEnv`).

An environment holds a batch of episodes. ``reset`` starts them from task ids of a split,
``step`` applies one text action per live episode. Everything crosses the boundary as
plain Python / numpy (text in, text out), so the same trainer loop drives a JAX task
family, a Python simulator in a worker process, or a remote service.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol, Sequence

import jax
import numpy as np


@dataclasses.dataclass
class Batch:
  """What the agent sees after ``reset`` / ``step``; one entry per episode."""

  observations: list[str]
  tasks: list[str]  # the task text ("put a clean mug in/on cabinet")
  rewards: np.ndarray  # [B] float32, this step's reward
  dones: np.ndarray  # [B] bool
  wons: np.ndarray  # [B] bool
  admissible: list[list[str]] | None = None  # admissible commands, where the env has them
  expert: list[str | None] | None = None  # the expert's next command, where one exists
  aborted: np.ndarray | None = None  # [B] bool: episode lost to an env failure
  infos: list[dict] = dataclasses.field(default_factory=list)


class BatchedEnv(Protocol):
  """The protocol (structural): any class with these members is an environment."""

  max_turns: int

  def reset(self, split: str, task_ids: Sequence[int]) -> Batch:
    """Starts ``len(task_ids)`` episodes; the same (split, id) is always the same task."""

  def step(self, actions: Sequence[str | None]) -> Batch:
    """One command per episode (``None`` for an episode that is already done)."""

  def close(self) -> None:
    """Frees processes / files."""

  # Optional: ``num_tasks(split) -> int``, the number of task ids of a split (the real
  # environments have it; the trainer draws task ids from it).


def start_step(actions: Sequence[str | None], n: int):
  """The checks and empty outputs every ``step`` starts from: one action per episode,
  then ``(observations, rewards, infos)`` to fill for the live episodes."""
  if len(actions) != n:
    raise ValueError(f"expected {n} actions, got {len(actions)}")
  return [""] * n, np.zeros(n, np.float32), [{} for _ in range(n)]


class DeviceStep(NamedTuple):
  """What :meth:`DeviceEnv.step` reports for one episode (scalars)."""

  reward: jax.Array  # float32: this turn's reward
  invalid: jax.Array  # bool: the command could not be parsed or did nothing
  event: jax.Array  # whatever :meth:`DeviceEnv.observe` needs to word the answer


class DeviceEnv(Protocol):
  """An environment written in JAX, played entirely on device by
  :func:`atod_jax.rollout.device.rollout` (``lax.scan`` over turns, ``vmap`` over
  episodes). Every method works on ONE episode and is traceable; the instance is a
  frozen, hashable record of static settings (it is a static argument of ``jit``).

  Tokens are the environment's own word ids (its vocabulary is the model's): a command
  is ``action_len`` ids padded with ``pad_id``; the rollout adds ``eos_id``; a response
  without it reaches the environment as ``unk_id`` everywhere (an invalid turn).
  """

  max_turns: int
  prompt_len: int  # ids of the first observation (the task and the start), the prompt
  action_len: int
  vocab_size: int
  pad_id: int
  eos_id: int
  unk_id: int

  def reset(self, key: jax.Array, split: str) -> Any:
    """A task from ``key`` (the same key and split: the same task)."""

  def first_observation(self, state) -> jax.Array:
    """``[prompt_len]`` int32: the prompt (padding at the end)."""

  def step(self, state, command: jax.Array) -> tuple[Any, DeviceStep]:
    """Applies ``command`` (``[action_len]`` int32); a finished episode stays finished."""

  def observe(self, state, event) -> jax.Array:
    """``[n]`` int32: the answer to the last command (padding at the end)."""

  def status(self, state) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(done, won, turns taken)``."""

  def expert(self, state, key: jax.Array, noise: float) -> tuple[jax.Array, jax.Array]:
    """``(command, random)``: the privileged expert's next command; with probability
    ``noise`` a random command instead (``random`` True: not to be imitated)."""

  def anchor(self, state) -> jax.Array:
    """Non-negative int32 key of the state the agent acts from (equal for equal states
    whatever the turn): GiGPO groups turns by it."""
