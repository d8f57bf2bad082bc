"""The on-device rollout: layout, the expert, and agreement with a full forward pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atod_jax.envs import household as hh
from atod_jax.models import DecoderLM, ModelConfig
from atod_jax.rollout import DeviceRollout, pack, rollout, summarize, trim
from atod_jax.sampling import SamplingParams, token_logprobs

SPEC = DeviceRollout(hh.HouseholdEnv(hh.HouseholdParams.preset("easy")), obs_len=24)
PARAMS = SPEC.env.params
CFG = ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=16, intermediate_size=64, qk_norm=True, dtype="float32")


def _keys(n, seed=0):
  return jax.random.split(jax.random.key(seed), n)


def test_expert_rollout_wins_and_layout_reads_as_the_episode():
  traj = jax.jit(lambda k: rollout(None, SPEC, k, jax.random.key(1), sampling=None))(_keys(16))
  assert np.all(traj.won) and np.all(traj.rewards == 1.0)
  assert traj.tokens.shape == (16, SPEC.length)
  row = 3
  tokens, valid, gen = (np.asarray(x[row]) for x in (traj.tokens, traj.valid, traj.gen_mask))
  turns = np.asarray(traj.turn_ids[row])
  # Replay the episode in Python with the same task: the layout holds its exact text.
  state = hh.reset(PARAMS, _keys(16)[row], "train")
  expected = list(np.asarray(hh.observe(PARAMS, state, hh.initial_event())))
  expected = [t for t in expected if t != hh.PAD]
  for k in range(int(traj.num_turns[row])):
    action = np.asarray(hh.expert_action(state))
    words = [t for t in action if t != hh.PAD]
    assert list(tokens[gen & (turns == k)]) == words + [hh.EOS]
    expected += words + [hh.EOS]
    state, out = hh.step(PARAMS, state, action)
    if not bool(state.done):
      obs = np.asarray(hh.observe(PARAMS, state, out.event))[:SPEC.obs_len]
      expected += [t for t in obs if t != hh.PAD]
  assert list(tokens[valid]) == expected
  assert not np.any(gen & ~valid) and np.all(turns[~gen] == -1)


def test_sampled_rollout_logprobs_equal_a_full_forward_and_survive_packing():
  model = DecoderLM(CFG, nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  run = jax.jit(lambda p, k: rollout(nnx.merge(graphdef, p), SPEC, k, jax.random.key(2),
                                     sampling=SamplingParams(1.0)))
  traj = run(params, _keys(8, 3))
  assert int(jnp.sum(traj.gen_mask)) > 8 * 5
  score = jax.jit(lambda p, t, v: token_logprobs(nnx.merge(graphdef, p), t, v))
  full = score(params, traj.tokens, traj.valid)
  np.testing.assert_allclose(np.where(traj.gen_mask, full, 0), traj.behaviour_logp, atol=2e-5)
  packed = trim(pack(traj))
  assert packed.tokens.shape[1] % 64 == 0 and packed.tokens.shape[1] <= SPEC.length
  np.testing.assert_array_equal(np.sum(packed.gen_mask, 1), np.sum(traj.gen_mask, 1))
  again = score(params, packed.tokens, packed.valid)
  np.testing.assert_allclose(np.where(packed.gen_mask, again, 0), packed.behaviour_logp,
                             atol=2e-5)
  # the turn ids travel with their tokens
  for row in range(8):
    np.testing.assert_array_equal(np.asarray(packed.turn_ids[row])[np.asarray(packed.gen_mask[row])],
                                  np.asarray(traj.turn_ids[row])[np.asarray(traj.gen_mask[row])])
  m = summarize(traj)
  assert 0 <= float(m["success"]) <= 1 and 1 <= float(m["turns"]) <= SPEC.max_turns


def test_malformed_response_is_an_invalid_turn():
  """A response without <eos> in its slots is one unparseable command."""
  from atod_jax.rollout.device import _command
  tokens = jnp.array([[hh.WORD_ID["look"], hh.EOS] + [hh.PAD] * 7,
                      [hh.WORD_ID["look"]] * 9])
  valid = jnp.array([[True, True] + [False] * 7, [True] * 9])
  cmd = np.asarray(_command(SPEC.env, tokens, valid))
  assert list(cmd[0]) == [hh.WORD_ID["look"]] + [hh.PAD] * 7
  assert np.all(cmd[1] == hh.UNK)
  state = hh.reset(PARAMS, jax.random.key(0))
  assert bool(hh.step(PARAMS, state, jnp.asarray(cmd[1]))[1].invalid)
  assert not bool(hh.step(PARAMS, state, jnp.asarray(cmd[0]))[1].invalid)


@pytest.mark.long
def test_expert_noise_keeps_random_commands_in_context_but_not_imitated():
  run = jax.jit(lambda k, noise: rollout(None, SPEC, k, jax.random.key(4), sampling=None,
                                         expert_noise=noise), static_argnums=1)
  clean, noisy = run(_keys(64, 5), 0.0), run(_keys(64, 5), 0.5)
  # every turn's response is in the context; only the expert's own commands are trained
  resp_clean = np.asarray(clean.valid & (clean.turn_ids >= 0))
  assert np.array_equal(resp_clean, np.asarray(clean.gen_mask))
  turns_trained = [len(set(np.asarray(noisy.turn_ids[r])[np.asarray(noisy.gen_mask[r])]))
                   for r in range(64)]
  share = 1 - np.sum(turns_trained) / np.sum(np.asarray(noisy.num_turns))
  assert 0.35 < share < 0.65, share  # about half the turns were random commands
  assert np.all(np.asarray(noisy.gen_mask) <= np.asarray(noisy.valid))
  assert float(jnp.mean(noisy.won)) > 0.5  # the expert recovers from most of them


@pytest.mark.long
def test_turn_rewards_penalties_and_anchor_states():
  """Per-turn rewards sum to the episode's, invalid turns cost the penalty, and the
  anchor key names the state: the rollouts of one task share it on turn 0, and a
  command that changes nothing ("look") keeps it."""
  model = DecoderLM(CFG, nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  keys = jnp.repeat(_keys(4, 9), 4, axis=0)  # 4 tasks x 4 rollouts
  run = jax.jit(lambda p, k: rollout(nnx.merge(graphdef, p), SPEC, k, jax.random.key(3),
                                     sampling=SamplingParams(1.0), invalid_penalty=0.25))
  traj = run(params, keys)
  assert traj.turn_rewards.shape == traj.anchors.shape == (16, SPEC.max_turns)
  np.testing.assert_allclose(jnp.sum(traj.turn_rewards, 1), traj.rewards, atol=1e-6)
  assert int(jnp.sum(traj.invalid)) > 0  # an untrained model: many invalid turns
  np.testing.assert_allclose(traj.rewards, traj.won - 0.25 * traj.invalid, atol=1e-5)
  a0 = np.asarray(traj.anchors[:, 0]).reshape(4, 4)
  assert np.all(a0 == a0[:, :1]) and len(set(a0[:, 0])) == 4
  taken = np.arange(SPEC.max_turns)[None, :] < np.asarray(traj.num_turns)[:, None]
  assert np.all((np.asarray(traj.anchors) >= 0) == taken)
  # "look" changes nothing: the state, hence the anchor, stays
  state = hh.reset(PARAMS, _keys(1)[0])
  look = jnp.asarray(hh.encode_action("look"))
  after, _ = SPEC.env.step(state, look)
  assert int(SPEC.env.anchor(after)) == int(SPEC.env.anchor(state))
  moved, _ = SPEC.env.step(state, hh.expert_action(state))  # a valid move
  assert int(SPEC.env.anchor(moved)) != int(SPEC.env.anchor(state))


def test_any_device_env_plays_through_the_rollout():
  """The rollout knows only the DeviceEnv protocol: a toy environment (say the secret
  word in at most 4 turns; word ids 3..9, pad 0, eos 1, unk 2) plays through it, with its
  expert and with a model."""
  import dataclasses
  from typing import NamedTuple

  from atod_jax.envs.base import DeviceStep

  class S(NamedTuple):
    secret: jax.Array
    turn: jax.Array
    won: jax.Array

  @dataclasses.dataclass(frozen=True)
  class Guess:
    max_turns: int = 4
    prompt_len: int = 2
    action_len: int = 1
    vocab_size: int = 10
    pad_id, eos_id, unk_id = 0, 1, 2

    def reset(self, key, split):
      return S(jax.random.randint(key, (), 3, 10), jnp.int32(0), jnp.bool_(False))

    def first_observation(self, s):
      return jnp.array([5, 0], jnp.int32)  # the same prompt for every task

    def status(self, s):
      return s.won | (s.turn >= self.max_turns), s.won, s.turn

    def step(self, s, command):
      live = ~self.status(s)[0]
      hit = live & (command[0] == s.secret)
      new = S(s.secret, s.turn + live.astype(jnp.int32), s.won | hit)
      return new, DeviceStep(hit.astype(jnp.float32), live & (command[0] < 3), jnp.int32(0))

    def observe(self, s, event):
      return jnp.array([4, 0], jnp.int32)

    def expert(self, s, key, noise):
      return s.secret[None].astype(jnp.int32), jnp.bool_(False)

    def anchor(self, s):
      return s.turn  # the turn is all the agent sees

  spec = DeviceRollout(Guess(), obs_len=1)
  keys = _keys(6, 11)
  expert = jax.jit(lambda k: rollout(None, spec, k, jax.random.key(0), sampling=None))(keys)
  assert np.all(expert.won) and np.all(expert.num_turns == 1)
  secrets = np.asarray(jax.vmap(lambda k: Guess().reset(k, "train").secret)(keys))
  gen = np.asarray(expert.tokens)[np.asarray(expert.gen_mask)].reshape(6, 2)
  np.testing.assert_array_equal(gen, np.stack([secrets, np.ones(6, int)], 1))
  cfg = ModelConfig(vocab_size=10, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                    head_dim=8, intermediate_size=32, dtype="float32")
  graphdef, params = nnx.split(DecoderLM(cfg, nnx.Rngs(0)))
  played = jax.jit(lambda p, k: rollout(nnx.merge(graphdef, p), spec, k, jax.random.key(1),
                                        sampling=SamplingParams(1.0), invalid_penalty=0.5))(
      params, keys)
  turns = np.asarray(played.num_turns)
  assert np.all((turns >= 1) & (turns <= 4))
  np.testing.assert_allclose(played.rewards, played.won - 0.5 * played.invalid, atol=1e-6)
  taken = np.arange(4)[None, :] < turns[:, None]
  np.testing.assert_array_equal(np.asarray(played.anchors), np.where(taken, np.arange(4), -1))
