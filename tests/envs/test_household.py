"""The on-device household task family: jit/vmap, expert, splits, text protocol, bad outputs."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atod_jax.envs import household as hh
from atod_jax.envs.household_text import HouseholdTextEnv, task_key

PRESETS = ("easy", "medium", "hard", "long")


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _rollout(params, keys, split, policy):
  """Runs ``policy`` ('expert' or 'random') for max_turns on every task; returns won."""
  states = jax.vmap(lambda k: hh.reset(params, k, split))(keys)

  def turn(carry, key):
    st = carry
    if policy == "expert":
      actions = jax.vmap(hh.expert_action)(st)
    else:  # uniform over the admissible commands
      toks, ok = jax.vmap(lambda s: hh.admissible(params, s))(st)
      pick = jax.random.categorical(key, jnp.where(ok, 0.0, -jnp.inf), axis=-1)
      pick = jnp.where(jnp.any(ok, -1), pick, 0)
      actions = jnp.take_along_axis(toks, pick[:, None, None], axis=1)[:, 0]
    st, out = jax.vmap(lambda s, a: hh.step(params, s, a))(st, actions)
    return st, out.reward

  final, rewards = jax.lax.scan(turn, states, jax.random.split(jax.random.key(9), params.max_turns))
  return final.won, jnp.sum(rewards, axis=0), final.turn


@pytest.mark.parametrize("preset", PRESETS)
def test_expert_solves_heldout_tasks(preset):
  params = hh.HouseholdParams.preset(preset)
  keys = jax.vmap(lambda i: task_key(1, i))(jnp.arange(256))
  won, ret, turns = _rollout(params, keys, "heldout", "expert")
  rate = float(jnp.mean(won))
  print(f"\n{preset}: expert success on 256 held-out tasks {rate:.1%}, "
        f"mean turns {float(jnp.mean(turns)):.1f}")
  assert rate == 1.0
  np.testing.assert_array_equal(ret, won.astype(np.float32))  # reward 1 exactly once


@pytest.mark.parametrize("preset", PRESETS)
def test_random_policy_rarely_succeeds(preset):
  params = hh.HouseholdParams.preset(preset)
  keys = jax.vmap(lambda i: task_key(2, i))(jnp.arange(256))
  won, _, _ = _rollout(params, keys, "train", "random")
  rate = float(jnp.mean(won))
  print(f"\n{preset}: random admissible policy success {rate:.1%} (256 tasks, "
        f"{params.max_turns} turns)")
  assert rate < 0.1


@pytest.mark.long
def test_long_preset_needs_long_episodes():
  # three objects to treat and put away: every expert episode takes 15+ turns (the
  # other presets' take 4-9), and the task says how many
  params = hh.HouseholdParams.preset("long")
  keys = jax.vmap(lambda i: task_key(3, i))(jnp.arange(256))
  won, _, turns = _rollout(params, keys, "train", "expert")
  assert bool(jnp.all(won)) and int(jnp.min(turns)) >= 15
  obs = hh.observe(params, hh.reset(params, keys[0], "train"), hh.initial_event())
  task = hh.decode(obs).split("your task is to:")[1].strip()
  assert task.startswith("put 3 ") and task.split()[2] in ("clean", "hot", "cool"), task
  with pytest.raises(ValueError, match="goal_count"):
    hh.HouseholdParams(num_objects=2, goal_count=3)


def test_splits_are_disjoint():
  train = {tuple(c) for c in hh._goal_combos("train")}
  held = {tuple(c) for c in hh._goal_combos("heldout")}
  assert train and held and not train & held
  assert 0.1 < len(held) / (len(train) + len(held)) < 0.3
  params = hh.HouseholdParams.preset("hard")
  for split, allowed in (("train", train), ("heldout", held)):
    goals = jax.vmap(lambda i: hh.reset(params, task_key(0, i), split).goal)(jnp.arange(500))
    assert {tuple(g) for g in np.asarray(goals).tolist()} <= allowed


def test_reset_is_deterministic_and_valid():
  params = hh.HouseholdParams.preset("hard")
  a = hh.reset(params, task_key(3, 17), "train")
  b = hh.reset(params, task_key(3, 17), "train")
  jax.tree.map(np.testing.assert_array_equal, a, b)
  st = jax.vmap(lambda i: hh.reset(params, task_key(3, i), "train"))(jnp.arange(300))
  assert np.all(np.sum(np.asarray(st.rec_type) >= 0, 1) == params.num_receptacles)
  assert np.all(np.sum(np.asarray(st.obj_type) >= 0, 1) == params.num_objects)
  # the goal object exists and no object starts inside a receptacle of the goal type
  loc_type = np.take_along_axis(np.asarray(st.rec_type), np.maximum(np.asarray(st.obj_loc), 0), 1)
  present = np.asarray(st.obj_type) >= 0
  assert np.all(np.any(np.asarray(st.obj_type) == np.asarray(st.goal)[:, 1:2], 1))
  assert not np.any(present & (loc_type == np.asarray(st.goal)[:, 2:3]))


@pytest.mark.long
def test_text_protocol_matches_on_device():
  """Same tasks, same commands (the expert's, then scripted invalid ones): same episode."""
  params = hh.HouseholdParams.preset("medium")
  ids = list(range(8))
  env = HouseholdTextEnv(params, seed=5)
  batch = env.reset("heldout", ids)
  step_v = jax.jit(jax.vmap(functools.partial(hh.step, params)))
  observe_v = jax.jit(jax.vmap(functools.partial(hh.observe, params)))
  states = jax.vmap(lambda i: hh.reset(params, task_key(5, i), "heldout"))(jnp.asarray(ids))
  obs = observe_v(states, jnp.tile(hh.initial_event(), (len(ids), 1)))
  assert batch.observations == [hh.decode(t) for t in np.asarray(obs)]
  script = ["open fridge 1", "take mug 1 from nowhere", "", "look", "inventory"]
  for turn in range(params.max_turns):
    actions = [script[turn % 5] if (turn + i) % 3 == 0 else batch.expert[i] or ""
               for i in range(8)]
    batch = env.step(actions)
    toks = jnp.asarray(np.stack([hh.encode_action(a) for a in actions]))
    states, out = step_v(states, toks)
    obs = observe_v(states, out.event)
    assert batch.observations == [hh.decode(t) for t in np.asarray(obs)]
    np.testing.assert_array_equal(batch.rewards, out.reward)
    np.testing.assert_array_equal(batch.dones, out.done)
    np.testing.assert_array_equal(batch.wons, out.won)
  assert batch.dones.all()


def test_admissible_commands_all_act_and_expert_is_admissible():
  params = hh.HouseholdParams.preset("medium")
  env = HouseholdTextEnv(params, seed=6)
  batch = env.reset("train", [0, 1, 2, 3])
  for _ in range(6):
    for i in range(4):
      if not batch.dones[i]:
        assert batch.expert[i] in batch.admissible[i]
        assert "look" in batch.admissible[i] and "inventory" in batch.admissible[i]
    batch = env.step(batch.expert)
  # every admissible command is valid (no "Nothing happens")
  batch = env.reset("train", [7])
  for cmd in batch.admissible[0]:
    env.reset("train", [7])
    out = env.step([cmd])
    assert not out.infos[0]["invalid"], cmd


def test_bad_model_outputs_never_crash_and_are_invalid_turns():
  """Malformed answers parse to a reason, never an exception; the shared policy
  (``envs.agent``) turns them and the env's own invalid commands into penalised turns."""
  from atod_jax.envs.agent import invalid_turns, turn_rewards
  from atod_jax.envs.prompts import extract_action
  env = HouseholdTextEnv(hh.HouseholdParams.preset("easy"), seed=0)
  outputs = [
      "",  # empty
      "x" * 10_000,  # 10k characters
      b"\xff\xfe<think>hm</think><action>\xc3(</action>",  # invalid UTF-8
      "<think>I will look</think> look",  # no action tag
      "<think>a</think><action>look</action><action>inventory</action>",  # two tags
      "<action>look</action>",  # no think
      "<think>ok</think><action>" + "go " * 200 + "</action>",  # over-long action
      "<think>fine</think><action>Look</action>",  # well-formed
  ]
  env.reset("train", list(range(len(outputs))))
  parsed = [extract_action(o) for o in outputs]
  # the invalid UTF-8 one is well-formed around a garbled command: the env rejects it
  assert [p.ok for p in parsed] == [False, False, True, False, False, False, False, True]
  assert "no <action>" in parsed[3].reason and "2 <action> tags" in parsed[4].reason
  batch = env.step([p.action if p.ok else "" for p in parsed])
  assert batch.observations[2] == "Nothing happens."
  assert batch.observations[7].startswith("You are in the middle of a room")
  live = np.ones(len(outputs), bool)
  live[0] = False  # a finished episode earns nothing, whatever it answered
  flagged = np.array([bool(x.get("invalid", False)) for x in batch.infos])
  invalid = invalid_turns(live, np.array([not p.ok for p in parsed]), flagged)
  assert invalid.tolist() == [False] + [True] * 6 + [False]
  np.testing.assert_allclose(turn_rewards(batch.rewards, live, invalid, 0.5),
                             [0.0] + [-0.5] * 6 + [0.0])


def test_encode_action_roundtrip_and_unknown_words():
  for cmd in ("go to cabinet 2", "take mug 1 from countertop 1", "put mug 1 in/on cabinet 2",
              "clean mug 1 with sinkbasin 1", "look", "inventory", "examine drawer 1"):
    assert hh.decode(hh.encode_action(cmd)).lower() == cmd
  assert hh.decode(hh.encode_action("put mug 1 in cabinet 2")).lower() == "put mug 1 in/on cabinet 2"
  assert hh.WORD_ID["<unk>"] in hh.encode_action("fly to the moon")


def test_searching_planner_acts_only_on_what_was_seen():
  """Moving a goal object between receptacles the agent has not looked into changes the
  privileged planner's first move on some tasks and the searching planner's on none;
  the searching planner still solves every long task within its turns."""
  params = hh.HouseholdParams.preset("long")
  assert params.expert == "searching"
  keys = jax.vmap(lambda i: task_key(4, i))(jnp.arange(128))
  states = jax.vmap(lambda k: hh.reset(params, k, "train"))(keys)

  def hidden_move(st):  # the first goal object to the other end of the searchable slots
    ok = hh.start_receptacles(st.rec_type, st.goal[2])
    last = hh.R_MAX - 1 - jnp.argmax(ok[::-1])
    first = jnp.argmax(ok)
    dest = jnp.where(st.obj_loc[0] == last, first, last)
    return st._replace(obj_loc=st.obj_loc.at[0].set(dest))

  moved = jax.vmap(hidden_move)(states)
  assert np.any(np.asarray(moved.obj_loc) != np.asarray(states.obj_loc))
  for search, same in ((True, True), (False, False)):
    a = np.asarray(jax.vmap(lambda s: hh.expert_action(s, search))(states))
    b = np.asarray(jax.vmap(lambda s: hh.expert_action(s, search))(moved))
    assert np.all(a == b) == same

  @jax.jit
  def play(st):
    def turn(st, _):
      st, out = jax.vmap(lambda s: hh.step(params, s, hh.expert_action(s, True)))(st)
      return st, out.invalid
    return jax.lax.scan(turn, st, None, length=params.max_turns)

  final, invalid = play(states)
  turns = np.asarray(final.turn)
  assert bool(jnp.all(final.won)) and not bool(jnp.any(invalid))
  assert turns.min() >= 15 and turns.max() <= params.max_turns
  # it looked into receptacles before taking from them: more turns than the privileged plan
  won_p, _, turns_p = _rollout(params, keys, "train", "expert")
  assert bool(jnp.all(won_p)) and turns.mean() > float(jnp.mean(turns_p))
  with pytest.raises(ValueError, match="expert"):
    hh.HouseholdParams(expert="oracle")


def test_regime_planner_fails_exactly_the_task_type_it_skips():
  """The ``regime`` preset's planner never cools: it solves every pick / clean / heat task
  of both splits and no cool task (it puts the object away warm, and the reward does not
  accept it); the same planner without the skip solves them all."""
  params = hh.HouseholdParams.preset("regime")
  assert params.expert_skips == ("cool",) and params.skip_ids == (3,)
  keys = jax.vmap(lambda i: task_key(5, i))(jnp.arange(256))
  for split in ("train", "heldout"):
    states = jax.vmap(lambda k: hh.reset(params, k, split))(keys)
    cool = np.asarray(states.goal[:, 0]) == hh.TASK_TYPES.index("cool")
    assert 0.1 < cool.mean() < 0.4

    @functools.partial(jax.jit, static_argnums=1)
    def play(st, skips):
      def turn(st, _):
        st, out = jax.vmap(lambda s: hh.step(params, s, hh.expert_action(s, True, skips)))(st)
        return st, out.reward
      return jax.lax.scan(turn, st, None, length=params.max_turns)[0]

    flawed = np.asarray(play(states, params.skip_ids).won)
    assert flawed[~cool].all() and not flawed[cool].any()
    assert np.asarray(play(states, ()).won).all()
  with pytest.raises(ValueError, match="expert_skips"):
    hh.HouseholdParams(expert_skips=("pick",))
