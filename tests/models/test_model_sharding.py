"""The same model on 8 CPU devices (data x fsdp x tensor) gives the 1-device numbers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atod_jax import sampling as smp
from atod_jax.models import DecoderLM, ModelConfig, batch_sharding, make_mesh, shard_model

DENSE = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, intermediate_size=96, qk_norm=True, dtype="float32")
MOE = DENSE.replace(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=32, norm_topk_prob=True)


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2), (8, 1, 1)])
def test_sharded_logits_and_grads_match_single_device(cfg, shape):
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (8, 24)))
  model = DecoderLM(cfg, nnx.Rngs(1))

  def loss(m, tok):
    return jnp.mean(smp.token_logprobs(m, tok, chunk_size=8))

  want_logits = model(tokens)[0]
  want_grads = nnx.grad(loss)(model, tokens)

  mesh = make_mesh(*shape)
  sharded = shard_model(DecoderLM(cfg, nnx.Rngs(1)), mesh)
  q = sharded.layers[0].attn.q[...]
  if shape[1] * shape[2] > 1:  # parameters really are split across devices
    assert len({s.data.unsafe_buffer_pointer() for s in q.addressable_shards}) > 1
    assert q.addressable_shards[0].data.size < q.size
  tok = jax.device_put(tokens, batch_sharding(mesh))
  got_logits = nnx.jit(lambda m, t: m(t)[0])(sharded, tok)
  np.testing.assert_allclose(got_logits, want_logits, atol=1e-5, rtol=1e-5)
  got_grads = nnx.jit(nnx.grad(loss))(sharded, tok)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
               nnx.state(got_grads), nnx.state(want_grads))


def test_sharded_sampling_matches_single_device():
  prompt = np.random.default_rng(3).integers(0, 128, (8, 6))
  greedy = smp.SamplingParams(temperature=0)
  want = smp.generate(DecoderLM(DENSE, nnx.Rngs(2)), prompt, jax.random.key(0), 12, greedy)
  mesh = make_mesh(2, 2, 2)
  model = shard_model(DecoderLM(DENSE, nnx.Rngs(2)), mesh)
  got = smp.generate(model, jax.device_put(jnp.asarray(prompt), batch_sharding(mesh)),
                     jax.random.key(0), 12, greedy)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


def test_make_mesh_fsdp_takes_the_devices_left():
  """data=1, fsdp=-1 (the paper configs): every device on fsdp; data=2: the rest."""
  from atod_jax.models.sharding import make_mesh
  assert dict(make_mesh(1, -1, 1).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  assert dict(make_mesh(2, -1, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 1 * 2}
  with pytest.raises(ValueError, match="do not split into data=3"):
    make_mesh(3, -1, 1)
