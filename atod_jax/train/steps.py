"""The pure, jitted pieces of a training step.

State is a plain pytree (:class:`TrainState`: NNX parameter state, optax state, step), so
it checkpoints with orbax as is and shards with the mesh's rules. The model's static
structure (the NNX ``graphdef``) is passed separately and stays out of the state.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from atod_jax import objectives as obj
from atod_jax.models.sharding import Together
from atod_jax.rollout.trajectory import Trajectory, flat, model_rows, trained_mask
from atod_jax.objectives.distill import map_sequence_chunks
from atod_jax.sampling.logprobs import chunk_positions, logprobs_from_hidden, token_logprobs


class PolicyLoss(NamedTuple):
  """The clipped surrogate's settings (static: hashable, one record instead of keywords)."""

  clip_eps: float = 0.2
  clip_eps_high: float = 0.0  # 0: = clip_eps
  dual_clip: float = 0.0  # 0: off
  aggregation: str = "seq_mean_token_mean"
  temperature: float = 1.0  # the rollout's: log-probs are of the sampling distribution


class Distill(NamedTuple):
  """The full-vocabulary distillation term (GKD, Agarwal et al. 2024), static.

  Per generated token, a divergence between the teacher's and the student's whole
  next-token distributions (temperature 1), differentiated through the student's:
  ``beta = 0`` forward KL ``KL(pi_T || pi_theta)``, ``beta = 1`` reverse KL
  ``KL(pi_theta || pi_T)`` (the on-policy distillation objective, whose sampled-token
  estimate is ATOD's ``log pi_theta - log pi_T``), between them the generalised JSD
  ``beta KL(pi_T || m) + (1 - beta) KL(pi_theta || m)``, ``m = beta pi_T + (1 - beta)
  pi_theta`` (the convention of GKD's paper and TRL's ``GKDTrainer``).
  """

  beta: float = 0.5
  chunk_size: int = 256  # positions whose logits exist at a time

  @property
  def kind(self) -> str:
    return {0.0: "forward_kl", 1.0: "reverse_kl"}.get(float(self.beta), "jsd")


class Batches(NamedTuple):
  """How one update walks its data (static)."""

  minibatches: int = 1  # optimizer steps per epoch
  epochs: int = 1
  microbatches: int = 1  # gradient-accumulation slices of a mini-batch
  # where a slice's rows go (rows_sharding): every slice split over the batch's devices
  # (None: left to the compiler, which may replicate a gathered mini-batch's slices)
  rows: Any = None


def rows_sharding(mesh) -> NamedSharding | None:
  """The sharding of ``[rows, ...]`` arrays on ``mesh``: rows over its data axes (None
  without a mesh)."""
  return None if mesh is None else NamedSharding(mesh, P(("data", "fsdp")))


def constrain_rows(tree, sharding: NamedSharding | None, axis: int = 0):
  """Every array of ``tree`` with its axis ``axis`` split as ``sharding`` splits rows
  (where the devices divide it; others are left alone): inside a jitted step, the
  placement of a slice the compiler cannot infer (a gathered mini-batch, a reshaped
  chunk), so it is not replicated on every device."""
  if sharding is None:
    return tree
  axes = sharding.spec[0]
  size = int(np.prod([sharding.mesh.shape[a] for a in
                      ((axes,) if isinstance(axes, str) else axes)]))

  def one(x):
    if x.ndim <= axis or x.shape[axis] % size:
      return x
    spec = [None] * x.ndim
    spec[axis] = axes
    return jax.lax.with_sharding_constraint(x, NamedSharding(sharding.mesh, P(*spec)))
  return jax.tree.map(one, tree)


class TrainState(NamedTuple):
  params: Any  # nnx.State of the student
  opt_state: Any  # optax state
  step: jax.Array  # int32 scalar: updates done
  # the adaptive hand-off's state (objectives.HandOff; () without one: no leaves)
  handoff: Any = ()


