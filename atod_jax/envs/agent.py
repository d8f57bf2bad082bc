"""The one policy for answers that are not a usable command, shared by every rollout.

A turn is *invalid* when the policy's answer is malformed (no stop token in its slots;
windowed, no ``<think>`` block or no action tag: see
:func:`atod_jax.envs.prompts.extract_action`) or when the environment reports that the
command did nothing (``info["invalid"]``, or the device env's ``invalid`` flag). An
invalid turn still costs its turn (the environment gets an empty command and answers as
it does to nonsense), is counted (``Trajectory.invalid``, the ``invalid_rate`` metric)
and, with ``env.invalid_penalty = c``, earns ``-c`` on top of the environment's reward
(verl-agent's ``invalid_action_penalty_coef``; its scripts use 0.1 against a success
reward of 10, the configs' default 0.01 against our 1). The functions take
numpy or JAX arrays alike.
"""
from __future__ import annotations


def invalid_turns(live, malformed, flagged):
  """``[B]`` bool: the live episodes whose turn was invalid."""
  return live & (malformed | flagged)


def turn_rewards(env_rewards, live, invalid, penalty: float):
  """``[B]`` float32: this turn's reward, the environment's minus ``penalty`` for an
  invalid turn (0 for finished episodes)."""
  return (env_rewards * live - penalty * invalid).astype("float32")
