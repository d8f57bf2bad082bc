"""The plan's functions run for real (atod_jax.scaling.measure): on the 8 CPU devices, every
function of a text environment's step runs on arguments made from the plan's sharded
shapes, with the plan's worst case (every answer all its tokens) and a valid batch."""
import jax
import numpy as np
import pytest

from atod_jax.models import ModelConfig
from atod_jax.train import defaults as d
from atod_jax.scaling import measure as ms
from atod_jax.scaling import plan as pl
from tests.train import tiny_config


def _config():
  c = d.tiny_text_run("textworld", max_turns=2, train_split="train", eval_split="heldout",
                      prompt_len=16, response_len=4, obs_len=8, vocab=64)
  c.rollout.update(tasks_per_step=2, group_size=4)
  c.env.eval_batch = 8
  c.student.model = d.tiny_model(32, 1, 2, 64, vocab=64)
  c.teacher.model = d.tiny_model(32, 2, 2, 64, vocab=64)
  return c


@pytest.mark.long
def test_every_function_of_the_step_runs_on_the_plans_arguments():
  c = _config()
  kept = {}
  s_cfg, t_cfg = ModelConfig(**c.student.model), ModelConfig(**c.teacher.model)
  result = ms.measure(c, student=s_cfg, teacher=t_cfg, data=2, fsdp=4, repeats=1,
                      keep=lambda name, out: kept.__setitem__(name, out))
  names = ["rollout/prefill", "rollout/decode", "rollout/append", "score/teacher",
           "update"]
  assert [r.name for r in result.rows] == names
  assert [r.calls for r in result.rows] == [1, 2, 1, 1, 1]  # context layout, 2 turns
  assert result.devices == 8 and result.mesh == {"data": 2, "fsdp": 4, "tensor": 1}
  # the decode ran the worst case: no row stopped, 8 rows x 4 tokens
  out = kept["rollout/decode"]
  np.testing.assert_array_equal(np.asarray(out.lengths), 4)
  assert bool(np.asarray(out.valid).all()) and result.row("rollout/decode").tokens == 32
  assert np.asarray(out.tokens).min() >= 0 and np.asarray(out.tokens).max() < 64
  # a row: the prompt, two answers and their observations (40 tokens), in a cache of
  # 128 slots (rounded up); each of the 4 tokens attends to every slot
  length, slots = 16 + 2 * (4 + 8), 128
  assert result.row("rollout/decode").flops == 4 * pl.forward_flops(s_cfg, 8, 8 * slots, 8)
  # the teacher scored every token but the first of a full batch; its weights are small
  # random numbers (0.02), so every token's log-prob is near the uniform one, -log 64
  logp = np.asarray(kept["score/teacher"])
  assert logp.shape == (8, length) and (logp[:, 0] == 0).all()
  np.testing.assert_allclose(logp[:, 1:], -np.log(64), atol=0.05)
  # the update ran on a valid batch from a fresh state (random weights, optimizer state
  # zero): its metrics are finite (random optimizer moments gave NaN), its counter moved
  state, metrics = kept["update"]
  assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(metrics))
  assert float(metrics["grad_norm"]) > 0 and int(np.asarray(state.step)) == 1
  for r in result.rows:  # the decode's bound may be its reads of weights and cache
    assert r.seconds > 0 and r.compile_seconds > 0
    compute = r.flops / (8 * result.chip.peak_flops)
    assert r.bound >= compute if r.name == "rollout/decode" else r.bound == compute
  table = result.table()
  assert all(f"| {n} |" in table for n in names) and "generated tokens/s" in table


def test_a_device_environment_is_refused_in_one_line():
  with pytest.raises(pl.PlanError, match="rolls out on the device"):
    ms.measure(tiny_config.shipped("quickstart"), student="qwen3-0.6b", teacher="qwen3-4b")