class _Saved(NamedTuple):
  """A :class:`TrainState` without a hand-off as its checkpoint holds it (the layout of
  every checkpoint written before the hand-off existed, which still restore)."""
  params: Any
  opt_state: Any
  step: jax.Array


def checkpoint_item(state: TrainState):
  """What an orbax checkpoint of ``state`` holds (:func:`from_checkpoint` reads it)."""
  return state if jax.tree.leaves(state.handoff) else _Saved(*state[:3])


def from_checkpoint(item) -> TrainState:
  return TrainState(*item) if len(item) == 4 else TrainState(*item, ())


def aligned_chunks(rows: int, target: int, shards: int = 1) -> int:
  """How many slices to cut ``rows`` rows into, as near ``target`` as can be (at least
  ``target`` where possible: the memory bound asked for) such that every device's rows
  split evenly: with the rows in ``shards`` contiguous blocks (the batch sharding) and
  slice ``j`` taking rows ``j, j + n, ...``, each slice then holds rows on every device
  instead of being replicated. ``rows`` that ``shards`` does not divide are not sharded:
  any divisor of them will do."""
  local = rows // shards if shards > 1 and rows % shards == 0 else rows
  divisors = [c for c in range(1, local + 1) if local % c == 0]
  above = [c for c in divisors if c >= target]
  return min(above) if above else max(divisors)


OPTIMIZERS = ("adamw", "adafactor")


def make_optimizer(optim) -> optax.GradientTransformation:
  """The student's optimizer, with linear warm-up and global-norm clipping
  (``max_grad_norm = 0``: off). ``optim.optimizer``: ``"adamw"`` (the paper's; two
  parameter-sized moments) or ``"adafactor"`` (optax's: a factored second moment, no
  first moment, no scaling by the parameters' size: the optimizer state is a few rows
  and columns per matrix instead of two copies of the model; what fits a 4B student on
  16 GB chips, see docs/scaling.md). ``b1`` / ``b2`` are AdamW's."""
  lr = optax.linear_schedule(0.0, optim.learning_rate, optim.warmup_steps) \
      if optim.warmup_steps else optim.learning_rate
  name = optim.optimizer
  if name == "adamw":
    opt = optax.adamw(lr, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay)
  elif name == "adafactor":
    opt = optax.adafactor(lr, multiply_by_parameter_scale=False,
                          weight_decay_rate=optim.weight_decay or None)
  else:
    raise ValueError(f"optim.optimizer must be one of {OPTIMIZERS}, got {name!r}")
  if optim.max_grad_norm:
    return optax.chain(optax.clip_by_global_norm(optim.max_grad_norm), opt)
  return opt


def init_state(params, tx: optax.GradientTransformation, handoff: Any = ()) -> TrainState:
  return TrainState(params, tx.init(params), jnp.int32(0), handoff)


def _logprobs(model, traj: Trajectory, temperature: float = 1.0) -> jax.Array:
  """Log-prob of every token of ``traj`` (either layout: the model reads each sequence
  of :func:`model_rows`), in ``traj.tokens``' shape."""
  logp = token_logprobs(model, model_rows(traj.tokens), model_rows(traj.valid),
                        temperature=temperature)
  return logp.reshape(traj.tokens.shape)


def score(graphdef, params, traj: Trajectory, temperature: float = 1.0,
          chunks: int = 1, rows: NamedSharding | None = None) -> jax.Array:
  """Log-prob of every token of ``traj`` under the model (the teacher's scores of the
  student's tokens), 0 off the generated tokens; ``traj.tokens``' shape. The model's
  sequences (:func:`model_rows`: a window layout's turns one by one) go through it in
  ``chunks`` slices, one after another (bounded activations); ``chunks`` must divide
  their number; ``rows`` (:func:`rows_sharding`) places each chunk's sequences."""
  def run(params, tokens, valid):  # sequences [n, S]
    return token_logprobs(nnx.merge(graphdef, params), tokens, valid, temperature=temperature)

  tokens, valid = model_rows(traj.tokens), model_rows(traj.valid)
  if chunks == 1:
    logp = run(params, tokens, valid)
  else:  # params ride in the carry: an NNX module must live in the trace that uses it
    # chunk c holds sequences c, c + chunks, c + 2 chunks, ...: where the rows lie in
    # contiguous blocks over the devices (the batch sharding), every chunk keeps rows on
    # every device instead of a chunk living on a few of them
    part = lambda x: constrain_rows(x.reshape(-1, chunks, x.shape[-1]).swapaxes(0, 1),  # noqa: E731
                                    rows, axis=1)
    _, logp = jax.lax.scan(lambda p, tv: (p, run(p, *tv)), params,
                           (part(tokens), part(valid)))
    logp = logp.swapaxes(0, 1)
  logp = logp.reshape(traj.tokens.shape)
  return jnp.where(traj.gen_mask, jax.lax.stop_gradient(logp), 0.0)


