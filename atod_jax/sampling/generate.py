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
from atod_jax.models.sharding import Together


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


_BLOCK = 128  # vocabulary block of the two-level inverse CDF
_TOP_P_ITERS = 24  # bisection steps for the nucleus threshold (f32 resolution)


def _argmax(x: jax.Array) -> jax.Array:
  """Row argmax (first maximum) from two plain reductions; XLA:CPU's variadic-reduce
  argmax is ~20x slower than a max at [64, 8192]."""
  top = jnp.max(x, axis=-1, keepdims=True)
  last = x.shape[-1] - 1
  reverse_iota = last - jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return last - jnp.max(jnp.where(x >= top, reverse_iota, 0), axis=-1)  # a max-reduce:
  # measured faster inside the decode loop than the equivalent min-reduce


def _last_positive(w: jax.Array) -> jax.Array:
  iota = jax.lax.broadcasted_iota(jnp.int32, w.shape, w.ndim - 1)
  return jnp.max(jnp.where(w > 0, iota, 0), axis=-1)


def _inverse_cdf(weights: jax.Array, u: jax.Array) -> jax.Array:
  """Index ``i`` with ``cdf[i-1] <= u * total < cdf[i]`` per row of non-negative
  ``weights`` ``[B, V]``, ``u`` ``[B]`` in [0, 1). Two levels (blocks of 128, then within
  the chosen block) instead of a cumulative sum over the whole vocabulary. A weight-0
  entry is never returned (rounding at the top end falls back to the last positive)."""
  b, v = weights.shape
  pad = (-v) % _BLOCK
  w = jnp.pad(weights, ((0, 0), (0, pad))).reshape(b, -1, _BLOCK)
  block_sum = jnp.sum(w, axis=-1)  # [B, nb]
  block_cdf = jnp.cumsum(block_sum, axis=-1)
  target = u * block_cdf[:, -1]
  blk = jnp.sum(block_cdf <= target[:, None], axis=-1)
  blk = jnp.minimum(blk, _last_positive(block_sum))
  before = jnp.take_along_axis(block_cdf - block_sum, blk[:, None], axis=-1)[:, 0]
  row = jnp.take_along_axis(w, blk[:, None, None], axis=1)[:, 0]  # [B, 128]
  idx = jnp.sum(jnp.cumsum(row, axis=-1) <= (target - before)[:, None], axis=-1)
  idx = jnp.minimum(idx, _last_positive(row))
  return (blk * _BLOCK + idx).astype(jnp.int32)


def sample_token(logits: jax.Array, key: jax.Array, params: SamplingParams):
  """Draws one token per row from ``logits`` ``[B, V]``.

  Returns ``(token [B] int32, logprob [B] float32)``. The log-prob is that of the token
  under ``softmax(logits / temperature)`` (``temperature = 1`` for greedy), before any
  top-k / top-p truncation: the distribution a trainer recomputes from the logits.

  The draw is inverse-CDF sampling with one uniform number per row (cheap next to the
  ``B x V`` Gumbel noise of ``jax.random.categorical``). Top-k keeps the tokens at or
  above the k-th largest logit; top-p keeps the smallest set of most likely tokens whose
  mass reaches ``top_p``, found by bisection on a probability threshold (no sort of
  the vocabulary). Ties at either boundary are kept.
  """
  logits = logits.astype(jnp.float32)
  scaled = logits if params.temperature == 0 else logits / params.temperature
  top = jnp.max(scaled, axis=-1, keepdims=True)
  e = jnp.exp(scaled - top)
  log_z = jnp.log(jnp.sum(e, axis=-1))
  if params.temperature == 0:
    token = _argmax(logits)
  else:
    if params.top_k:
      # min over the k values, not [:, -1]: that slice makes XLA:CPU sort the vocabulary
      kth = jnp.min(jax.lax.top_k(scaled, params.top_k)[0], axis=-1, keepdims=True)
      e = jnp.where(scaled >= kth, e, 0.0)
    if params.top_p < 1:
      p = e / jnp.sum(e, axis=-1, keepdims=True)

      def halve(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        ok = jnp.sum(jnp.where(p >= mid, p, 0.0), axis=-1, keepdims=True) >= params.top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

      lo = jnp.zeros_like(top)
      lo, _ = jax.lax.fori_loop(0, _TOP_P_ITERS, halve, (lo, jnp.max(p, -1, keepdims=True)))
      e = jnp.where(p >= lo, e, 0.0)
    token = _inverse_cdf(e, jax.random.uniform(key, (logits.shape[0],)))
  picked = jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0]
  return token, picked - top[:, 0] - log_z


