"""The ahead-of-time plan (atod_jax.scaling.plan): its FLOP count against XLA's own, its
per-chip bytes against the shapes, its errors, and the paper-scale 0.6B run compiled
by the real TPU compiler for v5e:2x4 (needs libtpu, from the test extra's jax[tpu])."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atod_jax.models import DecoderLM, ModelConfig
from atod_jax.sampling.logprobs import token_logprobs
from atod_jax.scaling import plan as pl
from tests.train import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_libtpu = pytest.mark.skipif(not pl.has_tpu_compiler(),
                                  reason="libtpu is not installed (pip install 'jax[tpu]')")


@pytest.mark.parametrize("moe", [False, True])
def test_forward_flops_match_xla_cost_analysis(moe):
  """The plan's count of a forward (layers, attention over every key, the vocabulary
  projection) is XLA's count of the compiled forward within 6% (XLA adds the norms,
  softmax and activations), and the hand count. A MoE layer's experts run as a ragged
  dot, which XLA's cost analysis counts as if every token met every expert: there the
  plan counts the active experts (top-k of them) and only the hand count applies."""
  kw = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
            model_type="qwen3_moe") if moe else {}
  cfg = ModelConfig(vocab_size=512, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=64, intermediate_size=1024, dtype="float32", **kw)
  graphdef, params = nnx.split(DecoderLM(cfg, nnx.Rngs(0)))
  b, t = 2, 64  # one attention block of all 64 queries over all 64 keys
  fn = jax.jit(lambda p, x: token_logprobs(nnx.merge(graphdef, p), x, chunk_size=None))
  xla = fn.lower(params, jnp.zeros((b, t), jnp.int32)).compile().cost_analysis()["flops"]
  ours = pl.forward_flops(cfg, b * t, b * t * t, b * t)
  if not moe:
    assert ours == pytest.approx(xla, rel=0.06)
  else:
    assert ours < xla
  by_hand = 2 * b * t * (2 * (256 * 64 * (2 * 4 + 2 * 2) + (2 * 3 * 256 * 256 + 4 * 256 if moe
                                                             else 3 * 256 * 1024))
                         + 256 * 512) + 4 * 2 * 4 * 64 * b * t * t
  assert ours == by_hand


def test_unknown_targets_and_models_fail_in_one_line():
  with pytest.raises(pl.PlanError, match="unknown target 'v9:2x2'.*v5e:2x4"):
    pl.topology("v9:2x2")
  with pytest.raises(pl.PlanError, match="unknown model 'qwen9'.*qwen3-0.6b"):
    pl.model_config("qwen9")
  cfg = pl.model_config("qwen3-30b-a3b")  # the published shape: 30.5 B, 3.3 B active
  assert cfg.num_params() == pytest.approx(30.5e9, rel=0.01)
  assert pl.model_config("qwen3-0.6b").num_params() == pytest.approx(0.596e9, rel=0.01)
  assert pl.model_config("qwen3-4b").num_params() == pytest.approx(4.02e9, rel=0.01)
  if pl.has_tpu_compiler():
    with pytest.raises(pl.PlanError, match="libtpu does not know the topology 'v5e:3x7'"):
      pl.topology("v5e:3x7")
  with pytest.raises(pl.PlanError, match="device"):
    pl.plan(tiny_config.shipped("quickstart"), "v5e:2x4", student="qwen3-0.6b",
            teacher="qwen3-4b")


def test_meshes_cover_every_split():
  assert pl.meshes(8)[:4] == [(1, 8, 1), (2, 4, 1), (4, 2, 1), (8, 1, 1)]
  assert all(d * f * t == 8 for d, f, t in pl.meshes(8)) and len(pl.meshes(8)) == 10


@needs_libtpu
@pytest.mark.parametrize("target", ["v5e:2x4", "v6e:2x4", "v5p:2x2x1", "v4:2x2x1"])
def test_chip_hbm_is_what_the_tpu_compiler_accepts(target):
  """The plan's usable HBM a chip is the compiler's own limit: one buffer 1 MiB under it
  compiles for a device of the topology, 1 MiB over it is refused (out of HBM)."""
  from jax.sharding import SingleDeviceSharding
  # through the plan's own door, which lets several processes (xdist workers) load libtpu
  device = pl.topology(target)[1][0]
  limit = pl.CHIPS[target.split(":")[0]].hbm_bytes

  def compiles(nbytes):
    f = jax.jit(lambda: jnp.ones((nbytes,), jnp.int8), out_shardings=SingleDeviceSharding(device))
    try:
      f.lower().compile()
    except Exception as e:  # noqa: BLE001 (the compiler's error type is not public)
      assert "memory" in str(e).lower() or "hbm" in str(e).lower(), e
      return False
    return True

  assert compiles(limit - 2**20)
  assert not compiles(limit + 2**20)


@pytest.mark.slow  # 5-8 min of TPU compilation on 2 cores: the largest share of CI's time
@needs_libtpu
def test_paper_scale_06b_plan_compiles_and_fits_v5e_2x4():
  """configs/alfworld_qwen3.py with Qwen3-0.6B and a Qwen3-4B teacher, the paper's batch
  (8 x 8 episodes, 50 turns of 2,048 + 512 tokens) on v5e:2x4 in the setting of
  docs/scaling.md: every function compiles for the TPU and fits its 15.75 GiB a chip, and
  the resident bytes are the shapes' (f32 AdamW state of 0.6 B parameters and bf16
  teacher weights over 8 chips)."""
  config = tiny_config.shipped("alfworld_qwen3")
  plan = pl.plan(config, "v5e:2x4", student="qwen3-0.6b", teacher="qwen3-4b")
  names = [r.name for r in plan.rows]
  assert names == ["rollout/prefill", "rollout/decode", "score/teacher", "score/student",
                   "update"]
  assert plan.fits, plan.table()
  assert not any(r.refused for r in plan.rows)
  student = pl.model_config("qwen3-0.6b").num_params()
  teacher = pl.model_config("qwen3-4b").num_params()
  update = plan.rows[-1]
  # the update's arguments: params + 2 Adam moments (f32) of the student over 8 chips,
  # plus the batch; the teacher (bf16, 8 chips) stays resident beside it
  assert update.argument == pytest.approx(3 * 4 * student / 8, rel=0.1)
  assert update.resident == pytest.approx(2 * teacher / 8, rel=0.05)
  assert plan.step_flops > 6 * student * 64 * 50 * 2560  # at least 6 N x the tokens trained
  assert "fits" in plan.table() and "v5e:2x4" in plan.table()


def test_command_line_says_what_is_wrong_in_one_line():
  import subprocess
  import sys
  base = [sys.executable, "-m", "atod_jax.scaling", f"--config={ROOT}/configs/alfworld_qwen3.py"]
  proc = subprocess.run(base + ["--target=v9:2x2", "--student=qwen3-0.6b",
                                "--teacher=qwen3-4b"], capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 2 and "error: unknown target 'v9:2x2'" in proc.stderr
  proc = subprocess.run(base + ["--target=v5e:2x4"], capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 2 and "error: name the models: --student / --teacher" in proc.stderr


@needs_libtpu
def test_moe_layers_gather_their_experts_one_layer_at_a_time_on_tpu():
  """A MoE forward routed per device (each device's rows, every expert gathered to it)
  compiled for v5e:2x4: the temporaries hold about one layer's experts at a time, not
  every layer's. Before the gathers were tied to each layer's input the TPU compiler
  overlapped all 8 layers' gathers here (2,399 MiB against 288 MiB a layer; with the
  tie: 302), and a 30B-A3B teacher's scoring asked for over 16 GiB a v5e chip."""
  cfg = ModelConfig(vocab_size=1024, hidden_size=1024, num_layers=8, num_heads=4,
                    num_kv_heads=2, head_dim=128, intermediate_size=1024,
                    model_type="qwen3_moe", num_experts=64, num_experts_per_tok=8,
                    moe_intermediate_size=768, dtype="bfloat16", param_dtype="bfloat16")
  _, devices = pl.topology("v5e:2x4")
  mesh = pl.make_mesh(1, 8, 1, devices=devices)
  # the tests' "highest" f32 precision is not a bf16 TPU kernel's (Mosaic refuses it)
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
      jax.default_matmul_precision("default"):
    graphdef, params = pl._params(cfg, mesh)
    tokens = pl._batched(jax.ShapeDtypeStruct((8, 256), jnp.int32), mesh)  # a row a chip
    fn = jax.jit(lambda p, x: nnx.merge(graphdef, p).hidden_states(x)[0])
    temps = fn.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes
  layer_experts = 3 * 64 * 1024 * 768 * 2  # gate, up and down of one layer, bf16, whole
  assert temps < 2 * layer_experts, (temps / 2**20, layer_experts / 2**20)


