"""The whole multi-turn rollout on device, for the JAX household task family.

One jitted function runs every turn of a batch of episodes (``lax.scan`` over turns):
the policy decodes a response from its KV cache, the vmapped environment steps, the
answer is appended to the cache, and so on; there is no host round trip per turn.
The policy is the model (sampling) or the environment's privileged expert (which
produces demonstrations in exactly the same layout).

Layout of a row (``L = P + K * (M + O)``; ``P`` prompt, ``K`` turns, ``M`` response
slots, ``O`` observation slots)::

    [ prompt (left-aligned) | resp 0 | obs 0 | resp 1 | obs 1 | ... | resp K-1 | obs K-1 ]

A response is the command's words then ``<eos>``; a response without ``<eos>`` in its
``M`` slots is malformed (the environment sees an unparseable command). The first
observation (the task and the room) is the prompt; each later answer is cut to ``O``
words. After the episode ends every later slot is padding (``valid`` False).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from atod_jax.envs import household as hh
from atod_jax.models.decoder import DecoderLM, KVCache
from atod_jax.rollout.trajectory import Trajectory, assemble, cache_slots, layout_length
from atod_jax.sampling.generate import SamplingParams, append_tokens, decode_loop


@dataclasses.dataclass(frozen=True)
class HouseholdRollout:
  """Static shape of an on-device household rollout."""

  env: hh.HouseholdParams
  obs_len: int = 24  # words kept of each answer (the first observation is kept whole)

  response_len = hh.ACTION_LEN + 1  # M: a command and <eos>
  prompt_len = hh.OBS_LEN  # P

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


def _expert_response(state: hh.State, key: jax.Array, noise: float):
  """The expert's command as a response: words, ``<eos>``, padding; with probability
  ``noise`` a random command instead (returned flag True: not to be imitated)."""
  action = jax.vmap(hh.expert_action)(state)  # [B, ACTION_LEN]
  b = action.shape[0]
  k_flip, k_pick = jax.random.split(key)
  cands = hh.candidate_actions(state)
  pick = cands[jax.random.randint(k_pick, (b,), 0, cands.shape[0])]
  rand = jax.vmap(lambda s, c: hh.action_tokens(s, c[0], c[1], c[2]))(state, pick)
  noisy = jax.random.uniform(k_flip, (b,)) < noise
  action = jnp.where(noisy[:, None], rand, action)
  m = HouseholdRollout.response_len
  words = jnp.sum(action != hh.PAD, axis=1, keepdims=True)
  j = jnp.arange(m)[None, :]
  padded = jnp.pad(action, ((0, 0), (0, 1)), constant_values=hh.PAD)
  tokens = jnp.where(j < words, padded, jnp.where(j == words, hh.EOS, hh.PAD))
  return tokens.astype(jnp.int32), j <= words, noisy


def _command(tokens: jax.Array, valid: jax.Array) -> jax.Array:
  """Response tokens ``[B, M]`` -> command word ids ``[B, ACTION_LEN]`` (all ``<unk>`` when
  the response has no ``<eos>``)."""
  is_eos = (tokens == hh.EOS) & valid
  has_eos = jnp.any(is_eos, axis=1, keepdims=True)
  end = jnp.argmax(is_eos, axis=1)[:, None]
  j = jnp.arange(tokens.shape[1])[None, :]
  words = jnp.where(j < end, tokens, hh.PAD)[:, :hh.ACTION_LEN]
  return jnp.where(has_eos, words, hh.UNK).astype(jnp.int32)


def rollout(model: DecoderLM | None, spec: HouseholdRollout, task_keys: jax.Array,
            key: jax.Array, *, split: str = "train",
            sampling: SamplingParams | None = SamplingParams(),
            group_ids: jax.Array | None = None, expert_noise: float = 0.0) -> Trajectory:
  """Plays one episode per task key; traceable (call it under ``jax.jit``).

  Args:
    model: the policy; ignored when ``sampling`` is None (the expert plays).
    spec: static shapes (:class:`HouseholdRollout`).
    task_keys: ``[B]`` PRNG keys; the same key (and split) is always the same task, so
      repeating a key G times gives a GRPO group.
    key: PRNG key of the policy's draws (turn ``k`` uses ``fold_in(key, k)``).
    split: "train" or "heldout" (static).
    sampling: the policy's :class:`SamplingParams`; None plays the expert.
    group_ids: ``[B]`` int32 (default: one group per row).
    expert_noise: when the expert plays, the chance that a turn's command is a random
      one instead, whose tokens stay in the context but not in ``gen_mask`` (noise
      injection, as in DART: a clone then also learns to recover from mistakes, which
      a teacher scoring a student's off-course episodes needs).
  """
  b = task_keys.shape[0]
  state = jax.vmap(lambda k: hh.reset(spec.env, k, split))(task_keys)
  first = jax.vmap(lambda s: hh.observe(spec.env, s, hh.initial_event()))(state)
  prompt, prompt_valid = _left_align(first, first != hh.PAD)
  m = spec.response_len
  expert = sampling is None
  if expert:
    cache, logits = None, None
  else:
    cache = KVCache.init(model.cfg, b, spec.cache_slots)
    logits, cache = append_tokens(model, cache, prompt, prompt_valid)
  stop = jnp.full((b, 1), hh.EOS, jnp.int32)

  def turn(carry, k):
    state, cache, logits = carry
    live = ~state.done
    if expert:
      resp, resp_valid, noisy = _expert_response(state, jax.random.fold_in(key, k),
                                                 expert_noise)
      resp_valid &= live[:, None]
      resp = jnp.where(resp_valid, resp, hh.PAD)
      resp_logp = jnp.zeros(resp.shape, jnp.float32)
      imitate = resp_valid & ~noisy[:, None]
    else:
      out = decode_loop(model, cache, logits, jax.random.fold_in(key, k), m, sampling, stop,
                        jnp.where(live, m, 0), jnp.int32(hh.PAD))
      resp, resp_valid, resp_logp, cache = out.tokens, out.valid, out.logprobs, out.cache
      imitate = resp_valid
    new_state, so = jax.vmap(lambda s, a: hh.step(spec.env, s, a))(
        state, _command(resp, resp_valid))
    obs = jax.vmap(lambda s, e: hh.observe(spec.env, s, e))(new_state, so.event)
    obs = obs[:, :spec.obs_len]
    obs, obs_valid = _left_align(obs, (obs != hh.PAD) & ~new_state.done[:, None])
    obs = jnp.where(obs_valid, obs, hh.PAD)
    if not expert:
      logits, cache = append_tokens(model, cache, obs, obs_valid)
    record = (resp, resp_valid, imitate, resp_logp, obs, obs_valid, so.reward * live,
              so.invalid)
    return (new_state, cache, logits), record

  (state, _, _), rec = jax.lax.scan(turn, (state, cache, logits), jnp.arange(spec.max_turns))
  resp, resp_valid, imitate, resp_logp, obs, obs_valid, reward, invalid = rec  # [K, B, ...]
  return assemble(prompt, prompt_valid, resp, resp_valid, imitate, resp_logp, obs, obs_valid,
                  rewards=jnp.sum(reward, axis=0), won=state.won, num_turns=state.turn,
                  invalid=jnp.sum(invalid, axis=0, dtype=jnp.int32), group_ids=group_ids)
