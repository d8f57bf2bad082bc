"""The method table and the math of the methods' terms, against numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atod_jax.models import DecoderLM, ModelConfig
from atod_jax.train import methods, steps
from tests import np_reference as ref
from tests.train import tiny_config

# method -> (kappa, rho) at steps 0, 25, 50 and 80 of the quickstart's 50-step anneal,
# the turn-weight mode, the teacher used, the RL term, the distillation signal
TABLE = {
    "atod": ([(1.0, 1.0), (0.55, 1.5), (0.1, 2.0), (0.1, 2.0)], "soft_or", True, "episode",
             "sampled"),
    "opd": ([(1.0, 0.0)] * 4, "uniform", True, "episode", "sampled"),
    "grpo": ([(0.0, 1.0)] * 4, "uniform", False, "episode", "sampled"),
    "atod_fixed": ([(1.0, 1.0)] * 4, "soft_or", True, "episode", "sampled"),
    "atod_uniform": ([(1.0, 1.0), (0.55, 1.5), (0.1, 2.0), (0.1, 2.0)], "uniform", True,
                     "episode", "sampled"),
    "gigpo": ([(0.0, 1.0)] * 4, "uniform", False, "gigpo", "sampled"),
    "gkd": ([(1.0, 0.0)] * 4, "uniform", True, "episode", "full_vocab"),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_method_table(name):
  weights, mode, teacher, rl, signal = TABLE[name]
  config = tiny_config.get_config()
  update = methods.make_update(config, name, None, max_turns=15)
  got = [(float(update.sched.kappa(s)), float(update.sched.rho(s))) for s in (0, 25, 50, 80)]
  np.testing.assert_allclose(got, weights, atol=1e-6)
  assert update.advantage.tdur_mode == mode and update.method.uses_teacher == teacher
  assert update.advantage.rl == rl and update.advantage.signal == signal
  assert (update.distill is not None) == (signal == "full_vocab")
  # the teacher scores sampled tokens only where the sampled signal or T-DUR reads them
  assert update.scores_tokens == (teacher and (signal == "sampled" or mode != "uniform"))


def test_sft_is_supervised_and_every_method_is_in_the_table():
  assert set(methods.METHODS) == set(TABLE) | {"sft"}
  sft = methods.make_update(tiny_config.get_config(), "sft", None, max_turns=15)
  assert sft.advantage is None and not sft.method.uses_teacher


def test_atod_takes_the_full_vocabulary_signal_from_the_config():
  config = tiny_config.get_config()
  config.objective.update(opd_signal="full_vocab", divergence_beta=1.0)
  update = methods.make_update(config, "atod", None, max_turns=15)
  assert update.distill == steps.Distill(1.0) and update.distill.kind == "reverse_kl"
  assert update.advantage.tdur_mode == "soft_or" and update.scores_tokens  # T-DUR reads the scores


@pytest.mark.parametrize("beta, kind", [(0.0, "forward_kl"), (1.0, "reverse_kl"),
                                        (0.3, "jsd")])
def test_full_vocabulary_divergence_direction_against_numpy(beta, kind):
  """beta = 0 is KL(teacher || student), beta = 1 is KL(student || teacher), written out
  in numpy on the two models' own logits; between them the generalised JSD."""
  cfg = ModelConfig(vocab_size=40, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                    head_dim=16, intermediate_size=48, dtype="float32")
  student, teacher = DecoderLM(cfg, nnx.Rngs(0)), DecoderLM(cfg, nnx.Rngs(1))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 40, (3, 2, 9)), jnp.int32)  # window layout [B, K, S]
  valid = jnp.ones(tokens.shape, bool)
  distill = steps.Distill(beta, chunk_size=4)  # chunks of 4 of the 8 positions
  rows = tokens.reshape(-1, 9)  # the model's sequences
  logp, div = steps._logprobs_and_divergence(student, teacher, rows, valid.reshape(-1, 9), 1.0,
                                             distill)
  s_logits, t_logits = (np.asarray(m(rows)[0]) for m in (student, teacher))
  mask = np.ones(rows.shape, bool)
  want = ref.vocab_divergence(s_logits[:, :-1], t_logits[:, :-1], mask[:, :-1], kind, beta=beta)
  np.testing.assert_allclose(np.asarray(div).reshape(-1, 9)[:, 1:], want, rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(div).reshape(-1, 9)[:, 0] == 0)
  p_s = jax.nn.softmax(s_logits[:, :-1], -1)
  p_t = jax.nn.softmax(t_logits[:, :-1], -1)
  forward = np.sum(p_t * (np.log(p_t) - np.log(p_s)), -1)
  reverse = np.sum(p_s * (np.log(p_s) - np.log(p_t)), -1)
  if kind != "jsd":  # the direction, spelled out
    np.testing.assert_allclose(want, forward if beta == 0.0 else reverse, rtol=1e-4)
    assert not np.allclose(forward, reverse, rtol=1e-2)
  picked = np.take_along_axis(jax.nn.log_softmax(s_logits[:, :-1], -1),
                              np.asarray(rows[:, 1:])[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(logp).reshape(-1, 9)[:, 1:], picked, atol=2e-5)


def test_full_vocabulary_term_gradient_moves_the_student_toward_the_teacher():
  """One update on the divergence alone (kappa = 1, rho = 0) lowers it."""
  cfg = ModelConfig(vocab_size=40, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                    head_dim=16, intermediate_size=48, dtype="float32")
  graphdef, params = nnx.split(DecoderLM(cfg, nnx.Rngs(0)))
  t_graph, t_params = nnx.split(DecoderLM(cfg, nnx.Rngs(1)))
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, 40, (4, 12)), jnp.int32)
  gen = jnp.asarray(np.arange(12)[None, :] >= 4).repeat(4, 0)
  from atod_jax.rollout.trajectory import Trajectory
  traj = Trajectory(tokens, jnp.ones(tokens.shape, bool), gen, jnp.where(gen, 0, -1),
                    jnp.zeros(tokens.shape), jnp.zeros(4), jnp.zeros(4, bool),
                    jnp.ones(4, jnp.int32), jnp.zeros(4, jnp.int32), jnp.arange(4),
                    jnp.ones(4, bool), jnp.zeros((4, 1)), jnp.zeros((4, 1), jnp.int32))
  import optax
  tx = optax.adam(1e-2)
  distill = steps.Distill(1.0)

  def divergence(p):
    _, div = steps._logprobs_and_divergence(nnx.merge(graphdef, p), nnx.merge(t_graph, t_params),
                                            traj.tokens, traj.valid, 1.0, distill)
    return float(jnp.sum(div * gen) / jnp.sum(gen))

  before = divergence(params)
  state, metrics = jax.jit(steps.policy_update, static_argnums=(0, 1, 6, 7, 8, 9))(
      graphdef, tx, steps.init_state(params, tx), traj, jnp.zeros(tokens.shape),
      jax.random.key(0), steps.PolicyLoss(), steps.Batches(1, 1, 1), distill, t_graph,
      t_params, gen.astype(jnp.float32))
  np.testing.assert_allclose(float(metrics["divergence"]), before, rtol=1e-5)
  assert divergence(state.params) < before


