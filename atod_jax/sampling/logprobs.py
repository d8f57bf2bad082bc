"""Log-probs of given tokens, without materialising ``[B, T, V]`` logits at once."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from atod_jax.models.decoder import DecoderLM
from atod_jax.objectives.distill import map_sequence_chunks


def token_logprobs(
    model: DecoderLM,
    tokens: jax.Array,
    valid: jax.Array | None = None,
    positions: jax.Array | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = 512,
) -> jax.Array:
  """``out[b, t] = log p(tokens[b, t] | tokens[b, <t])`` under ``model``; ``out[:, 0] = 0``.

  The aligned layout matches the trainer's per-token arrays (mask, turn ids, behaviour
  log-probs): the log-prob of a token sits at that token's position. Only ``chunk_size``
  positions of logits exist at a time (``[B, chunk, V]``; fewer where they would pass
  ``LOGIT_BYTES``), in the forward and, through rematerialisation, in the backward pass,
  so a 151k vocabulary at 8 x 4096 tokens fits.

  Args:
    model: the LM (differentiable: gradients flow to its parameters).
    tokens: ``[B, T]`` int.
    valid: ``[B, T]`` bool, real tokens (padding is not attended to).
    positions: ``[B, T]`` RoPE positions (default: running count of valid tokens).
    temperature: logits are divided by it (match the sampling temperature of the
      behaviour policy).
    chunk_size: positions per chunk of the vocabulary projection (None: all at once).

  Returns:
    ``[B, T]`` float32.
  """
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  hidden, _ = model.hidden_states(tokens, positions, valid)
  return logprobs_from_hidden(hidden, model.unembed_matrix(hidden.dtype), tokens,
                              temperature=temperature, chunk_size=chunk_size)


# The f32 logits of one chunk ([B, chunk, V]) stay under this many bytes: the chunk
# shrinks (by powers of two, down to MIN_CHUNK positions) for many rows or a large
# vocabulary, e.g. 100 sequences x 151,936 tokens -> 16 positions a chunk. The budget is
# of the whole batch: on a mesh each device holds its share of the rows.
LOGIT_BYTES = 2**30
MIN_CHUNK = 16


def chunk_positions(rows: int, vocab: int, chunk_size: int | None) -> int | None:
  """``chunk_size`` halved until ``rows x chunk x vocab`` f32 logits fit ``LOGIT_BYTES``."""
  if chunk_size is None:
    return None
  while chunk_size > MIN_CHUNK and rows * chunk_size * vocab * 4 > LOGIT_BYTES:
    chunk_size //= 2
  return chunk_size


def logprobs_from_hidden(hidden: jax.Array, unembed: jax.Array, tokens: jax.Array, *,
                         temperature: float = 1.0, chunk_size: int | None = 512) -> jax.Array:
  """:func:`token_logprobs` from the model's final hidden states ``[B, T, H]`` and its
  unembedding ``[H, V]`` (for callers that use the hidden states twice). At most
  ``chunk_size`` positions of logits at a time, fewer where they would pass
  ``LOGIT_BYTES`` (:func:`chunk_positions`)."""
  chunk_size = chunk_positions(hidden.shape[0], unembed.shape[1], chunk_size)

  def chunk(h, target):  # h [B, C, H], target [B, C] -> [B, C]
    logits = (h @ unembed).astype(jnp.float32) / temperature
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
    return picked - logz

  out = map_sequence_chunks(chunk, hidden[:, :-1], tokens[:, 1:].astype(jnp.int32),
                            chunk_size=chunk_size)
  return jnp.pad(out, ((0, 0), (1, 0)))