def _grads(loss_fn, params, batch, microbatches: int, summed: bool = False, rows=None):
  """``(loss, metrics), grads`` of ``loss_fn`` on ``batch``, in ``microbatches`` slices of
  its rows one after another (gradient accumulation, in float32), so the activations of
  one slice only are alive at a time.

  ``summed=False``: the mean of the slices' losses and gradients; with row means (the
  ``seq_mean_*`` aggregations) and every row trained this equals the whole batch's
  gradient. ``summed=True``: ``loss_fn`` returns weighted sums (token weights computed
  over the whole batch, :func:`~atod_jax.objectives.aggregation_weights`) and the
  slices' losses, gradients and metrics add up (``*_max`` metrics: their maximum): the
  whole batch's, exactly, whatever the slices. ``rows``: where a slice's rows go
  (:func:`constrain_rows`)."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if microbatches == 1:
    return grad_fn(params, constrain_rows(batch, rows))
  # slice j holds rows j, j + microbatches, ...: where the rows lie in contiguous blocks
  # over the devices (the batch sharding), a slice keeps rows on every device it can
  slices = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, microbatches, *x.shape[1:]), 0, 1),
                        batch)
  slices = constrain_rows(slices, rows, axis=1)

  def add(total, mb):
    (loss, metrics), grads = grad_fn(params, mb)
    total = jax.tree.map(lambda t, g: t + g.astype(jnp.float32), total, grads)
    return total, dict(metrics, loss=loss)

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  total, metrics = jax.lax.scan(add, zeros, slices)
  scale = 1.0 if summed else 1.0 / microbatches
  grads = jax.tree.map(lambda t, p: (t * scale).astype(p.dtype), total, params)
  if summed:
    metrics = {k: jnp.max(v) if k.endswith("_max") else jnp.sum(v) for k, v in metrics.items()}
  else:
    metrics = jax.tree.map(jnp.mean, metrics)
  return (metrics.pop("loss"), metrics), grads


def _minibatch_update(loss_fn, tx, state: TrainState, batch, key, walk: Batches,
                      prepare=None):
  """``walk.epochs`` passes over ``batch`` (a pytree of ``[B, ...]`` arrays) in
  ``walk.minibatches`` shuffled mini-batches (one optimizer step each, its gradient
  accumulated over ``walk.microbatches`` slices); returns the new state and mean
  metrics. ``prepare`` maps a mini-batch to the rows ``loss_fn`` reads, which then
  returns weighted sums (``_grads``' ``summed``)."""
  rows = jax.tree.leaves(batch)[0].shape[0]
  size = rows // walk.minibatches
  order = jnp.concatenate([jax.random.permutation(jax.random.fold_in(key, e), rows)
                           for e in range(walk.epochs)])
  order = order.reshape(walk.epochs * walk.minibatches, size)

  def one(carry, idx):
    params, opt_state = carry
    mb = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), batch)
    if prepare is not None:
      mb = prepare(mb)
    (loss, metrics), grads = _grads(loss_fn, params, mb, walk.microbatches,
                                    summed=prepare is not None, rows=walk.rows)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return (params, opt_state), metrics

  (params, opt_state), metrics = jax.lax.scan(one, (state.params, state.opt_state), order)
  return (state._replace(params=params, opt_state=opt_state, step=state.step + 1),
          jax.tree.map(jnp.mean, metrics))