def test_recomputed_behaviour_logprobs_are_the_training_forwards():
  """objective.behaviour_logp=recompute: pi_old is the current parameters' forward (at
  the rollout temperature) before the update: with a batch whose recorded log-probs are
  wrong, the recomputing update equals the sampler one given the forward's log-probs."""
  import optax
  from atod_jax.models import checkpoint as model_io
  from atod_jax.rollout import pack, trim
  from atod_jax.sampling import SamplingParams
  from atod_jax.train.sources.device import DeviceSource, rollout_fn, task_keys
  config = tiny_config.get_config()
  config.optim.minibatches = 1
  spec = DeviceSource(config).spec
  graphdef, params = model_io.fresh(ModelConfig(**config.student.model), jax.random.key(0))
  keys, groups = task_keys(jax.random.key(1), 2, 4)
  traj = trim(pack(rollout_fn(graphdef, spec, "train", SamplingParams(1.0))(
      params, keys, jax.random.key(2), groups)))
  traj = traj._replace(rewards=jax.random.normal(jax.random.key(4), traj.rewards.shape))
  forward = steps.jit_score(graphdef, params, traj, temperature=1.0)
  np.testing.assert_allclose(forward, traj.behaviour_logp, atol=2e-5)  # f32: they agree
  skewed = traj._replace(behaviour_logp=traj.behaviour_logp + 0.3 * traj.gen_mask)
  copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731
  run = lambda mode, batch: methods.make_update(  # noqa: E731
      config.copy_and_resolve_references() if mode == "sampler" else _with(config, mode),
      "grpo", graphdef, max_turns=15, tx=optax.sgd(1.0))
  recomputed, m1 = run("recompute", skewed)(run("recompute", skewed).init(copy(params)),
                                            skewed, jax.random.key(3))
  sampler, m2 = run("sampler", traj)(run("sampler", traj).init(copy(params)),
                                     traj._replace(behaviour_logp=forward), jax.random.key(3))
  skewed_run, m3 = run("sampler", skewed)(run("sampler", skewed).init(copy(params)), skewed,
                                          jax.random.key(3))
  np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(recomputed.params), jax.tree.leaves(sampler.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  assert abs(float(m3["loss"]) - float(m1["loss"])) > 1e-3  # the skew matters without it


def _with(config, mode):
  c = config.copy_and_resolve_references()
  c.objective.behaviour_logp = mode
  return c


def test_evaluation_kl_per_turn_against_numpy():
  """The evaluation's imitation measure: KL(student || teacher) and KL(teacher || student)
  over the whole vocabulary at each generated token (numpy, from the two models' logits),
  token-averaged within each turn, then averaged over the (episode, turn) pairs and, per
  turn index, over the episodes that reached it; prompt and observation tokens and an
  invalid row count nowhere; chunks of positions give the same numbers."""
  cfg = ModelConfig(vocab_size=40, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                    head_dim=16, intermediate_size=48, dtype="float32")
  graphdef, params = nnx.split(DecoderLM(cfg, nnx.Rngs(0)))
  t_graph, t_params = nnx.split(DecoderLM(cfg, nnx.Rngs(1)))
  rng = np.random.default_rng(2)
  b, length = 4, 14
  tokens = jnp.asarray(rng.integers(0, 40, (b, length)), jnp.int32)
  # turn ids: prompt 0-2, turn 0 at 3-5, observation 6, turn 1 at 7-9, turn 2 at 11-12;
  # row 2 stops after turn 0 and row 3 is an invalid row (lost episode)
  turn = np.full((b, length), -1)
  turn[:, 3:6], turn[:, 7:10], turn[:, 11:13] = 0, 1, 2
  turn[2, 7:] = -1
  gen = turn >= 0
  from atod_jax.rollout.trajectory import Trajectory
  traj = Trajectory(tokens, jnp.ones(tokens.shape, bool), jnp.asarray(gen),
                    jnp.asarray(turn, jnp.int32), jnp.zeros(tokens.shape), jnp.zeros(b),
                    jnp.zeros(b, bool), jnp.ones(b, jnp.int32), jnp.zeros(b, jnp.int32),
                    jnp.arange(b), jnp.asarray([True, True, True, False]),
                    jnp.zeros((b, 3)), jnp.zeros((b, 3), jnp.int32))
  s_logits = np.asarray(nnx.merge(graphdef, params)(tokens)[0])
  t_logits = np.asarray(nnx.merge(t_graph, t_params)(tokens)[0])
  # the token at t is predicted from position t - 1
  mask = np.zeros((b, length), bool)
  mask[:, 1:] = gen[:, 1:]
  rev = np.zeros((b, length))
  fwd = np.zeros((b, length))
  rev[:, 1:] = ref.vocab_divergence(s_logits[:, :-1], t_logits[:, :-1], mask[:, 1:], "reverse_kl")
  fwd[:, 1:] = ref.vocab_divergence(s_logits[:, :-1], t_logits[:, :-1], mask[:, 1:], "forward_kl")
  for chunk in (512, 4):
    got_rev, got_fwd = steps.kl_tokens(graphdef, params, t_graph, t_params, traj, chunk_size=chunk)
    np.testing.assert_allclose(np.asarray(got_rev), rev, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_fwd), fwd, rtol=1e-4, atol=1e-6)
  assert np.all(rev >= 0) and not np.allclose(rev[gen], fwd[gen], rtol=1e-2)

  metrics = steps.kl_metrics(steps.add_sums(None, steps.jit_turn_kl_sums(
      graphdef, params, t_graph, t_params, traj, 4)))
  means = {(i, k): (rev[i][turn[i] == k].mean(), fwd[i][turn[i] == k].mean())
           for i in range(3) for k in range(3) if np.any(turn[i] == k)}  # rows 0-2 count
  assert len(means) == 7
  np.testing.assert_allclose(metrics["kl_reverse"], np.mean([m[0] for m in means.values()]),
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["kl_forward"], np.mean([m[1] for m in means.values()]),
                             rtol=1e-5)
  for k in range(3):
    np.testing.assert_allclose(metrics[f"kl_reverse_turn{k}"],
                               np.mean([m[0] for (i, kk), m in means.items() if kk == k]),
                               rtol=1e-5)
  assert "kl_reverse_turn3" not in metrics  # no episode reached turn 3


