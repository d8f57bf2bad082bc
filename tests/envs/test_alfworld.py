"""ALFWorld on the real games of the shared data: the planner expert wins every task
type, invalid actions, re-planning, per-type results, the pool and the dataset."""
import functools
import os

import pytest

pytest.importorskip("alfworld")

from atod_jax.envs import textgames as tg  # noqa: E402
from tests.envs.real_env_checks import check_demonstrations, check_pool, play_expert  # noqa: E402

DATA = tg.alfworld_data_dir()
pytestmark = pytest.mark.skipif(not os.path.isdir(DATA),
                                reason=f"ALFWorld games not found at {DATA}")


@pytest.fixture(scope="module")
def env():
  e = tg.AlfWorldEnv()
  yield e
  e.close()


def test_splits_and_task_types(env):
  assert {s: len(env.game_files(s)) for s in env.splits} == {
      "valid_seen": 140, "valid_train": 200, "valid_unseen": 134}
  counts = {t: env.task_types("valid_seen").count(t) for t in tg.ALFWORLD_TASK_TYPES.values()}
  # the per-type counts of valid_seen that ALFWorld papers report
  assert counts == {"pick": 35, "look": 13, "clean": 27, "heat": 16, "cool": 25, "pick2": 24}
  with pytest.raises(ValueError, match="split must be one of"):
    env.game_files("train_full")
  with pytest.raises(FileNotFoundError, match="ALFWORLD_DATA"):
    tg.AlfWorldEnv(data_dir="/nonexistent/json_2.1.1")


@pytest.mark.long
def test_planner_expert_wins_one_game_of_each_type(env):
  types = env.task_types("valid_unseen")
  ids = [types.index(t) for t in tg.ALFWORLD_TASK_TYPES.values()]
  first, wons, total = play_expert(env, "valid_unseen", ids)
  assert wons.all() and (total == 1.0).all()
  assert all(not o.startswith("-= Welcome") and "Your task is to:" in o for o in first)
  table = tg.success_by_type([types[i] for i in ids], wons)
  assert table == {**{t: (1.0, 1) for t in tg.ALFWORLD_TASK_TYPES.values()}, "all": (1.0, 6)}


def test_invalid_action_and_replanning(env):
  env.replan = True
  batch = env.reset("valid_seen", [0])
  assert "help" not in batch.admissible[0] and "look" in batch.admissible[0]
  batch = env.step(["fly to the moon"])
  assert batch.infos[0]["invalid"] and batch.observations[0] == "Nothing happens."
  assert batch.rewards[0] == 0 and not batch.dones[0]
  # leave the plan on purpose: the expert re-plans from where the agent is
  detour = next(a for a in batch.admissible[0] if a.startswith("go to") and a != batch.expert[0])
  batch = env.step([detour])
  assert not batch.infos[0]["invalid"] and batch.expert[0] is not None
  while not batch.dones[0]:
    batch = env.step(batch.expert)
  assert batch.wons[0] and batch.infos[0]["task_type"] == "look"
  env.replan = False
  batch = env.reset("valid_seen", [0])
  batch = env.step([detour])
  assert batch.expert[0] is None  # off the plan, no re-planning: no expert command


def test_turn_limit():
  env = tg.AlfWorldEnv(max_turns=3)
  batch = env.reset("valid_train", [5])
  for turn in range(3):
    assert not batch.dones[0]
    batch = env.step(["look"])
  assert batch.dones[0] and not batch.wons[0]
  env.close()


@pytest.mark.long
def test_through_the_pool_and_into_the_dataset(env, tmp_path):
  looks = [i for i, t in enumerate(env.task_types("valid_train")) if t == "look"]  # short plans
  check_pool(functools.partial(tg.alfworld_env), "valid_train", looks[:4], local=env)
  check_demonstrations(env, "valid_train", looks[4:6], tmp_path, "alfworld")
