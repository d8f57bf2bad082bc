"""Jitted batched generation with a KV cache, and multi-turn continuation.

The flow of one multi-turn episode batch::

    cache = init_cache(model, batch, slots)
    logits, cache = append(model, cache, prompt, prompt_valid)     # prefill
    out = decode(model, cache, logits, key, max_new_tokens=128, ...)  # the agent's turn
    logits, cache = append(model, out.cache, observation, obs_valid)  # env answer
    out = decode(model, cache, logits, key2, ...)                      # next turn ...

``append`` costs work proportional to the appended tokens, not to the history. Rows may
have different lengths everywhere: inputs are left-padded (``valid`` False on padding)
so that every row's last slot is a real token; padding slots are never attended to.
A windowed agent simply starts a fresh cache each turn from a short rendered history.

Shapes are static: the cache has ``slots`` positions and ``decode`` always runs in a
buffer of ``max_new_tokens`` (stopping early when every row is done). Use
:func:`bucket` to round lengths up to a few sizes so that a long run compiles a bounded
number of programs.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from atod_jax.models.decoder import DecoderLM, KVCache


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to draw a token. ``temperature == 0`` is greedy. ``top_k == 0`` and
  ``top_p == 1`` disable those filters."""

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class SampleOutput(NamedTuple):
  tokens: jax.Array  # [B, M] int32, pad_id after a row is done
  logprobs: jax.Array  # [B, M] float32 log-prob of each sampled token (0 after done)
  valid: jax.Array  # [B, M] bool: generated tokens, the stop token included
  lengths: jax.Array  # [B] int32 number of generated tokens
  cache: KVCache  # holds every generated token, ready for `append`
  last_logits: jax.Array  # [B, V] next-token logits after the last valid token