@needs_libtpu
def test_offloaded_teacher_scores_from_host_memory_on_tpu():
  """``teacher.offload``: the teacher's weights are arguments in the chips' host memory
  (the TPU compiler counts them there, not in HBM), the scoring compiled for v5e:2x4
  copies one layer at a time (its temporaries hold about a layer's weights, not the
  model's), and the plan counts the teacher as resident nowhere on the chip."""
  cfg = ModelConfig(vocab_size=1024, hidden_size=1024, num_layers=8, num_heads=8,
                    num_kv_heads=4, head_dim=128, intermediate_size=4096,
                    dtype="bfloat16", param_dtype="bfloat16")
  _, devices = pl.topology("v5e:2x4")
  mesh = pl.make_mesh(1, 8, 1, devices=devices)
  from atod_jax.rollout.host import TextRollout
  from atod_jax.train import steps
  spec = TextRollout(2, 96, 32, 0, layout="window", history=2)
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
      jax.default_matmul_precision("default"):
    batch = pl._batched(pl._trajectory(16, spec), mesh)
    memory = {}
    for kind in (None, "pinned_host"):
      graphdef, params = pl._params(cfg, mesh, kind)
      memory[kind] = pl._compile(steps.jit_score, graphdef, params, batch, temperature=1.0,
                                 chunks=2, rows=steps.rows_sharding(mesh)).memory_analysis()
  weights = pl._bytes_per_chip(params, "pinned_host")
  assert weights == pytest.approx(cfg.num_params() * 2 / 8, rel=0.01)
  assert pl._bytes_per_chip(params) == 0
  on_chip, offloaded = memory[None], memory["pinned_host"]
  assert offloaded.host_argument_size_in_bytes == weights
  assert on_chip.host_argument_size_in_bytes == 0
  assert on_chip.argument_size_in_bytes - offloaded.argument_size_in_bytes == weights
  # one layer's weights, whole (gathered): 30 MiB; the model's: 8 layers and the embedding
  # (measured 2026-12-02: 30.3 MiB of temporaries offloaded, 59.8 on the chip)
  layer = (cfg.num_params() - cfg.vocab_size * cfg.hidden_size) / cfg.num_layers * 2
  assert offloaded.temp_size_in_bytes < 2 * layer < cfg.num_params() * 2 / 4, (
      offloaded.temp_size_in_bytes / 2**20, layer / 2**20)