def _logprobs_and_divergence(model, teacher, tokens, valid, temperature: float,
                             distill: Distill):
  """The student's log-probs of the sequences ``tokens`` ``[N, S]`` and the per-token
  :class:`Distill` divergence from ``teacher``, both from one pass of each model."""
  hidden, _ = model.hidden_states(tokens, None, valid)
  logp = logprobs_from_hidden(hidden, model.unembed_matrix(hidden.dtype), tokens,
                              temperature=temperature)
  t_hidden = jax.lax.stop_gradient(teacher.hidden_states(tokens, None, valid)[0])
  unembed, t_unembed = model.unembed_matrix(hidden.dtype), teacher.unembed_matrix(t_hidden.dtype)
  if unembed.shape[1] != t_unembed.shape[1]:
    raise ValueError(f"the full-vocabulary term needs one vocabulary: the student has "
                     f"{unembed.shape[1]} tokens, the teacher {t_unembed.shape[1]}")

  def chunk(h, g):  # [B, C, H] each -> [B, C]
    s_logits = (h @ unembed).astype(jnp.float32)
    t_logits = jax.lax.stop_gradient((g @ t_unembed).astype(jnp.float32))
    return obj.vocab_divergence(s_logits, t_logits, jnp.ones(h.shape[:2]), distill.kind,
                                beta=distill.beta, chunk_size=None)

  div = map_sequence_chunks(chunk, hidden[:, :-1], t_hidden[:, :-1],
                            chunk_size=distill.chunk_size)
  return logp, jnp.pad(div, ((0, 0), (1, 0)))


def kl_tokens(graphdef, params, teacher_graph, teacher_params, traj: Trajectory,
              chunk_size: int = 512) -> tuple[jax.Array, jax.Array]:
  """The exact per-token divergences between the student (``graphdef``, ``params``) and
  the teacher at every generated token of ``traj``: ``KL(pi_S || pi_T)`` (reverse, what
  on-policy distillation minimises) and ``KL(pi_T || pi_S)`` (forward), each over the
  whole vocabulary of the next-token distributions at temperature 1, at the states the
  episodes visited. Both ``traj.tokens``' shape, float32, 0 off the generated tokens.
  At most ``chunk_size`` positions of both models' logits exist at a time."""
  student, teacher = nnx.merge(graphdef, params), nnx.merge(teacher_graph, teacher_params)
  tokens, valid = model_rows(traj.tokens), model_rows(traj.valid)
  hidden = student.hidden_states(tokens, None, valid)[0]
  t_hidden = teacher.hidden_states(tokens, None, valid)[0]
  unembed = student.unembed_matrix(hidden.dtype)
  t_unembed = teacher.unembed_matrix(t_hidden.dtype)
  if unembed.shape[1] != t_unembed.shape[1]:
    raise ValueError(f"the KL needs one vocabulary: the student has {unembed.shape[1]} "
                     f"tokens, the teacher {t_unembed.shape[1]}")

  def chunk(h, g):  # [N, C, H] each -> [N, C, 2]
    s_logits, t_logits = (h @ unembed).astype(jnp.float32), (g @ t_unembed).astype(jnp.float32)
    one = lambda kind: obj.vocab_divergence(s_logits, t_logits, jnp.ones(h.shape[:2]),  # noqa: E731
                                            kind, chunk_size=None)
    return jnp.stack([one("reverse_kl"), one("forward_kl")], axis=-1)

  size = chunk_positions(hidden.shape[0], unembed.shape[1], chunk_size)
  both = map_sequence_chunks(chunk, hidden[:, :-1], t_hidden[:, :-1], chunk_size=size)
  both = jnp.pad(both, ((0, 0), (1, 0), (0, 0))).reshape(traj.tokens.shape + (2,))
  both = jnp.where(traj.gen_mask[..., None], both, 0.0)
  return both[..., 0], both[..., 1]