def bucket(n: int, sizes=(64, 128, 256, 512, 1024, 2048, 4096, 8192)) -> int:
  """The smallest size in ``sizes`` that holds ``n`` (multiples of the largest beyond)."""
  for s in sizes:
    if n <= s:
      return s
  top = sizes[-1]
  return -(-n // top) * top


def sample_token(logits: jax.Array, key: jax.Array, params: SamplingParams):
  """Draws one token per row from ``logits`` ``[B, V]``.

  Returns ``(token [B] int32, logprob [B] float32)``. The log-prob is that of the token
  under ``softmax(logits / temperature)`` (``temperature = 1`` for greedy), before any
  top-k / top-p truncation: the distribution a trainer recomputes from the logits.

  The draw is inverse-CDF sampling with one uniform number per row (cheap next to the
  ``B x V`` Gumbel noise of ``jax.random.categorical``); top-k works on ``lax.top_k``
  candidates, top-p sorts (within the top-k candidates when both are set).
  """
  logits = logits.astype(jnp.float32)
  if params.temperature == 0:
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
  scaled = logits / params.temperature
  logp_all = jax.nn.log_softmax(scaled, axis=-1)
  if params.top_k or params.top_p < 1:
    k = params.top_k or scaled.shape[-1]
    cand_logit, cand_id = jax.lax.top_k(scaled, k)  # sorted, descending
    if params.top_p < 1:
      probs = jax.nn.softmax(cand_logit, axis=-1)
      before = jnp.cumsum(probs, axis=-1) - probs  # mass of the better candidates
      cand_logit = jnp.where(before < params.top_p, cand_logit, -jnp.inf)
  else:
    cand_logit, cand_id = scaled, None
  probs = jnp.exp(cand_logit - jnp.max(cand_logit, axis=-1, keepdims=True))
  cdf = jnp.cumsum(probs, axis=-1)
  u = jax.random.uniform(key, (logits.shape[0], 1)) * cdf[:, -1:]
  choice = jnp.minimum(jnp.sum(cdf <= u, axis=-1), cdf.shape[-1] - 1)
  # a zero-probability candidate can only be picked through rounding at the edge
  choice = jnp.minimum(choice, jnp.sum(probs > 0, axis=-1) - 1).astype(jnp.int32)
  token = choice if cand_id is None else jnp.take_along_axis(cand_id, choice[:, None], -1)[:, 0]
  token = token.astype(jnp.int32)
  return token, jnp.take_along_axis(logp_all, token[:, None], axis=-1)[:, 0]


def init_cache(model: DecoderLM, batch: int, slots: int, dtype=None) -> KVCache:
  """An empty cache of ``slots`` positions (rounded by the caller, e.g. with bucket)."""
  return KVCache.init(model.cfg, batch, slots, dtype)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _append(graphdef, state, cache, tokens, valid):
  model = nnx.merge(graphdef, state)
  logits, cache = model(tokens, valid=valid, cache=cache)
  return logits[:, -1], cache


def append(model: DecoderLM, cache: KVCache, tokens: jax.Array, valid: jax.Array | None = None):
  """Writes ``tokens`` ``[B, T]`` (left-padded; ``valid`` marks real ones) into ``cache``.

  Returns ``(logits [B, V] of the next token after each row's last token, cache)``.
  Prefill is ``append`` on an empty cache. The input cache is donated (reused in place).
  Raises ValueError when the cache has no room left (its index is read on the host).
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  valid = jnp.ones(tokens.shape, bool) if valid is None else jnp.asarray(valid, bool)
  if int(cache.index) + tokens.shape[1] > cache.slots:
    raise ValueError(f"KV cache full: {int(cache.index)} of {cache.slots} slots used, "
                     f"{tokens.shape[1]} more asked for")
  graphdef, state = nnx.split(model)
  return _append(graphdef, state, cache, tokens, valid)


@functools.partial(jax.jit, static_argnums=(0, 5, 6), donate_argnums=(2,))
def _decode(graphdef, state, cache, logits, key, max_new_tokens, params, stop_tokens,
            max_new, pad_id):
  model = nnx.merge(graphdef, state)
  b = logits.shape[0]
  out_tok = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  out_logp = jnp.zeros((b, max_new_tokens), jnp.float32)
  out_valid = jnp.zeros((b, max_new_tokens), bool)
  done = max_new <= 0

  def cond(carry):
    step, done = carry[0], carry[3]
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, cache, logits, done, out_tok, out_logp, out_valid = carry
    token, logp = sample_token(logits, jax.random.fold_in(key, step), params)
    live = ~done
    token = jnp.where(live, token, pad_id)
    out_tok = out_tok.at[:, step].set(token)
    out_logp = out_logp.at[:, step].set(jnp.where(live, logp, 0.0))
    out_valid = out_valid.at[:, step].set(live)
    stopped = jnp.any(token[:, None] == stop_tokens, axis=-1) | (step + 1 >= max_new)
    new_logits, cache = model(token[:, None], valid=live[:, None], cache=cache)
    logits = jnp.where(live[:, None], new_logits[:, 0], logits)
    return step + 1, cache, logits, done | (live & stopped), out_tok, out_logp, out_valid

  carry = (jnp.int32(0), cache, logits.astype(jnp.float32), done, out_tok, out_logp, out_valid)
  _, cache, logits, _, out_tok, out_logp, out_valid = jax.lax.while_loop(cond, body, carry)
  return SampleOutput(out_tok, out_logp, out_valid, jnp.sum(out_valid, 1, dtype=jnp.int32),
                      cache, logits)


def decode(
    model: DecoderLM,
    cache: KVCache,
    logits: jax.Array,
    key: jax.Array,
    max_new_tokens: int,
    params: SamplingParams = SamplingParams(),
    *,
    stop_tokens: jax.Array | None = None,
    max_new: jax.Array | None = None,
    pad_id: int = 0,
) -> SampleOutput:
  """Samples up to ``max_new_tokens`` tokens per row, continuing ``cache``.

  Args:
    model: the policy.
    cache: a cache holding each row's context (from :func:`append`); donated.
    logits: ``[B, V]`` next-token logits from the previous call.
    key: PRNG key; step ``i`` uses ``fold_in(key, i)``.
    max_new_tokens: static buffer length ``M`` (compile-time).
    params: :class:`SamplingParams` (static).
    stop_tokens: ``[B, S]`` int per-row stop-token sets, -1 padded (default: none).
    max_new: ``[B]`` int per-row limits ``<= M`` (default ``M``).
    pad_id: written after a row is done.

  A row is done after emitting one of its stop tokens (kept, marked valid) or its
  ``max_new`` tokens; the loop ends when all rows are done.
  """
  b = logits.shape[0]
  if int(cache.index) + max_new_tokens > cache.slots:
    raise ValueError(f"KV cache too small: {int(cache.index)} used + {max_new_tokens} new > "
                     f"{cache.slots} slots")
  stop_tokens = (jnp.full((b, 1), -1, jnp.int32) if stop_tokens is None
                 else jnp.asarray(stop_tokens, jnp.int32).reshape(b, -1))
  max_new = (jnp.full((b,), max_new_tokens, jnp.int32) if max_new is None
             else jnp.minimum(jnp.asarray(max_new, jnp.int32), max_new_tokens))
  graphdef, state = nnx.split(model)
  return _decode(graphdef, state, cache, logits, key, max_new_tokens, params, stop_tokens,
                 max_new, jnp.int32(pad_id))


def generate(
    model: DecoderLM,
    prompt: jax.Array,
    key: jax.Array,
    max_new_tokens: int,
    params: SamplingParams = SamplingParams(),
    *,
    prompt_valid: jax.Array | None = None,
    slots: int | None = None,
    **decode_kw,
) -> SampleOutput:
  """Prefill ``prompt`` ``[B, T]`` (left-padded) into a fresh cache, then :func:`decode`.

  ``slots`` defaults to ``bucket(T + max_new_tokens)``; pass more to leave room for
  later turns.
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  slots = bucket(prompt.shape[1] + max_new_tokens) if slots is None else slots
  cache = init_cache(model, prompt.shape[0], slots)
  logits, cache = append(model, cache, prompt, prompt_valid)
  return decode(model, cache, logits, key, max_new_tokens, params, **decode_kw)
