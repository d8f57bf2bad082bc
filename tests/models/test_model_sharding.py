"""The same model on 8 CPU devices (data x fsdp x tensor) gives the 1-device numbers."""
import contextlib

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
  # traced as the library's caller does, and as the trainer does: under the mesh, where
  # the activations' rows are placed on the batch axes (sharding.constrain_batch)
  for context in (contextlib.nullcontext(), jax.sharding.use_abstract_mesh(mesh.abstract_mesh)):
    with context:
      got_logits = nnx.jit(lambda m, t: m(t)[0])(sharded, tok)
      got_grads = nnx.jit(nnx.grad(loss))(sharded, tok)
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-5, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4),
                 nnx.state(got_grads), nnx.state(want_grads))


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_fsdp_forward_and_backward_split_the_work_under_the_mesh(moe):
  """Under the mesh (as the trainer traces), a gradient on 8 fsdp devices does 1/8 of
  the single device's FLOPs per device and needs under a quarter of its temporaries:
  each device computes its own rows. (Left to itself, the compiler split the activations
  along the hidden axis here and did 2x the FLOPs per device with 77% of the one
  device's temporaries; on a TPU plan it held a 4B model's MLP activations whole on
  every chip. A MoE layer routed over the global batch held half the one device's
  temporaries on each of the 8: the sort and gather of the token copies were whole.)"""
  from atod_jax.models import checkpoint as model_io
  from atod_jax.models.sharding import leaf_shardings
  cfg = ModelConfig(vocab_size=1024, hidden_size=256, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=64, intermediate_size=1024, qk_norm=True,
                    dtype="float32", remat=True)
  if moe:
    cfg = cfg.replace(model_type="qwen3_moe", num_experts=16, num_experts_per_tok=4,
                      moe_intermediate_size=128, norm_topk_prob=True)
  graphdef, shapes = model_io.abstract(cfg)

  def loss(p, t):
    return smp.token_logprobs(nnx.merge(graphdef, p), t).sum()

  grad = jax.jit(jax.grad(loss))
  one = grad.lower(shapes, jax.ShapeDtypeStruct((8, 512), jnp.int32)).compile()
  mesh = make_mesh(1, 8, 1)
  params = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        shapes, leaf_shardings(shapes, mesh))
  tokens = jax.ShapeDtypeStruct((8, 512), jnp.int32, sharding=batch_sharding(mesh))
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    eight = grad.lower(params, tokens).compile()
  flops = [c.cost_analysis()["flops"] for c in (one, eight)]
  assert flops[1] <= 1.05 * flops[0] / 8, flops
  temps = [c.memory_analysis().temp_size_in_bytes for c in (one, eight)]
  assert temps[1] < temps[0] / 4, temps


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


@pytest.mark.parametrize("cfg", [DENSE, MOE.replace(remat=True)], ids=["dense", "moe-remat"])
def test_parameters_in_host_memory_give_the_device_numbers(cfg):
  """An offloaded model (``teacher.offload``: its shards in the devices' host memory)
  scores exactly as on the devices, remat or not; each layer's copy to the device is
  tied to its input (one ``optimization_barrier`` a layer and the final norm), and a
  model on the devices gets none of that."""
  from atod_jax.models.sharding import leaf_shardings
  mesh = make_mesh(1, 8, 1)
  graphdef, params = nnx.split(DecoderLM(cfg, nnx.Rngs(1)))
  on_device = jax.device_put(params, leaf_shardings(params, mesh))
  on_host = jax.device_put(params, leaf_shardings(params, mesh, memory_kind="pinned_host"))
  assert {x.sharding.memory_kind for x in jax.tree.leaves(on_host)} == {"pinned_host"}
  tokens = jax.device_put(jnp.asarray(np.random.default_rng(0).integers(0, 128, (8, 24))),
                          batch_sharding(mesh))
  fn = jax.jit(lambda p, t: smp.token_logprobs(nnx.merge(graphdef, p), t, chunk_size=8))
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    want, got = fn(on_device, tokens), fn(on_host, tokens)
    barriers = [fn.lower(p, tokens).as_text().count("stablehlo.optimization_barrier")
                for p in (on_device, on_host)]
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # on the devices: MoE's own tie a layer, once in the scan's body with remat; in host
  # memory the layers are never scanned (the scan would stack a copy of them all): a tie
  # a layer and one for the final norm, besides MoE's
  moe = (1 if cfg.remat else cfg.num_layers) if cfg.num_experts else 0
  assert barriers == [moe, (cfg.num_layers if cfg.num_experts else 0) + cfg.num_layers + 1]
