"""The host rollout on a text environment (the household tasks as text: in process, no
extra dependency): the behaviour log-probs it records equal a full forward over the
finished episodes, expert episodes read back as the episode, aborted episodes are
masked out."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atod_jax.data.demos import collect_expert_episodes
from atod_jax.envs import household as hh
from atod_jax.envs.household_text import HouseholdTextEnv
from atod_jax.models import DecoderLM, ModelConfig
from atod_jax.models.tokenizer import train_text_tokenizer
from atod_jax.rollout.host import TextCodec, TextRollout, host_rollout
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
                             sampling=SamplingParams(temperature=1.0), group_ids=[0, 0, 1, 1],
                             invalid_penalty=0.25)
  assert int(traj.gen_mask.sum()) > 0 and (np.asarray(traj.num_turns) >= 1).all()
  full = token_logprobs(model, traj.tokens, traj.valid)
  np.testing.assert_allclose(np.where(traj.gen_mask, full, 0.0), traj.behaviour_logp,
                             atol=2e-5)
  np.testing.assert_array_equal(traj.group_ids, [0, 0, 1, 1])
  # an untrained model's responses are malformed or invalid commands: each costs 0.25
  assert (np.asarray(traj.invalid) == np.asarray(traj.num_turns)).all()
  np.testing.assert_allclose(traj.rewards, -0.25 * np.asarray(traj.invalid), atol=1e-6)
  np.testing.assert_allclose(np.sum(traj.turn_rewards, 1), traj.rewards, atol=1e-6)
  # the anchor of turn 0 is the key of the first observation, the same for a task's rollouts
  from atod_jax.rollout.host import anchor_key
  first = env.reset("train", [0, 1, 2, 3]).observations
  np.testing.assert_array_equal(traj.anchors[:, 0], [anchor_key(o) for o in first])
  assert anchor_key("You see  a Mug.") == anchor_key("you see a mug.") >= 0


def test_expert_episodes_read_back_as_played(tmp_path):
  env, codec = _codec(tmp_path, turns=PARAMS.max_turns, response_len=24)
  traj, infos = host_rollout(None, codec, env, "heldout", [0, 1], jax.random.key(0),
                             sampling=None)
  assert np.asarray(traj.won).all()
  assert [i["format_errors"] for i in infos] == [0, 0]  # the expert's answers all parse and np.asarray(traj.row_valid).all()
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
  traj, infos = host_rollout(None, codec, env, "heldout", [0, 1], jax.random.key(0),
                             sampling=None)
  assert np.asarray(traj.won).all()
  assert [i["format_errors"] for i in infos] == [0, 0]  # the expert's answers all parse  # the env played the whole commands
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


@pytest.mark.parametrize("layout", ["context", "window"])
def test_on_8_devices_the_rollout_is_the_same(tmp_path, layout):
  from atod_jax.models.sharding import make_mesh
  env, codec = _codec(tmp_path) if layout == "context" else _window_codec(tmp_path, turns=3)
  model = _model(codec, layers=1)
  ids = list(range(8))
  one, _ = host_rollout(model, codec, env, "train", ids, jax.random.key(3),
                        sampling=SamplingParams(temperature=1.0))
  mesh = make_mesh(8, 1, 1)
  many, _ = host_rollout(model, codec, env, "train", ids, jax.random.key(3),
                         sampling=SamplingParams(temperature=1.0), mesh=mesh)
  np.testing.assert_array_equal(one.tokens, many.tokens)
  np.testing.assert_allclose(one.behaviour_logp, many.behaviour_logp, atol=1e-5)


# --------------------------------------------------------------------------- window layout
def _window_codec(tmp_path, turns=6, prompt_len=512, response_len=40, history=2):
  from atod_jax.rollout.host import episode_text
  env = HouseholdTextEnv(PARAMS, seed=0)
  spec = TextRollout(max_turns=turns, prompt_len=prompt_len, response_len=response_len,
                     layout="window", history=history)
  texts = [episode_text(spec, "household", ep)
           for ep in collect_expert_episodes(env, "train", range(16))]
  tok = train_text_tokenizer(texts, 400, str(tmp_path / "wtok"))
  return env, TextCodec(tok, spec, "household")


@pytest.mark.long
def test_windowed_turns_each_see_their_own_prompt_and_train_as_such(tmp_path):
  """Each turn's segment holds its own prompt and response; read alone it gives the
  recorded log-probs; pack + trim keep every generated token's score; the advantages
  see the whole row (T-DUR over turn ids 0..K-1 across segments)."""
  from atod_jax import objectives as obj
  from atod_jax.rollout.trajectory import pack, trim
  from atod_jax.train import steps
  env, codec = _window_codec(tmp_path)
  model = _model(codec, layers=2)
  traj, infos = host_rollout(model, codec, env, "train", [0, 1, 2, 3], jax.random.key(1),
                             sampling=SamplingParams(temperature=1.0), group_ids=[0, 0, 1, 1])
  b, k, s = traj.tokens.shape
  assert (b, k, s) == (4, 6, 512 + 40) and traj.windowed
  # format errors: the turns whose answer the codec cannot read a command from, recounted
  # from the recorded responses; a subset of the invalid turns
  for row in range(b):
    answers = [np.asarray(traj.tokens[row, t])[np.asarray(traj.gen_mask[row, t])]
               for t in range(int(traj.num_turns[row]))]
    recount = sum(codec.command(a) is None for a in answers)
    assert infos[row]["format_errors"] == recount <= int(traj.invalid[row])
  # each segment read alone (its own sequence) gives the recorded behaviour log-probs
  full = token_logprobs(model, traj.tokens.reshape(-1, s), traj.valid.reshape(-1, s))
  np.testing.assert_allclose(np.where(traj.gen_mask, full.reshape(b, k, s), 0.0),
                             traj.behaviour_logp, atol=2e-5)
  turns = np.asarray(traj.num_turns)
  tok = codec.tokenizer
  for row in range(b):
    used = np.asarray(traj.valid[row]).any(axis=1)
    assert used.sum() == turns[row] and used[:turns[row]].all()  # segments fill in order
    for turn in range(turns[row]):
      seg = np.asarray(traj.tokens[row, turn])
      prompt = tok.decode(seg[:512][np.asarray(traj.valid[row, turn, :512])])
      assert f"You are now at step {turn + 1} and your current observation is" in prompt
      assert ("Prior to this step" in prompt) == (turn > 0)
      ids = np.asarray(traj.turn_ids[row, turn])[np.asarray(traj.gen_mask[row, turn])]
      assert (ids == turn).all()

  graphdef, params = nnx.split(model)
  cut = trim(pack(traj), multiple=16)
  assert cut.tokens.shape[2] < traj.tokens.shape[2]
  a, b_ = steps.score(graphdef, params, traj), steps.score(graphdef, params, cut)
  np.testing.assert_allclose(np.sort(np.asarray(a)[np.asarray(traj.gen_mask)]),
                             np.sort(np.asarray(b_)[np.asarray(cut.gen_mask)]), atol=1e-5)
  teacher = a + 0.1 * jnp.where(traj.gen_mask, 1.0, 0.0)
  sched = obj.annealing_schedules(10)
  adv, none, _ = steps.advantages(traj, teacher, sched.kappa(3), sched.rho(3),
                                  steps.AdvantageSpec("soft_or", "grpo", 2, 6))
  assert adv.shape == traj.tokens.shape and none is None  # no full-vocabulary term
  flat = lambda x: x.reshape(4, -1)  # noqa: E731
  mask = flat(traj.gen_mask)
  w = obj.tdur_weights(flat(traj.behaviour_logp), flat(teacher), flat(traj.turn_ids), mask,
                       mode="soft_or", max_turns=6)
  g = obj.group_advantages(traj.rewards, traj.group_ids, 2, "grpo")
  want = obj.atod_advantages(obj.opd_signal(flat(teacher), flat(traj.behaviour_logp), mask),
                             w, g, mask, sched.kappa(3), sched.rho(3))
  np.testing.assert_allclose(flat(adv), want, atol=1e-6)


def test_windowed_expert_responses_and_history(tmp_path):
  env, codec = _window_codec(tmp_path, turns=PARAMS.max_turns, history=1)
  traj, infos = host_rollout(None, codec, env, "heldout", [0, 1], jax.random.key(0),
                             sampling=None)
  assert np.asarray(traj.won).all()
  assert [i["format_errors"] for i in infos] == [0, 0]  # the expert's answers all parse
  episodes = list(collect_expert_episodes(HouseholdTextEnv(PARAMS, seed=0), "heldout", [0, 1]))
  tok = codec.tokenizer
  for row, ep in enumerate(episodes):
    for turn, action in enumerate(ep["actions"]):
      gen = np.asarray(traj.tokens[row, turn])[np.asarray(traj.gen_mask[row, turn])]
      assert tok.decode(gen) == f"<think></think><action>{action}</action><eos>"
      assert codec.command(gen) == action  # the policy's parser reads it back
      seg = np.asarray(traj.tokens[row, turn])[np.asarray(traj.valid[row, turn])]
      text = tok.decode(seg)
      if turn > 0:  # the window shows exactly the last pair
        assert f"Action {turn}: '{ep['actions'][turn - 1]}'" in text
        assert turn < 2 or f"Action {turn - 1}: " not in text


def test_windowed_parser_and_prompt_budget(tmp_path):
  env, codec = _window_codec(tmp_path, prompt_len=400)
  enc = lambda t: codec.tokenizer.encode(t) + [codec.eos]  # noqa: E731
  assert codec.command(enc("<think>x</think><action>go north</action>")) == "go north"
  assert codec.command(enc("<action>go north</action>")) is None  # no <think> block
  assert codec.command(enc("<think>x</think>go north")) is None  # no action tag
  assert codec.command(codec.tokenizer.encode("<think></think><action>look</action>")) is None
  # a second stop token from generation_config.json (as Qwen3's <|endoftext|>) ends an answer
  from atod_jax.models.tokenizer import Tokenizer
  tok = codec.tokenizer
  other = tok.token_to_id("<pad>")
  two = TextCodec(Tokenizer(tok._tok, tok.config, None, {"eos_token_id": [codec.eos, other]}),
                  codec.spec, "household")
  assert two.stops == [codec.eos, other]
  answer = tok.encode("<think>x</think><action>look</action>")
  assert two.command(answer + [other]) == "look" and codec.command(answer + [other]) is None
  history = [(f"observation {i} " * 20, f"action {i}") for i in range(5)]
  ids = codec.turn_prompt("a task", "the current observation", history)
  assert len(ids) <= 400
  # too long for two pairs: fewer history pairs, never a cut instruction block
  text = codec.tokenizer.decode(ids)
  assert text.rstrip().endswith("<action> </action> tags.") and "Action 5" in text
  assert "Action 4" not in text
