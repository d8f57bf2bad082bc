"""ScienceWorld (its Java simulator): gold paths reach score 100, the splits, invalid
actions, the pool and the dataset."""
import functools
import shutil

import numpy as np
import pytest

pytest.importorskip("scienceworld")
pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="ScienceWorld needs Java")

from atod_jax.envs import scienceworld as sw  # noqa: E402
from tests.envs.real_env_checks import check_demonstrations, check_pool  # noqa: E402

TASKS = ("find-living-thing", "boil", "use-thermometer", "grow-plant")


@pytest.fixture(scope="module")
def env():
  e = sw.ScienceWorldEnv(tasks=TASKS, max_variations=3)
  yield e
  e.close()


@pytest.mark.long
def test_gold_paths_reach_score_100(env):
  pairs = env.variations("test")
  ids = [next(i for i, (t, _) in enumerate(pairs) if t == task) for task in TASKS]
  batch = env.reset("test", ids)
  scores = np.zeros(len(ids))
  while not batch.dones.all():
    live = ~batch.dones
    batch = env.step([None if d else e for d, e in zip(batch.dones, batch.expert)])
    for i in np.flatnonzero(live):
      scores[i] = batch.infos[i]["score"]
  np.testing.assert_array_equal(scores, 100)
  assert batch.wons.all()


def test_splits_are_disjoint_variations(env):
  train, test = env.variations("train"), env.variations("test")
  assert len(train) == len(test) == 3 * len(TASKS)
  assert not set(train) & set(test)
  with pytest.raises(ValueError, match="split must be one of"):
    env.variations("valid")
  with pytest.raises(ValueError, match="unknown ScienceWorld tasks"):
    sw.ScienceWorldEnv(tasks=("time-travel",))


def test_invalid_action_and_leaving_the_gold_path(env):
  batch = env.reset("train", [0])
  assert batch.admissible[0] and batch.expert[0]
  batch = env.step(["sing a song"])
  assert batch.infos[0]["invalid"] and batch.observations[0] == sw.UNKNOWN_ACTION
  assert batch.expert[0] is None and not batch.dones[0]


@pytest.mark.long
def test_through_the_pool_and_into_the_dataset(env, tmp_path):
  factory = functools.partial(sw.scienceworld_env, tasks=TASKS[:1], max_variations=4)
  check_pool(factory, "train", [0, 1, 2, 3])
  check_demonstrations(env, "train", [0, 1], tmp_path, "scienceworld")
