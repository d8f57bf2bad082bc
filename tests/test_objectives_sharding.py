"""Every objective gives the same values with the batch sharded over 8 CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from atod_jax import objectives as obj
from tests.batches import random_batch

B, L, V, G = 16, 33, 24, 4


def _inputs():
  bt = random_batch(5, B, L, num_groups=G)
  rng = np.random.default_rng(5)
  bt["s_logits"] = rng.normal(size=(B, L, V)).astype(np.float32)
  bt["t_logits"] = rng.normal(size=(B, L, V)).astype(np.float32)
  bt["logp"] = np.where(bt["mask"] > 0, bt["logp"], 0.0).astype(np.float32)
  del bt["num_groups"]
  return bt


def _everything(bt, step):
  """All public objective functions, their outputs and the loss gradient."""
  sched = obj.annealing_schedules()
  out = {}
  for est in obj.ESTIMATORS:
    out[f"adv_{est}"] = obj.group_advantages(bt["rewards"], bt["group_ids"], G, est)
  out["opd"] = obj.opd_signal(bt["teacher_logp"], bt["behaviour_logp"], bt["mask"])
  stats = obj.turn_statistics(bt["behaviour_logp"], bt["teacher_logp"], bt["turn_ids"],
                              bt["mask"], max_turns=8)
  out["d"], out["h"] = stats.disagreement, stats.uncertainty
  for mode in obj.MODES:
    out[f"w_{mode}"] = obj.tdur_weights(bt["behaviour_logp"], bt["teacher_logp"],
                                        bt["turn_ids"], bt["mask"], mode)
  adv = obj.atod_advantages(out["opd"], out["w_soft_or"], out["adv_grpo"], bt["mask"],
                            sched.kappa(step), sched.rho(step))
  out["atod_adv"] = adv
  for agg in obj.AGGREGATIONS:
    def loss(lp, agg=agg):
      return obj.clipped_policy_loss(lp, bt["behaviour_logp"], adv, bt["mask"],
                                     clip_eps_high=0.28, dual_clip=3.0, aggregation=agg)
    (out[f"loss_{agg}"], metrics), out[f"grad_{agg}"] = jax.value_and_grad(
        loss, has_aux=True)(bt["logp"])
    out.update({f"{agg}_{k}": v for k, v in metrics.items()})
  for kind in obj.DIVERGENCES:
    def div(s, kind=kind):
      return obj.aggregate_tokens(
          obj.vocab_divergence(s, bt["t_logits"], bt["mask"], kind, chunk_size=8), bt["mask"])
    out[f"div_{kind}"], out[f"div_grad_{kind}"] = jax.value_and_grad(div)(bt["s_logits"])
    out[f"div_tokens_{kind}"] = obj.vocab_divergence(  # the primal (no-gradient) path
        bt["s_logits"], bt["t_logits"], bt["mask"], kind, chunk_size=8)
  return out


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_sharded_batch_matches_single_device(axis_type):
  assert jax.device_count() == 8, "conftest sets 8 host devices"
  bt = _inputs()
  single = jax.jit(_everything)(jax.device_put(bt, jax.devices()[0]), jnp.int32(40))

  mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
  sharded_bt = {k: jax.device_put(v, NamedSharding(mesh, P("data"))) for k, v in bt.items()}
  with jax.set_mesh(mesh):
    sharded = jax.jit(_everything)(sharded_bt, jnp.int32(40))
  assert sharded["opd"].sharding.spec[0] == "data"  # the batch stayed distributed
  for name, value in single.items():
    np.testing.assert_allclose(sharded[name], value, rtol=1e-6, atol=1e-6, err_msg=name)
