"""The Trajectory batch: the one contract between producing data and learning from it.

Two layouts, told apart by the rank of the token arrays:

* **context** ``[B, L]``: a row is the whole multi-turn episode as one token sequence
  (prompt, then per turn the agent's response and the environment's answer): every
  response sees the whole history.
* **window** ``[B, K, S]``: segment ``k`` of a row holds turn ``k`` alone, its own prompt
  (the task, a short window of history and the current observation, re-rendered each
  turn as the paper's verl-agent prompts are) then the response. The model reads each
  segment as its own sequence (``[B * K, S]``); everything per trajectory (T-DUR's
  turn weights, group advantages, the token mean) still sees the whole row.

In both, ``valid`` marks real tokens: padding may sit anywhere (holes between turns),
and RoPE positions are the running count of valid tokens of the sequence, so a forward
pass sees exactly the context the sampler saw. :func:`model_rows` and :func:`flat` give
the two views.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Trajectory(NamedTuple):
  tokens: jax.Array  # [B, L] or [B, K, S] int32 (the layouts above)
  valid: jax.Array  # bool: a real token (prompt, response or observation)
  gen_mask: jax.Array  # bool: a token the policy generated (the trained tokens)
  turn_ids: jax.Array  # int32: turn of a generated token, -1 elsewhere
  behaviour_logp: jax.Array  # float32: log-prob of each generated token when
  # it was sampled (0 elsewhere; 0 for expert demonstrations)
  rewards: jax.Array  # [B] float32: episode return
  won: jax.Array  # [B] bool: the task was completed
  num_turns: jax.Array  # [B] int32: turns taken
  invalid: jax.Array  # [B] int32: turns whose action was malformed or did nothing
  group_ids: jax.Array  # [B] int32: rows of the same task share a group
  row_valid: jax.Array  # [B] bool: False for an episode lost to an environment failure
  turn_rewards: jax.Array  # [B, K] float32: each turn's reward (they sum to ``rewards``)
  anchors: jax.Array  # [B, K] int32: key of the state each turn acted from (equal
  # states, equal keys: GiGPO's anchor states); -1 where the env gives none

  @property
  def num_tokens(self) -> jax.Array:
    """Generated tokens in the batch (the tokens a step trains on)."""
    return jnp.sum(self.gen_mask)

  @property
  def windowed(self) -> bool:
    return self.tokens.ndim == 3


_TOKEN_FIELDS = ("tokens", "valid", "gen_mask", "turn_ids", "behaviour_logp")


def flat(x: jax.Array) -> jax.Array:
  """A per-token array as ``[B, L]`` (a window layout's segments side by side): the view
  of everything computed per trajectory."""
  return x.reshape(x.shape[0], -1)


def model_rows(x: jax.Array) -> jax.Array:
  """A per-token array as the sequences a model reads: ``[B, L]`` as is, ``[B, K, S]`` as
  ``[B * K, S]`` (reshape the result back with ``.reshape(x.shape)``)."""
  return x.reshape(-1, x.shape[-1])


def trained_mask(traj: Trajectory) -> jax.Array:
  """``[B, L]`` (flat): the generated tokens of the rows that count."""
  return flat(traj.gen_mask) & traj.row_valid[:, None]


def layout_length(prompt: int, turns: int, response: int, observation: int) -> int:
  """Token slots of a row of the shared layout (see :func:`assemble`)."""
  return prompt + turns * (response + observation)


def cache_slots(length: int, multiple: int = 128) -> int:
  """KV-cache slots for a row of ``length`` tokens (rounded up: few compiled shapes)."""
  return -(-length // multiple) * multiple


def assemble(prompt, prompt_valid, resp, resp_valid, imitate, resp_logp, obs, obs_valid, *,
             rewards, won, num_turns, invalid, group_ids=None, row_valid=None,
             turn_rewards=None, anchors=None) -> Trajectory:
  """A :class:`Trajectory` from per-turn pieces, in the layout every rollout shares::

      [ prompt (P) | resp 0 (M) | obs 0 (O) | resp 1 | obs 1 | ... | resp K-1 | obs K-1 ]

  ``prompt*`` are ``[B, P]``; ``resp``, ``resp_valid``, ``imitate`` (the tokens to train
  on), ``resp_logp`` are ``[K, B, M]``; ``obs*`` ``[K, B, O]``; ``turn_rewards`` and
  ``anchors`` ``[K, B]`` (default: no per-turn rewards, no anchors); the rest ``[B]``.
  Traceable, and also takes numpy arrays (the host rollout)."""
  resp, resp_valid, imitate, resp_logp, obs, obs_valid = map(
      jnp.asarray, (resp, resp_valid, imitate, resp_logp, obs, obs_valid))
  prompt, prompt_valid = jnp.asarray(prompt), jnp.asarray(prompt_valid)
  kk, b = resp.shape[0], resp.shape[1]

  def lay(r, o):  # [K, B, M], [K, B, O] -> [B, K * (M + O)]
    return jnp.concatenate([r, o], axis=-1).transpose(1, 0, 2).reshape(b, -1)

  turn_of = jnp.broadcast_to(jnp.arange(kk, dtype=jnp.int32)[:, None, None], resp.shape)
  tokens = jnp.concatenate([prompt, lay(resp, obs)], axis=1)
  valid = jnp.concatenate([prompt_valid, lay(resp_valid, obs_valid)], axis=1)
  gen = jnp.concatenate([jnp.zeros_like(prompt_valid), lay(imitate, jnp.zeros_like(obs_valid))],
                        axis=1)
  turn_ids = jnp.concatenate([jnp.full(prompt.shape, -1, jnp.int32),
                              lay(turn_of, jnp.full(obs.shape, -1, jnp.int32))], axis=1)
  logp = jnp.concatenate([jnp.zeros(prompt.shape, jnp.float32),
                          lay(resp_logp.astype(jnp.float32), jnp.zeros(obs.shape, jnp.float32))],
                         axis=1)
  return _finish(tokens, valid, gen, turn_ids, logp, rewards=rewards, won=won,
                 num_turns=num_turns, invalid=invalid, group_ids=group_ids, row_valid=row_valid,
                 turn_rewards=turn_rewards, anchors=anchors, turns=kk)


def assemble_windowed(prompt, prompt_valid, resp, resp_valid, imitate, resp_logp, *,
                      rewards, won, num_turns, invalid, group_ids=None,
                      row_valid=None, turn_rewards=None, anchors=None) -> Trajectory:
  """A window-layout :class:`Trajectory` (``[B, K, P + M]``): segment ``k`` is turn
  ``k``'s prompt (``prompt*`` ``[K, B, P]``) then its response (``resp``, ``resp_valid``,
  ``imitate``, ``resp_logp`` ``[K, B, M]``); ``turn_rewards``, ``anchors`` ``[K, B]``;
  the rest ``[B]``."""
  resp, resp_valid, imitate, resp_logp, prompt, prompt_valid = map(
      jnp.asarray, (resp, resp_valid, imitate, resp_logp, prompt, prompt_valid))
  kk = resp.shape[0]

  def lay(p, r):  # [K, B, P], [K, B, M] -> [B, K, P + M]
    return jnp.concatenate([p, r], axis=-1).transpose(1, 0, 2)

  turn_of = jnp.broadcast_to(jnp.arange(kk, dtype=jnp.int32)[:, None, None], resp.shape)
  gen = lay(jnp.zeros_like(prompt_valid), imitate)
  return _finish(lay(prompt, resp), lay(prompt_valid, resp_valid), gen,
                 lay(jnp.full(prompt.shape, -1, jnp.int32), turn_of),
                 lay(jnp.zeros(prompt.shape, jnp.float32), resp_logp.astype(jnp.float32)),
                 rewards=rewards, won=won, num_turns=num_turns, invalid=invalid,
                 group_ids=group_ids, row_valid=row_valid, turn_rewards=turn_rewards,
                 anchors=anchors, turns=kk)


def _finish(tokens, valid, gen, turn_ids, logp, *, rewards, won, num_turns, invalid,
            group_ids, row_valid, turn_rewards, anchors, turns) -> Trajectory:
  b = tokens.shape[0]
  per_turn = lambda x, fill, dtype: (jnp.full((b, turns), fill, dtype) if x is None  # noqa: E731
                                     else jnp.asarray(x, dtype).T)
  return Trajectory(
      tokens=tokens.astype(jnp.int32), valid=valid, gen_mask=gen,
      turn_ids=jnp.where(gen, turn_ids, -1), behaviour_logp=jnp.where(gen, logp, 0.0),
      rewards=jnp.asarray(rewards, jnp.float32), won=jnp.asarray(won, bool),
      num_turns=jnp.asarray(num_turns, jnp.int32), invalid=jnp.asarray(invalid, jnp.int32),
      group_ids=(jnp.arange(b, dtype=jnp.int32) if group_ids is None
                 else jnp.asarray(group_ids, jnp.int32)),
      row_valid=jnp.ones((b,), bool) if row_valid is None else jnp.asarray(row_valid, bool),
      turn_rewards=per_turn(turn_rewards, 0.0, jnp.float32),
      anchors=per_turn(anchors, -1, jnp.int32))


def summarize(traj: Trajectory) -> dict[str, jax.Array]:
  """Scalar rollout metrics (means over valid rows)."""
  w = traj.row_valid.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(w), 1.0)
  mean = lambda x: jnp.sum(x.astype(jnp.float32) * w) / n  # noqa: E731
  return {
      "success": mean(traj.won),
      "reward": mean(traj.rewards),
      "turns": mean(traj.num_turns),
      "invalid_rate": jnp.sum(traj.invalid * w) / jnp.maximum(jnp.sum(traj.num_turns * w), 1),
      "response_tokens": jnp.sum(flat(traj.gen_mask) * w[:, None]) / n,
  }


@jax.jit
def pack(traj: Trajectory) -> Trajectory:
  """Moves each sequence's real tokens to the front, in order (padding to the back); in
  the window layout, within each segment.

  Nothing a model computes changes (positions are the running count of valid tokens and
  attention follows slot order), but the sequences can then be cut to their longest real
  length (:func:`trim`): the layout's holes cost nothing in training and scoring.
  """
  order = jnp.argsort(~traj.valid, axis=-1, stable=True)
  take = lambda x: jnp.take_along_axis(x, order, axis=-1)  # noqa: E731
  return traj._replace(**{f: take(getattr(traj, f)) for f in _TOKEN_FIELDS})


def _round_up(n: int, multiple: int) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def trim(traj: Trajectory, multiple: int = 64) -> Trajectory:
  """A packed batch cut to its longest sequence, rounded up to ``multiple``; in the
  window layout also to its longest episode, rounded up to a power of two (a few
  compiled shapes). Reads one or two numbers from the device."""
  longest = int(jnp.max(jnp.sum(traj.valid, axis=-1)))
  length = min(traj.tokens.shape[-1], _round_up(longest, multiple))
  if traj.windowed:
    turns = int(jnp.max(jnp.sum(jnp.any(traj.valid, axis=-1), axis=1)))
    turns = min(traj.tokens.shape[1], 1 << max(turns - 1, 0).bit_length())
    cut = lambda x: x[:, :turns, :length]  # noqa: E731
  else:
    cut = lambda x: x[:, :length]  # noqa: E731
  return traj._replace(**{f: cut(getattr(traj, f)) for f in _TOKEN_FIELDS})
