"""A built teacher's optional GRPO phase: it trains on its own rollouts with the sparse
reward only, is recorded in the cache and changes the cached teacher."""
import json
import os

import jax
import numpy as np
import pytest

from atod_jax.models.sharding import make_mesh
from atod_jax.train import teacher as tch
from atod_jax.train.sources.device import DeviceSource
from tests.train import tiny_config


@pytest.mark.slow  # ~2.5 min: a clone good enough to mix wins and losses (pytest -m slow)
def test_grpo_phase_after_behaviour_cloning(tmp_path):
  config = tiny_config.get_config()
  # a clone good enough that groups of rollouts mix wins and losses (else GRPO's group
  # advantages, hence its updates, are all zero)
  config.teacher.model.update(hidden_size=64, head_dim=32, intermediate_size=192)
  config.teacher.build.update(demo_episodes=64, sft_steps=150, batch_size=32,
                              select_every=0)  # the last parameters: GRPO's own effect
  config.rollout.update(tasks_per_step=4, group_size=4)
  tasks = DeviceSource(config, make_mesh(-1, 1, 1))
  g0, p0, _, info0 = tch.get_teacher(config, tasks, str(tmp_path / "bc"), say=lambda *a: None)
  assert info0["grpo_steps"] == 0 and info0["grpo_success"] == []
  config.teacher.build.grpo_steps = 2
  g1, p1, _, info1 = tch.get_teacher(config, tasks, str(tmp_path / "grpo"), say=lambda *a: None)
  assert info1["grpo_steps"] == 2 and len(info1["grpo_success"]) == 2
  # at least one step mixed wins and losses (else every group advantage is 0 and the
  # parameters could not move: checked next); which steps do depends on the task draws
  assert any(0.0 < s < 1.0 for s in info1["grpo_success"]), info1["grpo_success"]
  # same behaviour-cloning start, then the GRPO updates moved the parameters
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)))
  with open(os.path.join(tmp_path / "grpo" / "teacher", "info.json")) as f:
    assert json.load(f)["fingerprint"]["build"]["grpo_steps"] == 2
  # a later run with the same settings reuses it
  _, p2, _, _ = tch.get_teacher(config, tasks, str(tmp_path / "grpo"), say=lambda *a: None)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_build_keeps_the_parameters_that_score_best(tmp_path, monkeypatch):
  """Behaviour cloning offers its parameters to the selector every step; the ones scored
  best (here by a scripted score: step 2 of 3) are what the build keeps and caches, not
  the last step's; the history is recorded in the teacher's info."""
  config = tiny_config.get_config()
  config.teacher.build.update(sft_steps=3, select_every=1, select_episodes=4)
  source = DeviceSource(config, make_mesh(-1, 1, 1))
  scores, offered = iter([0.25, 0.75, 0.5]), []

  def scripted(graphdef, params, **kw):
    assert kw["split"] == "train" and kw["episodes"] == 4  # new tasks of the train goals
    offered.append(jax.tree.map(np.array, params))
    return {"success": next(scores)}

  monkeypatch.setattr(source, "evaluate", scripted)
  _, kept, _, info = tch.get_teacher(config, source, str(tmp_path), say=lambda *a: None)
  assert info["selection"]["chosen"] == {"phase": "sft", "step": 2, "success": 0.75}
  assert [list(h) for h in info["selection"]["history"]] == [
      ["sft", 1, 0.25], ["sft", 2, 0.75], ["sft", 3, 0.5]]
  for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(offered[1])):
    np.testing.assert_array_equal(np.asarray(a), b)
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(offered[1]),
                                                   jax.tree.leaves(offered[2])))
  # the cached copy is the kept one
  _, cached, _, _ = tch.get_teacher(config, source, str(tmp_path), say=lambda *a: None)
  for a, b in zip(jax.tree.leaves(cached), jax.tree.leaves(kept)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
