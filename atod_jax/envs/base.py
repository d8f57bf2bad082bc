"""The batched multi-turn text protocol every environment implements.

An environment holds a batch of episodes. ``reset`` starts them from task ids of a split,
``step`` applies one text action per live episode. Everything crosses the boundary as
plain Python / numpy (text in, text out), so the same trainer loop drives a JAX task
family, a Python simulator in a worker process, or a remote service.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

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
