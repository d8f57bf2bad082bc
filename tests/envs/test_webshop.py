"""WebShop on the real 1k product, instruction and goal files: the scripted buyer earns
1.0, a wrong product or wrong options earn less (reward worked by hand), the pages and
actions, the pool and the dataset."""
import functools
import os

import numpy as np
import pytest

pytest.importorskip("bm25s")
pytest.importorskip("rapidfuzz")

from atod_jax.envs import webshop as ws  # noqa: E402
from tests.envs.real_env_checks import check_demonstrations, check_pool, play_expert  # noqa: E402

DATA = ws.webshop_data_dir()
pytestmark = pytest.mark.skipif(not os.path.isdir(DATA), reason=f"WebShop data not found at {DATA}")


@pytest.fixture(scope="module")
def env():
  return ws.WebShopEnv(ws.load_catalogue())


def test_goals_and_splits(env):
  # 415 products with an instruction, one goal per option combination: 6,910 goals
  assert env.splits == {"test": 500, "eval": 1000, "train": 5410, "human": 13}
  assert len(env.catalogue.products) == 1000


def test_scripted_buyer_earns_one_on_sampled_goals(env):
  rng = np.random.default_rng(0)
  for split in ("train", "test", "human"):
    ids = sorted(rng.choice(env.splits[split], size=min(60, env.splits[split]), replace=False))
    _, wons, total = play_expert(env, split, [int(i) for i in ids])
    assert wons.all() and np.allclose(total, 1.0), split


def test_reward_by_hand():
  product = {"Title": "Acme Red Cotton Shirt", "BulletPoints": ["machine wash"],
             "Description": "", "Attributes": ["machine wash", "classic fit"],
             "query": "shirts", "product_category": "Clothing › Men › Shirts",
             "name": "Acme Red Cotton Shirt"}
  goal = {"attributes": ["machine wash", "long sleeve"], "goal_options": {"size": "large",
          "color": "red"}, "price_upper": 30.0, "query": "shirts",
          "product_category": "Clothing › Men › Shirts", "name": "Acme Red Cotton Shirt"}
  # attributes 1 of 2 (long sleeve is nowhere), options: size exact, colour red -> 2 of 2,
  # price within bound -> (1 + 2 + 1) / (2 + 2 + 1) = 0.8, type match 1
  r, parts = ws.webshop_reward(product, goal, 20.0, {"size": "large", "color": "lava red"})
  assert r == pytest.approx(0.8) and parts["attributes_matched"] == 1 and parts["options_matched"] == 2
  # over the price bound and a wrong size: (1 + 1 + 0) / 5
  r, _ = ws.webshop_reward(product, goal, 31.0, {"size": "small", "color": "red"})
  assert r == pytest.approx(0.4)
  # a product of another type: no content word of the goal's name in common -> 0
  other = dict(product, Title="Garden Hose", name="Garden Hose", query="hoses",
               product_category="Garden › Hoses")
  assert ws.webshop_reward(other, goal, 20.0, {"size": "large"})[0] == 0.0


def test_wrong_product_or_options_earn_less(env):
  goals = env.catalogue.goals["train"]
  i = next(i for i, g in enumerate(goals) if g["goal_options"])
  batch = env.reset("train", [i, i])
  target = goals[i]["asin"]
  # episode 0 follows the buyer to the target's page, episode 1 opens another product
  while env._sessions[0].page != "item":
    batch = env.step([batch.expert[0], batch.expert[1] if env._sessions[1].page == "search"
                      else "click[next >]"])
  other = next(a for a in env.catalogue.search(goals[i]["query"]) if a != target)
  env._sessions[1].page, env._sessions[1].asin = "item", other
  batch = env.step(["click[buy now]", "click[buy now]"])  # buy without choosing options
  assert batch.dones.all() and not batch.wons.any()
  assert batch.infos[0]["purchased"] == target and batch.infos[1]["purchased"] == other
  assert 0.0 < batch.rewards[0] < 1.0 and batch.rewards[1] < 1.0
  assert batch.infos[0]["options"] == {}


def test_pages_and_invalid_actions(env):
  batch = env.reset("human", [0])
  obs = batch.observations[0]
  assert obs.startswith("WebShop [SEP] Instruction: [SEP] ") and obs.endswith("[SEP] Search")
  assert batch.admissible[0] == ["search[<keywords>]"]
  batch = env.step(["click[buy now]"])
  assert batch.infos[0]["invalid"] and not batch.dones[0]
  batch = env.step(["search[shoes]"])
  assert "Page 1 (Total results: " in batch.observations[0]
  assert "click[back to search]" in batch.admissible[0] and "search[<keywords>]" not in batch.admissible[0]
  batch = env.step(["search[again]"])  # no search bar on the results page
  assert batch.infos[0]["invalid"]
  asin = batch.admissible[0][-1]
  batch = env.step([asin])
  assert batch.observations[0].endswith("Reviews [SEP] Buy Now")
  batch = env.step(["click[description]"])
  batch = env.step(["click[< prev]"])
  assert batch.observations[0].endswith("Buy Now")
  with pytest.raises(ValueError, match="split must be one of"):
    env.reset("dev", [0])


def test_turn_limit(env):
  small = ws.WebShopEnv(env.catalogue, max_turns=2)
  batch = small.reset("train", [0])
  batch = small.step(["search[shirt]"])
  assert not batch.dones[0]
  batch = small.step(["click[next >]"])
  assert batch.dones[0] and batch.rewards[0] == 0


def test_through_the_pool_and_into_the_dataset(env, tmp_path):
  check_pool(functools.partial(ws.webshop_env), "test", [0, 1, 2, 3], local=env)
  check_demonstrations(env, "train", [0, 1, 2], tmp_path, "webshop")
