"""The whole multi-turn rollout on device, for environments written in JAX
(:class:`~atod_jax.envs.base.DeviceEnv`: the household family is one).

One jitted function runs every turn of a batch of episodes (``lax.scan`` over turns):
the policy decodes a response from its KV cache, the vmapped environment steps, the
answer is appended to the cache, and so on; there is no host round trip per turn.
The policy is the model (sampling) or the environment's privileged expert (which
produces demonstrations in exactly the same layout).

Layout of a row (``L = P + K * (M + O)``; ``P`` prompt, ``K`` turns, ``M`` response
slots, ``O`` observation slots)::

    [ prompt (left-aligned) | resp 0 | obs 0 | resp 1 | obs 1 | ... | resp K-1 | obs K-1 ]

A response is the command's words then ``<eos>``; a response without ``<eos>`` in its
``M`` slots is malformed (the environment sees an unparseable command: an invalid turn,
see :mod:`atod_jax.envs.agent`). The first observation (the task and the start) is the
prompt; each later answer is cut to ``O`` words. After the episode ends every later slot
is padding (``valid`` False).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from atod_jax.envs.agent import invalid_turns, turn_rewards
from atod_jax.envs.base import DeviceEnv
from atod_jax.models.decoder import DecoderLM, KVCache
from atod_jax.rollout.trajectory import Trajectory, assemble, cache_slots, layout_length
from atod_jax.sampling.generate import SamplingParams, append_tokens, decode_loop


@dataclasses.dataclass(frozen=True)
class DeviceRollout:
  """Static shape of an on-device rollout: the environment and the answer slots."""

  env: DeviceEnv
  obs_len: int = 24  # words kept of each answer (the first observation is kept whole)

  @property
  def response_len(self) -> int:
    """``M``: a command and ``<eos>``."""
    return self.env.action_len + 1

  @property
  def prompt_len(self) -> int:
    return self.env.prompt_len

  @property
  def max_turns(self) -> int:
    return self.env.max_turns

  @property
  def length(self) -> int:
    """``L``, token slots of a row."""
    return layout_length(self.prompt_len, self.max_turns, self.response_len, self.obs_len)

  @property
  def cache_slots(self) -> int:
    return cache_slots(self.length)


def _left_align(tokens: jax.Array, valid: jax.Array):
  """Rows whose valid tokens are a prefix -> the same tokens at the right end."""
  n = tokens.shape[1]
  count = jnp.sum(valid, axis=1, keepdims=True)
  idx = (jnp.arange(n)[None, :] + count) % n
  return jnp.take_along_axis(tokens, idx, axis=1), jnp.arange(n)[None, :] >= n - count


def _expert_response(env: DeviceEnv, state, key: jax.Array, noise: float):
  """The expert's commands as responses: words, ``<eos>``, padding; the flag: a random
  command (noise), not to be imitated."""
  keys = jax.random.split(key, jax.tree.leaves(state)[0].shape[0])
  action, noisy = jax.vmap(lambda s, k: env.expert(s, k, noise))(state, keys)
  m = env.action_len + 1
  words = jnp.sum(action != env.pad_id, axis=1, keepdims=True)
  j = jnp.arange(m)[None, :]
  padded = jnp.pad(action, ((0, 0), (0, 1)), constant_values=env.pad_id)
  tokens = jnp.where(j < words, padded, jnp.where(j == words, env.eos_id, env.pad_id))
  return tokens.astype(jnp.int32), j <= words, noisy


def _command(env: DeviceEnv, tokens: jax.Array, valid: jax.Array) -> jax.Array:
  """Response tokens ``[B, M]`` -> commands ``[B, action_len]`` (all ``unk_id`` when the
  response has no ``eos_id``)."""
  is_eos = (tokens == env.eos_id) & valid
  has_eos = jnp.any(is_eos, axis=1, keepdims=True)
  end = jnp.argmax(is_eos, axis=1)[:, None]
  j = jnp.arange(tokens.shape[1])[None, :]
  words = jnp.where(j < end, tokens, env.pad_id)[:, :env.action_len]
  return jnp.where(has_eos, words, env.unk_id).astype(jnp.int32)


def _respond(model, env, state, cache, logits, live, key, m: int, sampling, stop,
             expert_noise: float):
  """One turn's responses of every live episode, ``[B, m]``: the policy's, decoded from
  ``cache`` (``sampling``), or the expert's (``sampling`` None, with ``expert_noise``).
  Returns ``(tokens, valid, imitate, logp, cache)``."""
  if sampling is None:
    resp, resp_valid, noisy = _expert_response(env, state, key, expert_noise)
    resp_valid &= live[:, None]
    resp = jnp.where(resp_valid, resp, env.pad_id)
    return (resp, resp_valid, resp_valid & ~noisy[:, None], jnp.zeros(resp.shape, jnp.float32),
            cache)
  out = decode_loop(model, cache, logits, key, m, sampling, stop, jnp.where(live, m, 0),
                    jnp.int32(env.pad_id))
  return out.tokens, out.valid, out.valid, out.logprobs, out.cache


def _answers(env, state, event, obs_len: int):
  """The environment's answers after a step, ``[B, obs_len]`` left-aligned (nothing for
  an episode that ended)."""
  done = jax.vmap(env.status)(state)[0]
  obs = jax.vmap(env.observe)(state, event)[:, :obs_len]
  obs, obs_valid = _left_align(obs, (obs != env.pad_id) & ~done[:, None])
  return jnp.where(obs_valid, obs, env.pad_id), obs_valid


def rollout(model: DecoderLM | None, spec: DeviceRollout, task_keys: jax.Array,
            key: jax.Array, *, split: str = "train",
            sampling: SamplingParams | None = SamplingParams(),
            group_ids: jax.Array | None = None, expert_noise: float = 0.0,
            invalid_penalty: float = 0.0) -> Trajectory:
  """Plays one episode per task key; traceable (call it under ``jax.jit``).

  Args:
    model: the policy; ignored when ``sampling`` is None (the expert plays).
    spec: the environment and static shapes (:class:`DeviceRollout`).
    task_keys: ``[B]`` PRNG keys; the same key (and split) is always the same task, so
      repeating a key G times gives a GRPO group.
    key: PRNG key of the policy's draws (turn ``k`` uses ``fold_in(key, k)``).
    split: the environment's split name (static).
    sampling: the policy's :class:`SamplingParams`; None plays the expert.
    group_ids: ``[B]`` int32 (default: one group per row).
    expert_noise: when the expert plays, the chance that a turn's command is a random
      one, kept in the context but not in ``gen_mask`` (DART's noise injection: a clone
      also learns to recover from mistakes).
    invalid_penalty: subtracted from the reward of every invalid turn
      (:mod:`atod_jax.envs.agent`).
  """
  env = spec.env
  b = task_keys.shape[0]
  state = jax.vmap(lambda k: env.reset(k, split))(task_keys)
  first = jax.vmap(env.first_observation)(state)
  prompt, prompt_valid = _left_align(first, first != env.pad_id)
  m = spec.response_len
  cache = logits = None
  if sampling is not None:
    cache = KVCache.init(model.cfg, b, spec.cache_slots)
    logits, cache = append_tokens(model, cache, prompt, prompt_valid)
  stop = jnp.full((b, 1), env.eos_id, jnp.int32)

  def turn(carry, k):
    state, cache, logits = carry
    live = ~jax.vmap(env.status)(state)[0]
    anchor = jax.vmap(env.anchor)(state)
    resp, resp_valid, imitate, resp_logp, cache = _respond(
        model, env, state, cache, logits, live, jax.random.fold_in(key, k), m, sampling,
        stop, expert_noise)
    new_state, so = jax.vmap(env.step)(state, _command(env, resp, resp_valid))
    obs, obs_valid = _answers(env, new_state, so.event, spec.obs_len)
    if sampling is not None:
      logits, cache = append_tokens(model, cache, obs, obs_valid)
    malformed = ~jnp.any((resp == env.eos_id) & resp_valid, axis=1)
    invalid = invalid_turns(live, malformed, so.invalid)
    reward = turn_rewards(so.reward, live, invalid, invalid_penalty)
    record = (resp, resp_valid, imitate, resp_logp, obs, obs_valid, reward, invalid,
              jnp.where(live, anchor, -1))
    return (new_state, cache, logits), record

  (state, _, _), rec = jax.lax.scan(turn, (state, cache, logits), jnp.arange(spec.max_turns))
  resp, resp_valid, imitate, resp_logp, obs, obs_valid, reward, invalid, anchors = rec
  _, won, turns = jax.vmap(env.status)(state)
  return assemble(prompt, prompt_valid, resp, resp_valid, imitate, resp_logp, obs, obs_valid,
                  rewards=jnp.sum(reward, axis=0), won=won, num_turns=turns,
                  invalid=jnp.sum(invalid, axis=0, dtype=jnp.int32), group_ids=group_ids,
                  turn_rewards=reward, anchors=anchors)
