"""Expert demonstrations round-trip through TFDS (array_record) without TensorFlow."""
import importlib.util

import numpy as np
import pytest

from atod_jax.data.demos import (
    build_demonstrations, collect_expert_episodes, decode_episode, load_demonstrations)
from atod_jax.envs import household as hh
from atod_jax.envs.household_text import HouseholdTextEnv


@pytest.mark.long
def test_demonstrations_roundtrip_without_tensorflow(tmp_path):
  assert importlib.util.find_spec("tensorflow") is None  # the point of array_record
  env = HouseholdTextEnv(hh.HouseholdParams.preset("medium"), seed=4, with_admissible=False)
  episodes = list(collect_expert_episodes(env, "train", range(13), batch_size=5))
  episodes += list(collect_expert_episodes(env, "heldout", range(4)))
  assert all(ep["won"] for ep in episodes)  # the expert's demonstrations succeed
  path = build_demonstrations(episodes, tmp_path, "household-medium")
  assert any(p.suffix.startswith(".array_record") or ".array_record" in p.name
             for p in (tmp_path / "demonstrations" / "household-medium" / "1.0.0").iterdir())
  for split, count in (("train", 13), ("heldout", 4)):
    src = load_demonstrations(tmp_path, "household-medium", split)
    assert len(src) == count
    got = {r["task_id"]: r for r in (decode_episode(src[i]) for i in range(len(src)))}
    want = {ep["task_id"]: ep for ep in episodes if ep["split"] == split}
    assert got.keys() == want.keys()
    for tid, ep in want.items():
      g = got[tid]
      assert g["task"] == ep["task"] and g["won"] == ep["won"] and g["split"] == split
      assert g["observations"] == ep["observations"] and g["actions"] == ep["actions"]
      np.testing.assert_array_equal(g["rewards"], ep["rewards"])
      assert len(g["observations"]) == len(g["actions"]) + 1
  assert str(path).endswith("1.0.0")