def test_every_update_of_a_run_is_atod_update(tmp_path, monkeypatch):
  """The teacher's build (behaviour cloning, then GRPO), the student's warm start and the
  run's ATOD steps all update the weights inside ``steps.atod_update``: every trace of
  the optimizer loop (``steps._minibatch_update``) has it on the stack, and each phase
  traced one."""
  import inspect
  from atod_jax.train import train
  seen = []
  inner = steps._minibatch_update

  def watched(loss_fn, tx, state, batch, key, walk, prepare=None):
    names = [f.function for f in inspect.stack()]
    seen.append(("atod_update" in names, "policy" if prepare is not None else "supervised"))
    return inner(loss_fn, tx, state, batch, key, walk, prepare)

  monkeypatch.setattr(steps, "_minibatch_update", watched)
  jax.clear_caches()  # trace afresh: an update traced by an earlier test would not show
  config = tiny_config.get_config()  # as small as a run gets: compiling is the cost
  config.teacher.build.update(grpo_steps=1, sft_steps=1, select_every=0)
  config.student.sft.steps = 1
  config.rollout.update(tasks_per_step=1, group_size=2)
  config.optim.minibatches = 1
  config.train.update(steps=1, eval_every=1, checkpoint_every=1)
  config.eval.update(episodes=2, kl=False)
  train(config, str(tmp_path / "run"), quiet=True)
  assert seen and all(inside for inside, _ in seen), seen
  assert {kind for _, kind in seen} == {"policy", "supervised"}