def init_cache(model: DecoderLM, batch: int, slots: int, dtype=None) -> KVCache:
  """An empty cache of ``slots`` positions (rounded by the caller, e.g. with bucket)."""
  return KVCache.init(model.cfg, batch, slots, dtype)


def _check_room(cache: KVCache, n: int) -> None:
  """Clear error instead of a silently clamped cache write (one host read per call)."""
  used = int(cache.index)
  if used + n > cache.slots:
    raise ValueError(f"KV cache full: {used} of {cache.slots} slots used, {n} more needed")


def append_tokens(model: DecoderLM, cache: KVCache, tokens, valid):
  """The traceable body of :func:`append` (no host checks), for jitted callers."""
  hidden, cache = model.hidden_states(tokens, valid=valid, cache=cache)
  last = hidden[:, -1]  # only the next-token logits are needed: skip T-1 vocab projections
  return (last @ model.unembed_matrix(last.dtype)).astype(jnp.float32), cache


@Together
@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def jit_append(graphdef, state, cache, tokens, valid):
  """:func:`append` on a split model (``graphdef`` static, ``state`` its parameters), jitted
  with the cache donated: the call the trainer's rollouts and the scaling plan make."""
  return append_tokens(nnx.merge(graphdef, state), cache, tokens, valid)


def append(model: DecoderLM, cache: KVCache, tokens: jax.Array, valid: jax.Array | None = None):
  """Writes ``tokens`` ``[B, T]`` (left-padded; ``valid`` marks real ones) into ``cache``.

  Returns ``(logits [B, V] of the next token after each row's last token, cache)``.
  Prefill is ``append`` on an empty cache. The input cache is donated (reused in place).
  Raises ValueError when the cache has no room left (its index is read on the host).
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  valid = jnp.ones(tokens.shape, bool) if valid is None else jnp.asarray(valid, bool)
  _check_room(cache, tokens.shape[1])
  graphdef, state = nnx.split(model)
  return jit_append(graphdef, state, cache, tokens, valid)


def decode_loop(model: DecoderLM, cache: KVCache, logits, key, max_new_tokens: int,
                params: SamplingParams, stop_tokens, max_new, pad_id) -> SampleOutput:
  """The traceable body of :func:`decode` (no host checks): for use inside a jitted
  caller such as the on-device rollout. Same arguments, all already arrays."""
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


@Together
@functools.partial(jax.jit, static_argnums=(0, 5, 6), donate_argnums=(2,))
def jit_decode(graphdef, state, cache, logits, key, max_new_tokens, params, stop_tokens,
               max_new, pad_id):
  """:func:`decode` on a split model, jitted with the cache donated (arguments already
  arrays, no host checks)."""
  return decode_loop(nnx.merge(graphdef, state), cache, logits, key, max_new_tokens, params,
                     stop_tokens, max_new, pad_id)


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
  _check_room(cache, max_new_tokens)
  stop_tokens = (jnp.full((b, 1), -1, jnp.int32) if stop_tokens is None
                 else jnp.asarray(stop_tokens, jnp.int32).reshape(b, -1))
  max_new = (jnp.full((b,), max_new_tokens, jnp.int32) if max_new is None
             else jnp.minimum(jnp.asarray(max_new, jnp.int32), max_new_tokens))
  graphdef, state = nnx.split(model)
  return jit_decode(graphdef, state, cache, logits, key, max_new_tokens, params, stop_tokens,
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
