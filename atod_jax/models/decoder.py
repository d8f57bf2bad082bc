"""A Flax NNX decoder-only LM covering Qwen2/2.5, Qwen3, Qwen3-MoE and Llama 3.

Axes: ``B`` batch, ``T`` tokens of this call, ``S`` KV-cache slots, ``H`` hidden size,
``N`` query heads, ``K`` key/value heads, ``D`` head dim, ``V`` vocabulary, ``E`` experts.

One call handles training / scoring (no cache: causal attention over the ``T`` tokens)
and sampling (with a :class:`KVCache`: the ``T`` new tokens are written at slots
``[index, index + T)`` and attend to every valid slot up to their own). Rows may hold
padding anywhere (``valid == False``): a padded token is never attended to, and RoPE
positions are given explicitly, so left padding, holes between turns and appended
observations of different lengths per row all work the same way.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from atod_jax.models.config import ModelConfig
from atod_jax.models.sharding import constrain_batch, traced_batch_axes, traced_batch_shards

_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: all-masked rows stay NaN-free
# Version of the parameter tree, stored with our checkpoints (HF directories are
# unaffected). 2: the MLP's gate and up projections became one ``gate_up`` parameter.
PARAMS_LAYOUT = 2


def _param(rngs: nnx.Rngs, shape, axes, dtype, init: str = "normal", std: float = 0.02):
  if init == "ones":
    value = jnp.ones(shape, dtype)
  elif init == "zeros":
    value = jnp.zeros(shape, dtype)
  else:
    value = (std * jax.random.normal(rngs.params(), shape)).astype(dtype)
  return nnx.Param(value, logical_axes=axes)


class KVCache(NamedTuple):
  """Per-layer keys / values and the slot bookkeeping shared by all layers.

  ``keys[i]``: ``[B, K, D, S]`` (RoPE applied), ``values[i]``: ``[B, K, S, D]``: the
  layouts the attention products read without a transposed copy.
  ``valid``: ``[B, S]`` bool, slot holds a real token. ``index``: int32 scalar, next slot
  to write (the same for all rows). ``next_position``: ``[B]`` int32, RoPE position of
  each row's next real token.
  """

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  valid: jax.Array
  index: jax.Array
  next_position: jax.Array

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, slots: int, dtype=None) -> "KVCache":
    dtype = cfg.compute_dtype if dtype is None else dtype
    k, d = cfg.num_kv_heads, cfg.head_dim
    def per_layer(shape):
      return tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return cls(keys=per_layer((batch, k, d, slots)), values=per_layer((batch, k, slots, d)),
               valid=jnp.zeros((batch, slots), bool), index=jnp.int32(0),
               next_position=jnp.zeros((batch,), jnp.int32))

  @property
  def slots(self) -> int:
    return self.valid.shape[1]


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse RoPE frequencies ``[D/2]`` (with Llama 3 scaling where configured)."""
  d = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
  if cfg.rope_llama3 is not None:
    factor, low, high, orig = cfg.rope_llama3
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > orig / low, inv / factor, inv)
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= orig / high) & (wavelen <= orig / low)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def _materialize(x: jax.Array) -> jax.Array:
  """``x``, computed once into its own buffer. XLA fuses cheap-looking elementwise
  producers into every consumer and recomputes them per consumer element; a product with
  the identity is never fused on CPU, so a broadcast sine is not re-evaluated for every
  head of every layer (measured: the fused q-norm + RoPE of a W decode step, 66 -> 16 us).
  HIGHEST precision keeps it exact on TPU / GPU (no bf16 / TF32 passes)."""
  eye = jnp.eye(x.shape[-1], dtype=x.dtype)
  return jnp.matmul(x, eye, precision=jax.lax.Precision.HIGHEST)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray, dtype):
  """``(cos, sin)`` ``[B, T, 1, D/2]`` for ``positions`` ``[B, T]``: computed once per
  call and shared by every layer's queries and keys."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  cos, sin = _materialize(jnp.cos(freqs)), _materialize(jnp.sin(freqs))
  return cos[:, :, None, :].astype(dtype), sin[:, :, None, :].astype(dtype)


def apply_rope(x: jax.Array, rope) -> jax.Array:
  """Rotates ``x`` ``[B, T, heads, D]`` by :func:`rope_tables` (half-split layout)."""
  cos, sin = rope
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


QUERY_BLOCK = 512  # most queries per attention block
SCORE_BYTES = 2**28  # and fewer when [B, N, block, S] f32 scores would exceed this
CAUSAL_BLOCKS = 4  # self-attention over a sequence: at least this many query blocks ...
MIN_CAUSAL_BLOCK = 64  # ... of at least this many queries, each reading only its past
# and at most this many (they are unrolled: more, e.g. 160 blocks of 16 queries for 80
# rows of 2,560 tokens under SCORE_BYTES, take minutes to compile; then the blocks run in
# a loop instead, each reading every key)
MAX_CAUSAL_BLOCKS = 16


def query_block(rows: int, heads: int, slots: int) -> int:
  """The most queries (a power of two from ``QUERY_BLOCK`` down to 16) whose f32 scores
  ``[rows, heads, block, slots]`` stay under ``SCORE_BYTES`` on one device: under a mesh
  whose batch axes split the rows (:func:`constrain_batch`), each device holds only its
  share of them."""
  local = -(-rows // traced_batch_shards(rows))
  block = QUERY_BLOCK
  while block > 16 and local * heads * block * slots * 4 > SCORE_BYTES:
    block //= 2
  return block


def attend(q, keys, values, key_valid, first_slot) -> jax.Array:
  """Causal grouped-query attention over slots, in blocks of queries.

  Args:
    q: ``[B, T, K, G, D]`` queries (G query heads per KV head); query ``t`` sits at
      slot ``first_slot + t``.
    keys, values: ``[B, S, K, D]``.
    key_valid: ``[B, S]`` bool, slots that may be attended to.
    first_slot: int (may be traced).

  Returns ``[B, T, K, G, D]``. Self-attention over a whole sequence (``first_slot == 0``,
  ``S == T``: training and scoring) runs in query blocks that each read only the keys up
  to their last query, skipping the masked upper triangle (a third of the scores of W's
  192-token step, close to half at 4096 tokens), where that takes at most
  ``MAX_CAUSAL_BLOCKS`` blocks. Past ``QUERY_BLOCK`` queries the blocks
  are rematerialised in the backward pass, so memory is ``O(B N block S)`` instead of
  ``O(B N T S)``; the block shrinks (by powers of two, down to 16) to keep the f32
  scores of one block under ``SCORE_BYTES`` a device (:func:`query_block`).
  """
  b, t, kh, g, d = q.shape
  slots = keys.shape[1]
  scale = d ** -0.5
  q_block = query_block(b, kh * g, slots)

  def block(qb, start, n_keys):  # qb [B, C, K, G, D] at slots first_slot + start + c
    ks, vs = keys[:, :n_keys], values[:, :n_keys]
    scores = jnp.einsum("bckgd,bskd->bkgcs", qb, ks).astype(jnp.float32) * scale
    q_slot = first_slot + start + jnp.arange(qb.shape[1])
    allowed = (key_valid[:, None, :n_keys]
               & (jnp.arange(n_keys)[None, :] <= q_slot[:, None])[None])
    scores = jnp.where(allowed[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(qb.dtype)
    return jnp.einsum("bkgcs,bskd->bckgd", probs, vs)

  c = min(q_block, max(MIN_CAUSAL_BLOCK, -(-t // CAUSAL_BLOCKS)))
  if isinstance(first_slot, int) and first_slot == 0 and slots == t \
      and t >= 2 * MIN_CAUSAL_BLOCK and -(-t // c) <= MAX_CAUSAL_BLOCKS:
    fn = jax.checkpoint(block, static_argnums=(1, 2)) if t > q_block else block
    return jnp.concatenate([fn(q[:, s:s + c], s, min(s + c, t)) for s in range(0, t, c)],
                           axis=1)
  if t <= q_block:
    return block(q, 0, slots)
  n_blocks = -(-t // q_block)
  q = jnp.pad(q, ((0, 0), (0, n_blocks * q_block - t), (0, 0), (0, 0), (0, 0)))
  q = jnp.moveaxis(q.reshape(b, n_blocks, q_block, kh, g, d), 1, 0)
  starts = jnp.arange(n_blocks) * q_block
  out = jax.lax.map(lambda args: jax.checkpoint(block, static_argnums=(2,))(*args, slots),
                    (q, starts))
  return jnp.moveaxis(out, 0, 1).reshape(b, n_blocks * q_block, kh, g, d)[:, :t]


KEY_BLOCK = 128  # cache slots per step of the cache attention loop (appends, prefills)
ONE_QUERY_KEY_BLOCK = 64  # ... of a decode step (one new token a row): best on XLA:CPU
# A decode step reads the whole cache in one product (no block copies) once the live
# blocks are at least this share of it; XLA:CPU, W: a copied block costs ~1.7x a block
# of the whole-cache product, so reading dead slots wins past ~60% live.
FULL_CACHE_SHARE = 0.6


def attend_cache(q, keys, values, key_valid, first_slot) -> jax.Array:
  """Attention of new tokens to a KV cache (:class:`KVCache` layouts) that reads only
  the live part of the cache.

  ``q``: ``[B, T, K, G, D]``, query ``t`` at slot ``first_slot + t``; ``keys``
  ``[B, K, D, S]``, ``values`` ``[B, K, S, D]``; ``key_valid`` ``[B, S]``. Returns
  ``[B, T, K, G, D]``. The slots are visited in blocks of ``KEY_BLOCK``
  (``ONE_QUERY_KEY_BLOCK`` for a decode step) with an online softmax, up to the block
  holding the last query, so a step costs in proportion to the context so far, not to
  the cache size (a cache sized for 50 turns costs nothing extra on turn 1). Each block
  is a copied slice; a decode step whose live blocks reach ``FULL_CACHE_SHARE`` of the
  cache reads the whole cache in place instead. Not differentiable in reverse mode (a
  dynamic trip count): training uses :func:`attend`.
  """
  b, t, kh, g, d = q.shape
  slots = keys.shape[-1]
  kb = min(KEY_BLOCK, slots)
  while slots % kb and kb > 16:  # the largest power-of-two block that tiles the cache
    kb //= 2
  if slots % kb:
    return attend(q, jnp.moveaxis(keys, 3, 1), jnp.moveaxis(values, 2, 1),  # [B, S, K, D]
                  key_valid, first_slot)
  qf = q.astype(jnp.float32) * d ** -0.5
  if t == 1 and slots % ONE_QUERY_KEY_BLOCK == 0:
    # a decode step: no query axis, which XLA:CPU turns into smaller, faster batched dots
    qb = ONE_QUERY_KEY_BLOCK
    n_live = (first_slot + qb) // qb

    def allowed(valid, key_slot):
      return valid & (key_slot <= first_slot)[None, :]

    def blocked(_):
      return _online_softmax(qf[:, 0], keys, values, "kg", qb, n_live, allowed, key_valid)

    def whole(_):  # products in the cache's dtype, f32 results: no converted cache copy
      s = jnp.einsum("bkgd,bkds->bkgs", qf[:, 0].astype(keys.dtype), keys,
                     preferred_element_type=jnp.float32)
      s = jnp.where(allowed(key_valid, jnp.arange(slots))[:, None, None], s, _MASK_VALUE)
      p = jax.nn.softmax(s, axis=-1)
      return jnp.einsum("bkgs,bksd->bkgd", p.astype(values.dtype), values,
                        preferred_element_type=jnp.float32)

    out = jax.lax.cond(n_live * qb >= FULL_CACHE_SHARE * slots, whole, blocked, None)
    return out[:, None].astype(q.dtype)  # [B, 1, K, G, D]
  q_slot = first_slot + jnp.arange(t)
  out = _online_softmax(jnp.moveaxis(qf, 1, 3), keys, values, "kgt", kb,
                        (first_slot + t + kb - 1) // kb,
                        lambda valid, key_slot: (valid[:, None, :]
                                                 & (key_slot[None, :] <= q_slot[:, None])[None]),
                        key_valid)
  return jnp.moveaxis(out, 3, 1).astype(q.dtype)  # [B, T, K, G, D]


def _online_softmax(qf, keys, values, axes: str, kb: int, n_blocks, allowed, key_valid):
  """Softmax attention of queries ``qf`` (f32, scaled; ``[B, *axes, D]`` with ``axes``
  "kg" or "kgt") to the first ``n_blocks`` blocks of ``kb`` cache slots, one block at a
  time (online softmax). ``allowed(valid_block, key_slots)`` gives the mask of a block,
  broadcastable to ``[B, *axes[2:], kb]``. Returns ``[B, *axes, D]`` f32."""
  def body(i, carry):
    m, l, acc = carry  # [B, *axes], [B, *axes], [B, *axes, D]
    start = i * kb
    kblk = jax.lax.dynamic_slice_in_dim(keys, start, kb, 3).astype(jnp.float32)
    vblk = jax.lax.dynamic_slice_in_dim(values, start, kb, 2).astype(jnp.float32)
    valid = jax.lax.dynamic_slice_in_dim(key_valid, start, kb, 1)
    s = jnp.einsum(f"b{axes}d,bkds->b{axes}s", qf, kblk)
    s = jnp.where(allowed(valid, start + jnp.arange(kb))[:, None, None], s, _MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.exp(s - m_new[..., None])
    corr = jnp.exp(m - m_new)
    l = l * corr + jnp.sum(p, axis=-1)
    acc = acc * corr[..., None] + jnp.einsum(f"b{axes}s,bksd->b{axes}d", p, vblk)
    return m_new, l, acc

  shape = qf.shape[:-1]
  init = (jnp.full(shape, _MASK_VALUE, jnp.float32), jnp.zeros(shape, jnp.float32),
          jnp.zeros(qf.shape, jnp.float32))
  _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
  return acc / l[..., None]


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, cfg: ModelConfig, rngs: nnx.Rngs, axes=("norm",)):
    self.scale = _param(rngs, (dim,), axes, cfg.params_dtype, init="ones")
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * xf.astype(x.dtype)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    h, n, k, d, pd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.params_dtype
    self.cfg = cfg
    self.q = _param(rngs, (h, n, d), ("embed", "q_heads", "head_dim"), pd)
    self.k = _param(rngs, (h, k, d), ("embed", "kv_heads", "head_dim"), pd)
    self.v = _param(rngs, (h, k, d), ("embed", "kv_heads", "head_dim"), pd)
    self.o = _param(rngs, (n, d, h), ("q_heads", "head_dim", "embed"), pd)
    if cfg.attention_bias:
      self.q_bias = _param(rngs, (n, d), ("q_heads", "head_dim"), pd, init="zeros")
      self.k_bias = _param(rngs, (k, d), ("kv_heads", "head_dim"), pd, init="zeros")
      self.v_bias = _param(rngs, (k, d), ("kv_heads", "head_dim"), pd, init="zeros")
    if cfg.qk_norm:
      self.q_norm = RMSNorm(d, cfg.rms_norm_eps, cfg, rngs)
      self.k_norm = RMSNorm(d, cfg.rms_norm_eps, cfg, rngs)

  def __call__(self, x, rope, valid, cache_kv, index):
    cfg, dt = self.cfg, x.dtype
    q = jnp.einsum("bth,hnd->btnd", x, self.q[...].astype(dt))
    k = jnp.einsum("bth,hkd->btkd", x, self.k[...].astype(dt))
    v = jnp.einsum("bth,hkd->btkd", x, self.v[...].astype(dt))
    if cfg.attention_bias:
      q = q + self.q_bias[...].astype(dt)
      k = k + self.k_bias[...].astype(dt)
      v = v + self.v_bias[...].astype(dt)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, rope)
    k = apply_rope(k, rope)

    t = x.shape[1]
    if cache_kv is None:  # attend within this call: causal over T, padding masked
      keys, values, key_valid, first_slot = k, v, valid, 0
    else:
      cache_k, cache_v, key_valid = cache_kv
      keys = jax.lax.dynamic_update_slice_in_dim(
          cache_k, k.transpose(0, 2, 3, 1).astype(cache_k.dtype), index, 3)  # [B, K, D, S]
      values = jax.lax.dynamic_update_slice_in_dim(
          cache_v, v.transpose(0, 2, 1, 3).astype(cache_v.dtype), index, 2)  # [B, K, S, D]
      first_slot = index
    b, n, kh = x.shape[0], cfg.num_heads, cfg.num_kv_heads
    qg = q.reshape(b, t, kh, n // kh, cfg.head_dim)
    attention = attend if cache_kv is None else attend_cache
    out = attention(qg, keys.astype(dt), values.astype(dt), key_valid, first_slot)
    # one [B*T, N*D] x [N*D, H] product (an einsum over (n, d) made XLA:CPU transpose
    # both operands, the weight included, on every decode step)
    out = out.reshape(b, t, n * cfg.head_dim) @ self.o[...].astype(dt).reshape(-1, cfg.hidden_size)
    return out, (None if cache_kv is None else (keys, values))


class MLP(nnx.Module):
  """SwiGLU. The gate and up projections are one ``[H, 2, I]`` parameter (HF's
  ``gate_proj`` and ``up_proj`` stacked on axis 1), so they run as one ``[H, 2I]``
  product (a training step of W: ~6% faster than two); sharding ``I`` keeps each
  device's gate and up columns together."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    h, i, pd = cfg.hidden_size, cfg.intermediate_size, cfg.params_dtype
    self.gate_up = _param(rngs, (h, 2, i), ("embed", None, "mlp"), pd)
    self.down = _param(rngs, (i, h), ("mlp", "embed"), pd)

  def __call__(self, x):
    dt = x.dtype
    gu = jnp.einsum("bth,hci->btci", x, self.gate_up[...].astype(dt))
    return (jax.nn.silu(gu[..., 0, :]) * gu[..., 1, :]) @ self.down[...].astype(dt)