def turn_kl_sums(graphdef, params, teacher_graph, teacher_params, traj: Trajectory,
                 max_turns: int) -> dict[str, jax.Array]:
  """:func:`kl_tokens` reduced per turn: for each turn index ``k < max_turns``, the sum
  over the batch's valid episodes of that turn's token-mean reverse / forward KL
  (``reverse`` / ``forward``, ``[max_turns]``) and how many episodes generated tokens in
  that turn (``turns``): sums that add up over evaluation batches and processes."""
  reverse, forward = kl_tokens(graphdef, params, teacher_graph, teacher_params, traj)
  mask = trained_mask(traj)
  turn = jnp.where(mask, flat(traj.turn_ids), -1)
  onehot = (turn[..., None] == jnp.arange(max_turns)).astype(jnp.float32)  # [B, L, K]
  count = jnp.sum(onehot, axis=1)  # tokens of each (episode, turn)
  has = count > 0

  def per_turn(x):  # [B, L] -> [K]: sum over episodes of the turn's token mean
    sums = jnp.einsum("bl,blk->bk", flat(x), onehot)
    return jnp.sum(jnp.where(has, sums / jnp.maximum(count, 1.0), 0.0), axis=0)
  return {"reverse": per_turn(reverse), "forward": per_turn(forward),
          "turns": jnp.sum(has, axis=0).astype(jnp.float32)}


def add_sums(total: dict | None, part: dict) -> dict:
  """``total + part`` item by item, on the host (``total=None``: ``part``)."""
  part = {k: np.asarray(v, np.float64) for k, v in jax.device_get(part).items()}
  return part if total is None else {k: total[k] + part[k] for k in total}


def kl_metrics(sums: dict) -> dict[str, float]:
  """Evaluation metrics from :func:`turn_kl_sums` added over batches: ``kl_reverse`` and
  ``kl_forward``, the mean over every (episode, turn) of the turn's token-mean KL, and
  ``kl_reverse_turn<k>``, the mean over the episodes that reached turn ``k``."""
  turns = np.asarray(sums["turns"], np.float64)
  n = max(float(turns.sum()), 1.0)
  out = {"kl_reverse": float(np.sum(sums["reverse"])) / n,
         "kl_forward": float(np.sum(sums["forward"])) / n}
  for k in np.flatnonzero(turns):
    out[f"kl_reverse_turn{k}"] = float(sums["reverse"][k] / turns[k])
  return out


class AdvantageSpec(NamedTuple):
  """What a method's per-token advantages are made of (static; see
  :func:`advantages`)."""

  tdur_mode: str
  estimator: str
  num_groups: int
  max_turns: int
  rl: str = "episode"  # methods.RL_ADVANTAGES
  gigpo: tuple[float, float, str] = (0.95, 1.0, "mean")  # gamma, step weight, norm
  signal: str = "sampled"  # methods.OPD_SIGNALS
  opd_clip: float = 0.0  # the sampled signal clamped to [-c, c]; 0: off


