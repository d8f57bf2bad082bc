"""From raw model outputs to environment steps: extraction, penalties, notes."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from atod_jax.envs.base import Batch, BatchedEnv
from atod_jax.envs.prompts import ParsedAction, extract_action, invalid_format_note


@dataclasses.dataclass
class AgentStep:
  batch: Batch  # observations carry a note where the output was malformed
  parsed: list[ParsedAction]
  rewards: np.ndarray  # env reward plus the format penalty


def act(env: BatchedEnv, outputs: Sequence[str | bytes | None], done: np.ndarray, *,
        format_penalty: float = -0.1, require_think: bool = True) -> AgentStep:
  """Extracts one command per live episode and steps ``env``.

  A malformed output still costs its turn: the env receives an empty command (it
  answers "Nothing happens."), the reward gets ``format_penalty`` and the observation
  starts with a note saying what was wrong. A well-formed command that the environment
  reports as invalid (``info["invalid"]``) gets the same penalty. Finished episodes
  (``done``) are skipped.
  """
  parsed = [ParsedAction("", True, "") if d else extract_action(o, require_think=require_think)
            for o, d in zip(outputs, done)]
  actions = [None if d else (p.action if p.ok else "") for p, d in zip(parsed, done)]
  batch = env.step(actions)
  bad = np.array([not p.ok and not d for p, d in zip(parsed, done)])
  invalid = np.array([bool(info.get("invalid", False)) for info in batch.infos] or
                     [False] * len(parsed))
  penalised = bad | (invalid & ~np.asarray(done, bool))
  rewards = batch.rewards + np.where(penalised, format_penalty, 0.0).astype(np.float32)
  batch.observations = [f"{invalid_format_note(p.reason)} {o}" if b else o
                        for p, o, b in zip(parsed, batch.observations, bad)]
  return AgentStep(batch, parsed, rewards)
