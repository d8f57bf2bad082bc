"""The host rollout on a text environment (the household tasks as text: in process, no
extra dependency): the behaviour log-probs it records equal a full forward over the
finished episodes, expert episodes read back as the episode, aborted episodes are
masked out."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from atod_jax.data.demos import collect_expert_episodes
from atod_jax.envs import household as hh
from atod_jax.envs.household_text import HouseholdTextEnv
from atod_jax.models import DecoderLM, ModelConfig
from atod_jax.rollout.host import TextCodec, TextRollout, host_rollout, train_text_tokenizer
from atod_jax.sampling.generate import SamplingParams
from atod_jax.sampling.logprobs import token_logprobs

PARAMS = hh.HouseholdParams.preset("easy")


def _codec(tmp_path, turns=6, response_len=16):
  env = HouseholdTextEnv(PARAMS, seed=0)
  texts = [f"Task: {ep['task']}\n" + "\n".join(ep["observations"] + ep["actions"])
           for ep in collect_expert_episodes(env, "train", range(16))]
  tok = train_text_tokenizer(texts, 300, str(tmp_path / "tok"))
  return env, TextCodec(tok, TextRollout(max_turns=turns, prompt_len=48,
                                         response_len=response_len, obs_len=24))


def _model(codec, layers):
  cfg = ModelConfig(vocab_size=codec.tokenizer.vocab_size, hidden_size=32, num_layers=layers,
                    num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64,
                    model_type="qwen3", qk_norm=True, dtype="float32", param_dtype="float32")
  return DecoderLM(cfg, nnx.Rngs(0))


def test_behaviour_logprobs_equal_a_full_forward(tmp_path):
  env, codec = _codec(tmp_path)
  model = _model(codec, layers=2)
  traj, infos = host_rollout(model, codec, env, "train", [0, 1, 2, 3], jax.random.key(1),
                             sampling=SamplingParams(temperature=1.0), group_ids=[0, 0, 1, 1])
  assert int(traj.gen_mask.sum()) > 0 and (np.asarray(traj.num_turns) >= 1).all()
  full = token_logprobs(model, traj.tokens, traj.valid)
  np.testing.assert_allclose(np.where(traj.gen_mask, full, 0.0), traj.behaviour_logp,
                             atol=2e-5)
  np.testing.assert_array_equal(traj.group_ids, [0, 0, 1, 1])
  # an untrained model's responses are malformed or invalid commands
  assert (np.asarray(traj.invalid) == np.asarray(traj.num_turns)).all()


def test_expert_episodes_read_back_as_played(tmp_path):
  env, codec = _codec(tmp_path, turns=PARAMS.max_turns, response_len=24)
  traj, _ = host_rollout(None, codec, env, "heldout", [0, 1], jax.random.key(0), sampling=None)
  assert np.asarray(traj.won).all() and np.asarray(traj.row_valid).all()
  episodes = list(collect_expert_episodes(HouseholdTextEnv(PARAMS, seed=0), "heldout", [0, 1]))
  tok = codec.tokenizer
  for row, ep in enumerate(episodes):
    gen = np.asarray(traj.tokens[row])[np.asarray(traj.gen_mask[row])]
    # the trained tokens are exactly the expert's commands, each closed by <eos>
    assert tok.decode(gen).split("<eos>")[:-1] == [" " + a for a in ep["actions"]]
    assert int(traj.num_turns[row]) == len(ep["actions"])
    turn_ids = np.asarray(traj.turn_ids[row])[np.asarray(traj.gen_mask[row])]
    assert turn_ids[0] == 0 and turn_ids[-1] == len(ep["actions"]) - 1


def test_expert_commands_that_do_not_fit_are_not_imitated(tmp_path):
  env, codec = _codec(tmp_path, turns=PARAMS.max_turns, response_len=5)
  traj, _ = host_rollout(None, codec, env, "heldout", [0, 1], jax.random.key(0), sampling=None)
  assert np.asarray(traj.won).all()  # the env played the whole commands
  tok = codec.tokenizer
  for row in range(2):
    gen = np.asarray(traj.tokens[row])[np.asarray(traj.gen_mask[row])]
    for command in tok.decode(gen).split("<eos>")[:-1]:  # only whole commands are trained
      assert len(tok.encode(command)) <= 4


@dataclasses.dataclass
class _Aborting:
  """Wraps an env; episode 1 is lost to an 'environment failure' at the first step."""

  env: object

  @property
  def max_turns(self):
    return self.env.max_turns

  def reset(self, split, ids):
    return self.env.reset(split, ids)

  def step(self, actions):
    batch = self.env.step(actions)
    batch.aborted = np.array([i == 1 for i in range(len(actions))])
    batch.dones = batch.dones | batch.aborted
    return batch


def test_aborted_episodes_are_masked(tmp_path):
  env, codec = _codec(tmp_path)
  traj, _ = host_rollout(None, codec, _Aborting(env), "train", [0, 1, 2], jax.random.key(0),
                         sampling=None)
  np.testing.assert_array_equal(traj.row_valid, [True, False, True])
  assert not bool(traj.won[1]) and bool(traj.won[0])


def test_on_8_devices_the_rollout_is_the_same(tmp_path):
  from atod_jax.models.sharding import make_mesh
  env, codec = _codec(tmp_path)
  model = _model(codec, layers=1)
  ids = list(range(8))
  one, _ = host_rollout(model, codec, env, "train", ids, jax.random.key(3),
                        sampling=SamplingParams(temperature=1.0))
  mesh = make_mesh(8, 1, 1)
  many, _ = host_rollout(model, codec, env, "train", ids, jax.random.key(3),
                         sampling=SamplingParams(temperature=1.0), mesh=mesh)
  np.testing.assert_array_equal(one.tokens, many.tokens)
  np.testing.assert_allclose(one.behaviour_logp, many.behaviour_logp, atol=1e-5)