def advantages(traj: Trajectory, teacher_logp: jax.Array, kappa, rho, spec: AdvantageSpec):
  """The ATOD per-token advantages (``traj.tokens``' shape), the per-token weights of the
  full-vocabulary term (None unless ``spec.signal = "full_vocab"``) and diagnostics.

  ``adv = kappa * w_k * (log pi_T - log pi_old) + rho * A``. ``A`` is the episode's group
  advantage ``A_i``, or with ``spec.rl = "gigpo"`` GiGPO's ``A_i + omega * A^S_{i,k}``
  (the step-level advantage of the turn's anchor-state group). With the full-vocabulary
  signal the first term leaves the advantage and ``kappa * w_k`` weighs the divergence
  loss instead. Everything per trajectory (T-DUR's weights, the token means) sees the
  whole row."""
  mask, behaviour = trained_mask(traj), flat(traj.behaviour_logp)
  teacher_logp = flat(teacher_logp)
  raw = obj.opd_signal(teacher_logp, behaviour, mask)
  dlogp = obj.opd_signal(teacher_logp, behaviour, mask, clip=spec.opd_clip or None)
  weights = obj.tdur_weights(behaviour, teacher_logp, flat(traj.turn_ids), mask,
                             mode=spec.tdur_mode, max_turns=spec.max_turns)
  a_traj = obj.group_advantages(traj.rewards, traj.group_ids, spec.num_groups, spec.estimator,
                                valid=traj.row_valid)
  tok = lambda x: obj.aggregate_tokens(x, mask, "token_mean")  # noqa: E731
  metrics = {"kappa": kappa, "rho": rho, "opd_signal": tok(raw), "turn_weight": tok(weights),
             "disagreement": tok(jnp.abs(raw)), "uncertainty": tok(-behaviour),
             "opd_clipped": tok((dlogp != raw).astype(jnp.float32)),
             "abs_group_adv": jnp.mean(jnp.abs(a_traj))}
  rl = a_traj
  if spec.rl == "gigpo":
    gamma, omega, norm = spec.gigpo
    a_step = obj.step_advantages(traj.turn_rewards, traj.anchors, traj.group_ids,
                                 traj.num_turns, gamma=gamma, norm=norm, valid=traj.row_valid)
    step_tok = obj.turn_values(a_step, flat(traj.turn_ids))
    rl = a_traj[:, None] + omega * step_tok
    metrics["abs_step_adv"] = tok(jnp.abs(step_tok))
  distill = None
  if spec.signal == "full_vocab":
    distill = (kappa * weights * mask).reshape(traj.tokens.shape)
    kappa = 0.0
  adv = obj.atod_advantages(dlogp, weights, rl, mask, kappa, rho)
  return adv.reshape(traj.tokens.shape), distill, metrics


def policy_update(graphdef, tx, state: TrainState, traj: Trajectory, adv: jax.Array, key,
                  loss: PolicyLoss, walk: Batches, distill: Distill | None = None,
                  teacher_graph=None, teacher_params=None, distill_weights=None):
  """One clipped-surrogate update (all mini-batches and epochs) on a rollout batch; with
  ``distill``, plus the full-vocabulary divergence from the teacher weighted per token
  by ``distill_weights`` (``traj.tokens``' shape, e.g. kappa x T-DUR weight) and
  aggregated as the surrogate is.

  Each mini-batch becomes its model sequences (:func:`model_rows`: a window layout's
  turns one by one) with the per-token weights of ``loss.aggregation`` over the whole
  mini-batch (:func:`~atod_jax.objectives.aggregation_weights`), so the
  ``walk.microbatches`` slices are slices of sequences, not of episodes: a slice can be
  smaller than an episode and the accumulated gradient is the mini-batch's, exactly."""
  def prepare(mb):  # a mini-batch of episodes -> its sequences and their token weights
    traj, adv, dw = mb
    mask = trained_mask(traj)
    shape = traj.tokens.shape
    w = obj.aggregation_weights(mask, loss.aggregation).reshape(shape)
    w_mean = obj.aggregation_weights(mask, "token_mean").reshape(shape)
    seq = dict(tokens=traj.tokens, valid=traj.valid, old=traj.behaviour_logp, adv=adv, w=w,
               w_mean=w_mean)
    if distill is not None:
      seq["dw"] = dw
    return {k: model_rows(v) for k, v in seq.items()}

  def loss_fn(params, seq):  # weighted sums over a slice of sequences
    model = nnx.merge(graphdef, params)
    if distill is None:
      logp = token_logprobs(model, seq["tokens"], seq["valid"], temperature=loss.temperature)
    else:
      logp, div = _logprobs_and_divergence(
          model, nnx.merge(teacher_graph, teacher_params), seq["tokens"], seq["valid"],
          loss.temperature, distill)
    w, w_mean = seq["w"], seq["w_mean"]
    t = obj.clipped_token_terms(logp, seq["old"], seq["adv"], w_mean > 0, loss.clip_eps,
                                clip_eps_high=loss.clip_eps_high or None,
                                dual_clip=loss.dual_clip or None)
    value = obj.weighted_sum(t.loss, w)  # clipped_policy_loss's terms, weighted sums
    metrics = obj.clip_metrics(t, w_mean)
    if distill is not None:
      term = obj.weighted_sum(seq["dw"] * div, w)
      value = value + term
      metrics = dict(metrics, divergence=obj.weighted_sum(div, w_mean), distill_loss=term)
    return value, metrics

  # without the term, a row-shaped placeholder (mini-batches slice every leaf)
  weights = jnp.zeros(adv.shape[:1]) if distill_weights is None else distill_weights
  return _minibatch_update(loss_fn, tx, state, (traj, adv, weights), key, walk, prepare)


