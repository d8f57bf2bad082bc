"""Decoder options: remat, bf16 compute, sharded loading that reads only each device's slice."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atod_jax import sampling as smp
from atod_jax.models import DecoderLM, ModelConfig, load_pretrained, make_mesh, save_pretrained
from atod_jax.models import hf as hf_mod

CFG = ModelConfig(vocab_size=128, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                  head_dim=16, intermediate_size=96, qk_norm=True, dtype="float32")


MOE_MIXED = CFG.replace(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                        mlp_only_layers=(1,))  # layers of two structures: no scan


@pytest.mark.parametrize("cfg", [CFG, MOE_MIXED], ids=["dense-scan", "moe-mixed-loop"])
def test_remat_gives_same_values_and_gradients(cfg):
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 17)))

  def loss(m):
    return jnp.mean(smp.token_logprobs(m, tokens, chunk_size=8))

  plain, remat = DecoderLM(cfg, nnx.Rngs(0)), DecoderLM(cfg.replace(remat=True), nnx.Rngs(0))
  assert remat._uniform_layers() == (cfg is CFG)
  np.testing.assert_allclose(plain(tokens)[0], remat(tokens)[0], atol=1e-6)
  g1, g2 = nnx.grad(loss)(plain), nnx.grad(loss)(remat)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


def test_remat_bounds_backward_memory_with_depth():
  # the compiled backward's scratch memory: without remat it grows by a layer's
  # activations per layer; with remat (the layers scanned) by about one layer input
  def temp_bytes(layers, remat):
    cfg = CFG.replace(num_layers=layers, remat=remat, hidden_size=128, intermediate_size=512)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DecoderLM(cfg, nnx.Rngs(0))))
    tokens = jax.ShapeDtypeStruct((4, 512), jnp.int32)

    def loss(state, tokens):
      return jnp.mean(smp.token_logprobs(nnx.merge(graphdef, state), tokens))
    compiled = jax.jit(jax.grad(loss)).lower(state, tokens).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  per_layer_plain = (temp_bytes(8, False) - temp_bytes(2, False)) / 6
  per_layer_remat = (temp_bytes(8, True) - temp_bytes(2, True)) / 6
  layer_input = 4 * 512 * 128 * 4  # f32 [B, T, H]
  # (the scan also stacks the parameters and their gradients: ~0.8 MB a layer here)
  assert per_layer_remat < 4 * layer_input < per_layer_plain, (per_layer_remat, per_layer_plain)


def test_bf16_compute_is_close_to_f32():
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 128, (2, 33)))
  f32 = DecoderLM(CFG, nnx.Rngs(0))
  bf16 = DecoderLM(CFG.replace(dtype="bfloat16"), nnx.Rngs(0))
  # logits, not probabilities: a tiny random model's are near uniform (~1/128), where
  # any two models agree to 2e-2; its logits (std ~0.15) move by ~0.6 between positions
  np.testing.assert_allclose(bf16(tokens)[0], f32(tokens)[0], atol=2e-2)
  # a bf16 KV cache, one token a step (the decode attention), against the f32 forward:
  # logits (std ~0.15 here) within 0.02, where a one-position slip is off by ~0.6
  want = f32(tokens)[0][:, 17:33]
  cache = smp.init_cache(bf16, 2, 64)
  _, cache = smp.append(bf16, cache, tokens[:, :17])
  steps = []
  for t in range(17, 33):
    logits, cache = smp.append(bf16, cache, tokens[:, t:t + 1])
    steps.append(logits)
  np.testing.assert_allclose(jnp.stack(steps, 1), want, atol=2e-2)


def test_config_roundtrip_and_param_count():
  model = DecoderLM(CFG, nnx.Rngs(0))
  count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert count == CFG.num_params()
  back = ModelConfig.from_hf(CFG.to_hf(), dtype="float32")
  assert back == CFG
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    CFG.replace(num_kv_heads=3)


def test_sharded_load_reads_only_device_slices(tmp_path, monkeypatch):
  model = DecoderLM(CFG, nnx.Rngs(0))
  save_pretrained(model, tmp_path)
  reads = []
  original = hf_mod._read_block

  def spy(sl, spec, index):
    block = original(sl, spec, index)
    reads.append((spec.names[0], block.size))
    return block

  monkeypatch.setattr(hf_mod, "_read_block", spy)
  mesh = make_mesh(2, 2, 2)
  loaded = load_pretrained(tmp_path, mesh=mesh, dtype="float32")
  q = loaded.layers[0].attn.q[...]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  full = int(np.prod(q.shape))
  q_reads = [size for name, size in reads if name == "model.layers.0.self_attn.q_proj.weight"]
  assert q_reads and max(q_reads) == full // 4  # each device read a quarter, never all of it
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 128, (8, 12)))
  np.testing.assert_allclose(nnx.jit(lambda m, t: m(t)[0])(loaded, tokens), model(tokens)[0],
                             atol=1e-5)


def test_query_blocked_attention_matches_single_block(monkeypatch):
  from atod_jax.models import decoder as dec

  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 128, (2, 45)))
  valid = jnp.asarray(np.random.default_rng(4).random((2, 45)) > 0.2)
  valid = valid.at[1, :3].set(False)  # a row that starts with padding
  # a query before its row's first real token sees no key: its output is undefined
  # (and differs between block layouts); every other position must match
  defined = jnp.cumsum(valid, axis=1) > 0

  def run(query_block, min_causal_block, max_causal_blocks=16):
    monkeypatch.setattr(dec, "QUERY_BLOCK", query_block)
    monkeypatch.setattr(dec, "MIN_CAUSAL_BLOCK", min_causal_block)
    monkeypatch.setattr(dec, "MAX_CAUSAL_BLOCKS", max_causal_blocks)
    jax.clear_caches()  # the block sizes are read at trace time
    model = DecoderLM(CFG, nnx.Rngs(0))

    def loss(m):  # the log-prob at t is read from position t - 1
      lp = smp.token_logprobs(m, tokens, valid, chunk_size=None)
      return jnp.mean(lp[:, 1:] * defined[:, :-1])

    # jitted: after clear_caches every eager op would compile again (~2 min in all)
    logits, grads = nnx.jit(lambda m: (m(tokens, valid=valid)[0], nnx.grad(loss)(m)))(model)
    return logits[defined], grads

  want_logits, want_grads = run(512, 10**9)  # one block of all 45 queries
  for blocks in [(8, 10**9),  # 6 rematerialised blocks over all keys, the last partial
                 (512, 8),  # causal blocks of 12 queries, each reading keys up to its own
                 (8, 8),  # causal blocks of 8, rematerialised
                 (8, 8, 4)]:  # 6 causal blocks are over MAX_CAUSAL_BLOCKS: the loop of blocks
    got_logits, got_grads = run(*blocks)
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-5, err_msg=str(blocks))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, err_msg=str(blocks)),
                 got_grads, want_grads)


def test_query_block_budgets_the_rows_of_one_device(monkeypatch):
  """The score budget counts the rows each device holds, not the global batch, and
  the larger block it then allows gives the same attention."""
  from atod_jax.models import decoder as dec

  # 64 rows x 16 heads x 2,560 slots in f32: 2^28 bytes fit blocks of 25 queries
  # over all rows (-> 16), of 204 over the 8 rows of one device (-> 128)
  assert dec.query_block(64, 16, 2560) == 16
  mesh = make_mesh(4, 2, 1)
  with jax.set_mesh(mesh):
    assert dec.query_block(64, 16, 2560) == 128
    assert dec.query_block(65, 16, 2560) == 16  # rows the mesh does not split
  with jax.set_mesh(make_mesh(8, 1, 1)):
    assert dec.query_block(64, 16, 2560) == 128

  rng = np.random.default_rng(5)
  b, t, kh, g, d = 8, 96, 1, 2, 8
  q = jnp.asarray(rng.normal(size=(b, t, kh, g, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, t, kh, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, t, kh, d)), jnp.float32)
  valid = jnp.ones((b, t), bool)
  # budget: 32-query blocks for one device's row, 16 for all 8 rows
  monkeypatch.setattr(dec, "SCORE_BYTES", 1 * kh * g * 32 * t * 4)
  monkeypatch.setattr(dec, "QUERY_BLOCK", 64)
  monkeypatch.setattr(dec, "MIN_CAUSAL_BLOCK", 10**9)  # the blocked path, every key
  jax.clear_caches()
  attend = jax.jit(lambda *a: dec.attend(*a, 0))
  want = attend(q, k, v, valid)
  with jax.set_mesh(make_mesh(8, 1, 1)):
    assert dec.query_block(b, kh * g, t) == 32
    got = attend(q, k, v, valid)
  assert dec.query_block(b, kh * g, t) == 16
  scores = np.einsum("btkgd,bskd->bkgts", q, k) * d ** -0.5
  scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  ref = np.einsum("bkgts,bskd->btkgd", p / p.sum(-1, keepdims=True), v)
  np.testing.assert_allclose(want, ref, atol=1e-5)
  np.testing.assert_allclose(got, ref, atol=1e-5)