class MoE(nnx.Module):
  """Token-choice top-k routed experts (Qwen3-MoE), computed dropless with ragged_dot."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    h, i, e, pd = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.params_dtype
    self.cfg = cfg
    self.router = _param(rngs, (h, e), ("embed", None), pd)
    self.gate = _param(rngs, (e, h, i), ("expert", "embed", "mlp"), pd)
    self.up = _param(rngs, (e, h, i), ("expert", "embed", "mlp"), pd)
    self.down = _param(rngs, (e, i, h), ("expert", "mlp", "embed"), pd)

  def __call__(self, x):
    """``x`` [B, T, H]. Under a mesh whose batch axes split the rows (the trainer's
    whole-sequence forwards), each device routes its own rows' tokens with the layer's
    experts gathered to it, as FSDP computes a dense MLP; routed over the global batch
    instead, the sort and gather of the token copies made the compiler hold them whole
    on every device."""
    dt = x.dtype
    weights = tuple(w[...].astype(dt) for w in (self.router, self.gate, self.up, self.down))
    names = traced_batch_axes(x.shape[0])
    if not names:
      return _routed_experts(self.cfg, x, *weights)
    # the layer's experts are gathered whole onto every device: tied to this layer's input,
    # the gather cannot start before the previous layer is done (without the tie the
    # compiler gathered every layer's experts at once: a 30B-A3B teacher's scoring asked
    # for over 16 GiB a v5e chip)
    x, weights = jax.lax.optimization_barrier((x, weights))
    local = jax.shard_map(functools.partial(_routed_experts, self.cfg),
                          in_specs=(P(names),) + (P(),) * len(weights), out_specs=P(names),
                          axis_names=set(names), check_vma=False)
    return local(x, *weights)


def _routed_experts(cfg: ModelConfig, x, router, gate, up, down):
  shape = x.shape
  x = x.reshape(-1, shape[-1])  # [M, H]
  logits = (x @ router).astype(jnp.float32)
  weights, experts = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), cfg.num_experts_per_tok)
  if cfg.norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  flat = experts.reshape(-1)  # [M * k]
  order = jnp.argsort(flat)
  token = order // cfg.num_experts_per_tok
  sizes = jnp.bincount(flat, length=cfg.num_experts).astype(jnp.int32)
  xs = x[token]
  hidden = jax.nn.silu(jax.lax.ragged_dot(xs, gate, sizes)) * jax.lax.ragged_dot(xs, up, sizes)
  y = jax.lax.ragged_dot(hidden, down, sizes)
  y = y * weights.reshape(-1)[order][:, None].astype(x.dtype)
  return jnp.zeros_like(x).at[token].add(y).reshape(shape)


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg, rngs)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg, rngs)
    self.mlp = MoE(cfg, rngs) if cfg.is_moe_layer(layer) else MLP(cfg, rngs)

  def __call__(self, x, rope, valid, cache_kv, index):
    a, new_kv = self.attn(self.attn_norm(x), rope, valid, cache_kv, index)
    x = x + a
    return x + self.mlp(self.mlp_norm(x)), new_kv


def _on_host(v) -> bool:
  return isinstance(v, jax.Array) and jax.typeof(v).memory_space == jax.memory.Space.Host


def on_device(tree):
  """``tree`` with every array that lives in host memory (placed with
  ``memory_kind="pinned_host"``: an offloaded teacher) copied to the device's memory;
  arrays already there are returned as they are. Inside ``jit`` the memory space is
  part of each value's type, so this is decided at trace time and costs nothing for a
  model on the device."""
  return jax.tree.map(lambda v: jax.device_put(v, jax.memory.Space.Device) if _on_host(v)
                      else v, tree)


def _layer_on_device(layer, x):
  """``(x, layer)`` with a host-resident layer's weights copied to the device once ``x``
  (the layer's input) exists: tied to it by an ``optimization_barrier``, the copy of
  one layer cannot start before the previous layer is done, so an offloaded model holds
  one layer's weights on the device at a time instead of the compiler fetching them all
  at once. A layer on the device is returned as it is."""
  graphdef, state = nnx.split(layer)
  if not any(_on_host(v) for v in jax.tree.leaves(state)):
    return x, layer
  x, state = jax.lax.optimization_barrier((x, state))
  return x, nnx.merge(graphdef, on_device(state))


@nnx.remat
def _remat_layer(layer, x, rope, valid):
  return layer(x, rope, valid, None, None)


def _scan_remat_layers(layers, x, rope, valid):
  """The layers as one ``lax.scan`` over their stacked parameters, each rematerialised:
  the backward pass holds one layer's activations plus every layer's input. (A Python
  loop of rematerialised layers does not bound memory on XLA:CPU: its scheduler runs the
  recomputations early, and a 30-layer model then holds all of them; the scan's
  sequential structure cannot be reordered.) ``layers`` must share one structure."""
  graphdef = nnx.graphdef(layers[0])
  stacked = jax.tree.map(lambda *v: jnp.stack(v), *[nnx.state(layer) for layer in layers])

  @jax.checkpoint
  def body(x, state):
    y, _ = nnx.merge(graphdef, state)(x, rope, valid, None, None)
    return constrain_batch(y), None

  return jax.lax.scan(body, x, stacked)[0]


class DecoderLM(nnx.Module):
  """Decoder-only causal LM. See the module docstring for the calling convention."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                        cfg.params_dtype)
    self.layers = nnx.List([DecoderLayer(cfg, i, rngs) for i in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg, rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                            cfg.params_dtype)

  def _uniform_layers(self) -> bool:
    """Whether every layer has one structure (not so for a MoE model with dense layers)."""
    first = nnx.graphdef(self.layers[0])
    return all(nnx.graphdef(layer) == first for layer in self.layers[1:])

  def _on_host(self) -> bool:
    """Whether the layers' weights live in host memory (``memory_kind="pinned_host"``)."""
    return any(_on_host(v) for v in jax.tree.leaves(nnx.state(self.layers)))

  def unembed_matrix(self, dtype) -> jax.Array:
    """``[H, V]`` output projection (the embedding, transposed, when tied)."""
    if self.cfg.tie_word_embeddings:
      return on_device(self.embed[...]).astype(dtype).T
    return on_device(self.lm_head[...]).astype(dtype)

  def hidden_states(self, tokens, positions=None, valid=None, cache: KVCache | None = None):
    """Final-norm hidden states ``[B, T, H]`` and the updated cache (or None).

    Args:
      tokens: ``[B, T]`` int token ids.
      positions: ``[B, T]`` int RoPE positions; default ``0..T-1`` without a cache and
        ``cache.next_position + (running count of valid tokens)`` with one.
      valid: ``[B, T]`` bool, real (not padding) tokens; default all True.
      cache: a :class:`KVCache` to extend, or None.
    """
    cfg = self.cfg
    b, t = tokens.shape
    valid = jnp.ones((b, t), bool) if valid is None else valid.astype(bool)
    if positions is None:
      offset = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1
      base = 0 if cache is None else cache.next_position[:, None]
      positions = base + jnp.maximum(offset, 0)
    x = jnp.take(on_device(self.embed[...]), tokens, axis=0).astype(cfg.compute_dtype)
    # a whole-sequence forward (scoring, the update) keeps its rows on their devices;
    # with a cache (the rollout), the compiler's own layout: moving a decode step's few
    # activations costs less than gathering the weights
    place = constrain_batch if cache is None else (lambda v: v)
    x = place(x)
    rope = rope_tables(positions, rope_inv_freq(cfg), x.dtype)
    if cache is not None:
      slot_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, valid, cache.index, 1)
    keys, values = [], []
    # the layers' scan stacks their weights: an offloaded model (weights in host memory,
    # a frozen teacher: nothing differentiates it) streams them one layer at a time
    # through the loop below instead
    if cfg.remat and cache is None and self._uniform_layers() and not self._on_host():
      x = _scan_remat_layers(self.layers, x, rope, valid)
      return _layer_on_device(self.norm, x)[1](x), None
    for i, layer in enumerate(self.layers):
      kv = None if cache is None else (cache.keys[i], cache.values[i], slot_valid)
      index = None if cache is None else cache.index
      x, layer = _layer_on_device(layer, x)
      if cfg.remat and cache is None:
        x, new_kv = _remat_layer(layer, x, rope, valid)
      else:
        x, new_kv = layer(x, rope, valid, kv, index)
      x = place(x)
      if new_kv is not None:
        keys.append(new_kv[0])
        values.append(new_kv[1])
    x = _layer_on_device(self.norm, x)[1](x)
    if cache is None:
      return x, None
    new_cache = KVCache(
        keys=tuple(keys), values=tuple(values), valid=slot_valid, index=cache.index + t,
        next_position=cache.next_position + jnp.sum(valid, axis=1, dtype=jnp.int32))
    return x, new_cache

  def __call__(self, tokens, positions=None, valid=None, cache: KVCache | None = None):
    """Logits ``[B, T, V]`` (float32) and the updated cache (or None)."""
    x, cache = self.hidden_states(tokens, positions, valid, cache)
    logits = x @ self.unembed_matrix(x.dtype)
    return logits.astype(jnp.float32), cache