def sft_update(graphdef, tx, state: TrainState, traj: Trajectory, key, walk: Batches):
  """Behaviour cloning: maximise the log-likelihood of the generated (expert) tokens."""
  def loss_fn(params, traj):
    logp = _logprobs(nnx.merge(graphdef, params), traj)
    nll = -obj.aggregate_tokens(flat(logp), flat(traj.gen_mask), "seq_mean_token_mean")
    return nll, {}

  return _minibatch_update(loss_fn, tx, state, traj, key, walk)


class UpdateSpec(NamedTuple):
  """What is static about one update (hashable: :data:`jit_atod_update` compiles once a
  spec and batch shape). ``loss=None``: behaviour cloning (the ``sft`` method, the
  student's warm start, the teacher's build)."""

  graphdef: Any  # the student's NNX structure
  tx: optax.GradientTransformation
  walk: Batches
  loss: PolicyLoss | None = None
  advantage: AdvantageSpec | None = None
  distill: Distill | None = None  # the full-vocabulary term
  teacher_graph: Any = None  # its teacher's structure
  handoff: tuple[float, float] | None = None  # the adaptive hand-off's (decay, tol)


def atod_update(spec: UpdateSpec, state: TrainState, batch: Trajectory, key: jax.Array,
                teacher_logp: jax.Array | None = None, kappa=0.0, rho=0.0,
                teacher_params=None) -> tuple[TrainState, dict]:
  """One update of the student on a packed rollout batch: the ATOD advantages
  ``kappa * w_k * (log pi_T - log pi_old) + rho * A`` from the teacher's scores of the
  sampled tokens (:func:`advantages`), the adaptive hand-off's trigger fed this step's
  disagreement, then every mini-batch and epoch of the clipped surrogate (plus the
  full-vocabulary term) with AdamW (:func:`policy_update`). Returns the new state and
  the step's metrics. Every update of a run goes through here, jitted once a spec."""
  if spec.loss is None:
    return sft_update(spec.graphdef, spec.tx, state, batch, key, spec.walk)
  adv, distill_weights, metrics = advantages(batch, teacher_logp, kappa, rho, spec.advantage)
  handoff = state.handoff
  if spec.handoff is not None:  # this step's disagreement folded in (TIDE's trigger)
    handoff = obj.handoff_update(handoff, metrics["disagreement"], *spec.handoff)
    metrics = {**metrics, "handoff_ema": handoff.ema, "handoff_start": handoff.start}
  state, upd = policy_update(spec.graphdef, spec.tx, state, batch, adv, key, spec.loss,
                             spec.walk, spec.distill, spec.teacher_graph, teacher_params,
                             distill_weights)
  return state._replace(handoff=handoff), {**metrics, **upd}


# Jitted entry points: the spec (model structure, optimizer, settings records) is static;
# the state is donated (updated in place). Together: a multi-process run's processes
# start each newly compiled program together.
jit_atod_update = Together(jax.jit(atod_update, static_argnums=(0,), donate_argnums=(1,)))
jit_score = Together(jax.jit(score, static_argnums=(0,),
                             static_argnames=("temperature", "chunks", "rows")))
jit_turn_kl_sums = Together(jax.jit(turn_kl_sums, static_argnums=(0, 2, 5)))
