"""How a step slices its batch: the update's micro-batches are slices of the model's
sequences (a window layout's turns), exact whatever their number; teacher scoring in
strided chunks; the vocabulary projection under a byte budget; slice counts aligned to
the devices' rows."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from atod_jax.models import DecoderLM, ModelConfig
from atod_jax.rollout.trajectory import Trajectory
from atod_jax.sampling import logprobs as logprobs_mod
from atod_jax.sampling.logprobs import token_logprobs
from atod_jax.train import steps
from atod_jax.train.steps import Batches, PolicyLoss, aligned_chunks, init_state

CFG = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=16, intermediate_size=48, dtype="float32")


def _windowed_batch(seed: int, episodes: int = 4, turns: int = 3, length: int = 10):
  """Episodes of ``turns`` segments (prompt tokens, then a generated answer); some turns
  and one whole episode left unplayed, one episode lost to a worker (row_valid False)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (episodes, turns, length)).astype(np.int32)
  valid = np.ones(tokens.shape, bool)
  gen = np.zeros(tokens.shape, bool)
  gen[:, :, 6:] = True
  played = rng.integers(1, turns + 1, episodes)
  played[0] = turns
  for i, n in enumerate(played):
    valid[i, n:], gen[i, n:] = False, False
  gen[1, 0, 6:8] = False  # a short answer
  turn_ids = np.where(gen, np.arange(turns)[None, :, None], -1).astype(np.int32)
  behaviour = np.where(gen, -rng.exponential(1.0, tokens.shape), 0.0).astype(np.float32)
  row_valid = np.ones(episodes, bool)
  row_valid[-1] = False
  f = lambda *s: np.zeros(s, np.float32)  # noqa: E731
  traj = Trajectory(jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(gen),
                    jnp.asarray(turn_ids), jnp.asarray(behaviour), jnp.asarray(f(episodes)),
                    jnp.zeros(episodes, bool), jnp.asarray(played, jnp.int32),
                    jnp.zeros(episodes, jnp.int32), jnp.arange(episodes, dtype=jnp.int32),
                    jnp.asarray(row_valid), jnp.asarray(f(episodes, turns)),
                    jnp.zeros((episodes, turns), jnp.int32))
  adv = jnp.asarray(rng.normal(size=tokens.shape).astype(np.float32)) * traj.gen_mask
  return traj, adv


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
def test_update_sliced_into_turns_equals_the_whole_minibatch(aggregation):
  """One mini-batch of 4 episodes x 3 turns = 12 sequences: 6 slices of 2 sequences (a
  slice is part of one episode) give the loss, metrics and new parameters of 1 slice,
  for the paper's per-episode mean and for the token mean (both exact now)."""
  traj, adv = _windowed_batch(0)
  graphdef, params = nnx.split(DecoderLM(CFG, nnx.Rngs(0)))
  tx = optax.sgd(1.0)  # new parameters = old - gradient (Adam would magnify rounding)
  loss = PolicyLoss(aggregation=aggregation)

  def run(micro):
    copy = jax.tree.map(lambda x: np.array(x), params)
    update = jax.jit(steps.policy_update, static_argnums=(0, 1, 6, 7))
    return update(graphdef, tx, init_state(copy, tx), traj, adv, jax.random.key(1), loss,
                  Batches(1, 1, micro))

  whole, m1 = run(1)
  sliced, m6 = run(6)
  for k in ("loss", "grad_norm", "clip_fraction", "approx_kl", "ratio_mean", "ratio_max"):
    np.testing.assert_allclose(float(m6[k]), float(m1[k]), rtol=2e-5, atol=1e-7, err_msg=k)
  for a, b in zip(jax.tree.leaves(sliced.params), jax.tree.leaves(whole.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  # and the same loss as the surrogate written on the episodes' flat rows
  from atod_jax import objectives as obj
  from atod_jax.rollout.trajectory import flat, trained_mask
  logp = token_logprobs(nnx.merge(graphdef, params), traj.tokens.reshape(-1, 10),
                        traj.valid.reshape(-1, 10)).reshape(traj.tokens.shape)
  want, _ = obj.clipped_policy_loss(flat(logp), flat(traj.behaviour_logp), flat(adv),
                                    trained_mask(traj), aggregation=aggregation)
  np.testing.assert_allclose(float(m1["loss"]), float(want), rtol=1e-5)


def test_windowed_scoring_in_strided_chunks_equals_one_pass():
  traj, _ = _windowed_batch(1)
  graphdef, params = nnx.split(DecoderLM(CFG, nnx.Rngs(2)))
  one = steps.jit_score(graphdef, params, traj)
  for chunks in (2, 3, 12):
    np.testing.assert_allclose(steps.jit_score(graphdef, params, traj, chunks=chunks), one,
                               atol=1e-6)
  assert float(jnp.abs(one).sum()) > 0 and bool(jnp.all(jnp.where(traj.gen_mask, True, one == 0)))


def test_logits_budget_shrinks_the_chunk_and_keeps_the_logprobs(monkeypatch):
  """Past LOGIT_BYTES the vocabulary projection runs in fewer positions at a time (down
  to MIN_CHUNK): the log-probs do not change."""
  model = DecoderLM(CFG, nnx.Rngs(3))
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 50, (3, 40)), jnp.int32)
  want = token_logprobs(model, tokens, chunk_size=None)
  assert logprobs_mod.chunk_positions(3, 50, 512) == 512
  monkeypatch.setattr(logprobs_mod, "LOGIT_BYTES", 3 * 50 * 4 * 8)  # 8 positions' worth
  assert logprobs_mod.chunk_positions(3, 50, 512) == 16  # not below MIN_CHUNK
  monkeypatch.setattr(logprobs_mod, "MIN_CHUNK", 4)
  assert logprobs_mod.chunk_positions(3, 50, 512) == 8
  assert logprobs_mod.chunk_positions(3, 50, None) is None
  np.testing.assert_allclose(token_logprobs(model, tokens, chunk_size=512), want, atol=1e-6)


def test_aligned_chunks_hand_worked():
  # 3,200 sequences (64 episodes x 50 turns) on 8 devices: 400 a device; 32 asked -> 40
  assert aligned_chunks(3200, 32, 8) == 40
  assert aligned_chunks(3200, 40, 8) == 40
  assert aligned_chunks(800, 8, 8) == 10  # 100 a device
  assert aligned_chunks(64, 32, 1) == 32  # one device: as asked
  assert aligned_chunks(12, 5, 1) == 6
  assert aligned_chunks(10, 20, 1) == 10  # never more slices than rows
  assert aligned_chunks(100, 8, 8) == 10  # 8 does not divide 100: not sharded, any divisor
