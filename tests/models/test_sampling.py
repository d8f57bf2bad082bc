"""KV-cache sampling: equality with full forwards, continuation, HF greedy parity, sampling law."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atod_jax import sampling as smp
from atod_jax.models import DecoderLM, ModelConfig

CFG = ModelConfig(vocab_size=96, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, intermediate_size=64, qk_norm=True, dtype="float32")


@pytest.fixture(scope="module")
def model():
  return DecoderLM(CFG, nnx.Rngs(3))


def _full_logp(model, seq):
  logits, _ = model(jnp.asarray(seq)[None])
  return np.asarray(jax.nn.log_softmax(logits[0], axis=-1))


def test_cache_decode_equals_full_forward(model):
  prompt = np.random.default_rng(0).integers(0, 96, (3, 7))
  out = smp.generate(model, prompt, jax.random.key(0), 16, smp.SamplingParams(temperature=1.0))
  for b in range(3):
    seq = np.concatenate([prompt[b], np.asarray(out.tokens[b])])
    logp = _full_logp(model, seq)
    want = logp[np.arange(6, 6 + 16), seq[7:]]  # position t predicts token t+1
    np.testing.assert_allclose(out.logprobs[b], want, atol=1e-5)


@pytest.mark.parametrize("key_block,one_query_block,full_share,slots", [
    (128, 64, 0.6, 64),  # defaults: decode steps read the whole (one-block) cache
    (8, 8, 1.1, 64),  # every step runs the live-block loop, many blocks
    (8, 8, 0.3, 64),  # decode switches from the block loop to the whole cache mid-turn
    (128, 64, 0.6, 200),  # 200 slots tile into no block size: plain attention
])
def test_continuation_with_ragged_rows_equals_full_forward(model, key_block, one_query_block,
                                                           full_share, slots, monkeypatch):
  """Left-padded prompts of different lengths, early stops, appended observations of
  different lengths: every log-prob equals that of one forward over the real tokens,
  through each of the cache attention paths."""
  from atod_jax.models import decoder as dec
  monkeypatch.setattr(dec, "KEY_BLOCK", key_block)
  monkeypatch.setattr(dec, "ONE_QUERY_KEY_BLOCK", one_query_block)
  monkeypatch.setattr(dec, "FULL_CACHE_SHARE", full_share)
  jax.clear_caches()  # the block sizes are read at trace time
  rng = np.random.default_rng(1)
  lens, obs_lens = [5, 2, 7], [3, 6, 1]
  prompt = np.zeros((3, 7), np.int32)
  pvalid = np.zeros((3, 7), bool)
  for b, n in enumerate(lens):
    prompt[b, 7 - n:] = rng.integers(1, 96, n)
    pvalid[b, 7 - n:] = True
  cache = smp.init_cache(model, 3, slots)
  logits, cache = smp.append(model, cache, prompt, pvalid)
  out1 = smp.decode(model, cache, logits, jax.random.key(1), 8, max_new=jnp.array([8, 3, 5]))
  obs = np.zeros((3, 6), np.int32)
  ovalid = np.zeros((3, 6), bool)
  for b, n in enumerate(obs_lens):
    obs[b, 6 - n:] = rng.integers(1, 96, n)
    ovalid[b, 6 - n:] = True
  logits, cache = smp.append(model, out1.cache, obs, ovalid)
  out2 = smp.decode(model, cache, logits, jax.random.key(2), 6)
  assert list(np.asarray(out1.lengths)) == [8, 3, 5]
  for b in range(3):
    g1 = np.asarray(out1.tokens[b])[np.asarray(out1.valid[b])]
    seq = np.concatenate([prompt[b][pvalid[b]], g1, obs[b][ovalid[b]], np.asarray(out2.tokens[b])])
    logp = _full_logp(model, seq)
    start = len(seq) - 6
    want = logp[np.arange(start - 1, len(seq) - 1), seq[start:]]
    np.testing.assert_allclose(out2.logprobs[b], want, atol=1e-5)
    # and the first turn's log-probs too
    s1 = lens[b]
    np.testing.assert_allclose(
        np.asarray(out1.logprobs[b])[:len(g1)],
        logp[np.arange(s1 - 1, s1 - 1 + len(g1)), seq[s1:s1 + len(g1)]], atol=1e-5)


def test_stop_tokens_and_row_limits(model):
  prompt = np.random.default_rng(2).integers(0, 96, (2, 5))
  greedy = smp.SamplingParams(temperature=0)
  free = smp.generate(model, prompt, jax.random.key(0), 12, greedy)
  stop = int(free.tokens[0, 3])
  first = int(np.argmax(np.asarray(free.tokens[0]) == stop))  # first time row 0 emits it
  out = smp.generate(model, prompt, jax.random.key(0), 12, greedy,
                     stop_tokens=jnp.array([[stop, -1], [-1, -1]]), max_new=jnp.array([12, 5]),
                     pad_id=-7)
  assert list(np.asarray(out.lengths)) == [first + 1, 5]
  np.testing.assert_array_equal(out.tokens[0, :first + 1], free.tokens[0, :first + 1])
  assert np.all(np.asarray(out.tokens[0, first + 1:]) == -7)
  assert np.all(np.asarray(out.tokens[1, 5:]) == -7)
  np.testing.assert_array_equal(np.asarray(out.valid).sum(1), out.lengths)


def test_sampling_law():
  """Empirical frequencies over 40k rows match the intended distribution (5 sigma)."""
  logits = jnp.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
  n = 40_000
  batch = jnp.tile(logits, (n, 1))

  def check(params, want):
    tok, logp = jax.jit(smp.sample_token, static_argnums=2)(batch, jax.random.key(7), params)
    freq = np.bincount(np.asarray(tok), minlength=6) / n
    sigma = np.sqrt(want * (1 - want) / n) + 1e-12
    assert np.all(np.abs(freq - want) <= 5 * sigma + 1e-9), (params, freq, want)
    full = np.asarray(jax.nn.log_softmax(logits / max(params.temperature, 1e-9)
                                         if params.temperature else logits))
    np.testing.assert_allclose(logp, full[np.asarray(tok)], atol=1e-6)

  p = np.asarray(jax.nn.softmax(logits / 0.7))
  check(smp.SamplingParams(temperature=0.7), p)
  top2 = np.where(np.arange(6) < 2, p, 0)
  check(smp.SamplingParams(temperature=0.7, top_k=2), top2 / top2.sum())
  # nucleus 0.8: keep the best tokens until their mass reaches 0.8
  keep = (np.cumsum(p) - p) < 0.8
  check(smp.SamplingParams(temperature=0.7, top_p=0.8), np.where(keep, p, 0) / p[keep].sum())
  greedy = np.eye(6)[0]
  check(smp.SamplingParams(temperature=0.0), greedy)


def test_chunked_logprobs_equal_naive_and_memory_bounded():
  rng = np.random.default_rng(4)
  model = DecoderLM(CFG, nnx.Rngs(5))
  tokens = jnp.asarray(rng.integers(0, 96, (2, 37)))
  naive = jax.nn.log_softmax(model(tokens)[0], axis=-1)
  naive = np.asarray(jnp.take_along_axis(naive[:, :-1], tokens[:, 1:, None], -1)[..., 0])
  for chunk in (None, 8, 10):
    got = smp.token_logprobs(model, tokens, chunk_size=chunk)
    np.testing.assert_allclose(got[:, 1:], naive, atol=2e-5)
    assert np.all(np.asarray(got[:, 0]) == 0)

  # Peak temporary memory of loss+grad (XLA's own accounting) as the vocabulary grows:
  # the naive path holds [B, T, V] logits; the chunked one O(B * chunk * V).
  b, t, chunk = 2, 512, 32
  rows = []
  for v in (4096, 16384, 65536):
    cfg = CFG.replace(vocab_size=v)
    abstract = nnx.eval_shape(lambda cfg=cfg: DecoderLM(cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)

    def temp(chunk_size, graphdef=graphdef, state=state):
      def loss(st, tok):
        return jnp.sum(smp.token_logprobs(nnx.merge(graphdef, st), tok, chunk_size=chunk_size))
      tok = jax.ShapeDtypeStruct((b, t), jnp.int32)
      return jax.jit(jax.grad(loss)).lower(state, tok).compile().memory_analysis().temp_size_in_bytes

    rows.append((v, b * t * v * 4, temp(None), temp(chunk)))
    if rows[-1][2] == 0:
      pytest.skip(f"{jax.default_backend()} reports no temporary-memory figures")
  print("\nvocab | [B,T,V] f32 logits MB | naive temp MB | chunked temp MB")
  for v, lb, naive_b, chunk_b in rows:
    print(f"{v:6d} | {lb / 2**20:.0f} | {naive_b / 2**20:.0f} | {chunk_b / 2**20:.0f}")
  # Growth from the smallest to the largest vocabulary. Besides the chunk, what grows
  # with V in the chunked path is the [H, V] parameter gradients (tiny next to logits).
  d_logits = rows[-1][1] - rows[0][1]
  d_naive = rows[-1][2] - rows[0][2]
  d_chunked = rows[-1][3] - rows[0][3]
  assert d_naive > d_logits  # the naive path grows by at least the logits
  assert d_chunked < 0.25 * d_logits


def test_full_cache_is_a_clear_error(model):
  cache = smp.init_cache(model, 1, 8)
  logits, cache = smp.append(model, cache, np.ones((1, 6), np.int32))
  with pytest.raises(ValueError, match="KV cache full: 6 of 8 slots used, 3 more needed"):
    smp.append(model, cache, np.ones((1, 3), np.int32))
  with pytest.raises(ValueError, match="KV cache full"):
    smp.decode(model, cache, logits, jax.random.key(0), 4)
