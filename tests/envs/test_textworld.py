"""TextWorld on games generated here with tw-make: the expert wins, the banner and the
status line are gone, games are cached by seed, the pool and the dataset."""
import functools
import os

import pytest

pytest.importorskip("textworld")

from atod_jax.envs import textgames as tg  # noqa: E402
from tests.envs.real_env_checks import check_demonstrations, check_pool, play_expert  # noqa: E402

CUSTOM = ("custom", ("--world-size", "2", "--nb-objects", "4", "--quest-length", "2"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tw_games"))


def test_banner_and_status_line_are_stripped():
  raw = ("\n\n   ________  __\n  |        \\|  \\\n   \\$$$$$$$$| $$\n\nYou are hungry!\n\n"
         "-= Kitchen =-\nYou see a fridge.\n\n>                 -= Kitchen =-0/3")
  assert tg.strip_textworld(raw) == "You are hungry!\n\n-= Kitchen =-\nYou see a fridge."
  end = ("You eat the meal.\n\n  *** The End ***\n\nYou scored 3 out of a possible 3.\n\n"
         "Would you like to RESTART, RESTORE a saved game, QUIT or UNDO the last command?\n> ")
  assert tg.strip_textworld(end) == ("You eat the meal.\n\n  *** The End ***\n\n"
                                     "You scored 3 out of a possible 3.")


@pytest.mark.long
def test_expert_wins_fresh_cooking_and_custom_games(cache):
  for kind, options in (tg.COOKING, CUSTOM):
    env = tg.TextWorldEnv(kind, options, cache_dir=cache,
                          splits={"train": [11, 12], "heldout": [900]})
    first, wons, total = play_expert(env, "train", [0, 1])
    assert wons.all() and (total == 1.0).all()
    assert all("$$" not in o and o.strip() for o in first)
    env.close()
  made = sorted(os.listdir(os.path.join(cache, os.listdir(cache)[0])))
  assert [m for m in made if m.endswith(".z8")] == ["seed11.z8", "seed12.z8"]


def test_invalid_action_and_a_cached_game_is_not_made_again(cache):
  env = tg.TextWorldEnv(cache_dir=cache, splits={"train": [11]})
  path = env.game_files("train")[0]
  mtime = os.path.getmtime(path)
  batch = env.reset("train", [0])
  assert os.path.getmtime(path) == mtime
  batch = env.step(["dance with the fridge"])
  assert batch.infos[0]["invalid"] and not batch.dones[0] and batch.rewards[0] == 0
  # control characters (a learning policy's garbage) made Frotz hang: they are dropped
  batch = env.step(["\x0e\x1b[2Jlook\x00 \ufffd"])
  assert batch.infos[0]["invalid"] and not batch.dones[0] and batch.observations[0]
  assert batch.infos[0]["max_score"] >= 1
  env.close()


@pytest.mark.long
def test_through_the_pool_and_into_the_dataset(cache, tmp_path):
  splits = {"train": [21, 22, 23, 24]}
  local = tg.TextWorldEnv(cache_dir=cache, splits=splits)
  check_pool(functools.partial(tg.textworld_env, cache_dir=cache, splits=splits), "train",
             [0, 1, 2, 3], local=local)
  check_demonstrations(local, "train", [0, 1], tmp_path, "textworld-cooking")
  local.close()
