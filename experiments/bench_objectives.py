"""Micro-benchmark of the ATOD objective under jit.

Times the full model-free objective of one update (group advantages + OPD signal +
T-DUR weights + kappa/rho at a traced step + ATOD advantages + clipped loss + its
gradient w.r.t. the policy log-probs) on a realistic padded multi-turn batch, each
part on its own, and relates it to the matmul ceiling measured in the same run: the
model's forward+backward on the same tokens costs at least 6 * params * tokens FLOPs.

    python experiments/bench_objectives.py                   # batch 256 x 2048
    python experiments/bench_objectives.py --batch 64 --length 512 --repeats 20

Prints a markdown table.
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from atod_jax import objectives as obj


def realistic_batch(batch: int, length: int, group_size: int, seed: int = 0):
  """Rows of prompt, then turns of ~48 generated tokens between ~32 observation tokens."""
  rng = np.random.default_rng(seed)
  pos = np.arange(length)[None, :] + rng.integers(0, 64, (batch, 1))
  period, gen = 80, 48
  in_turn = (pos % period) >= (period - gen)
  turn_ids = np.where(in_turn, pos // period, -1).astype(np.int32)
  ends = rng.integers(length // 2, length + 1, (batch, 1))  # ragged episode lengths
  turn_ids[np.arange(length)[None, :] >= ends] = -1
  mask = (turn_ids >= 0).astype(np.float32)
  behaviour = -rng.exponential(1.0, (batch, length)).astype(np.float32)
  teacher = np.minimum(behaviour + rng.normal(0, 0.5, (batch, length)), 0).astype(np.float32)
  logp = (behaviour + rng.normal(0, 0.1, (batch, length))).astype(np.float32)
  rewards = rng.integers(0, 2, batch).astype(np.float32)
  group_ids = (np.arange(batch) // group_size).astype(np.int32)
  max_turns = int(turn_ids.max()) + 1
  return dict(logp=logp, behaviour_logp=behaviour, teacher_logp=teacher, mask=mask,
              turn_ids=turn_ids, rewards=rewards, group_ids=group_ids), max_turns


def timeit(fn, *args, repeats: int) -> float:
  """Median seconds per call after one compile+warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def matmul_ceiling(n: int = 2048, repeats: int = 20) -> float:
  """Achieved f32 GFLOP/s of an n x n matmul on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  return 2 * n**3 / timeit(f, a, repeats=repeats) / 1e9


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--length", type=int, default=2048)
  ap.add_argument("--group-size", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--vocab", type=int, default=8192, help="for the vocab-divergence row")
  args = ap.parse_args()

  ceiling = matmul_ceiling()  # first, on an idle machine
  bt, max_turns = realistic_batch(args.batch, args.length, args.group_size)
  bt = jax.device_put(bt)
  num_groups = args.batch // args.group_size
  sched = obj.annealing_schedules()
  tokens = args.batch * args.length
  gen_tokens = int(np.asarray(bt["mask"]).sum())

  def objective(logp, b, step, k_turns):
    a_traj = obj.group_advantages(b["rewards"], b["group_ids"], num_groups)
    dlogp = obj.opd_signal(b["teacher_logp"], b["behaviour_logp"], b["mask"])
    w = obj.tdur_weights(b["behaviour_logp"], b["teacher_logp"], b["turn_ids"], b["mask"],
                         max_turns=k_turns)
    adv = obj.atod_advantages(dlogp, w, a_traj, b["mask"], sched.kappa(step), sched.rho(step))
    return obj.clipped_policy_loss(logp, b["behaviour_logp"], adv, b["mask"])

  def full(logp, b, step, k_turns):
    (loss, metrics), grad = jax.value_and_grad(
        lambda lp: objective(lp, b, step, k_turns), has_aux=True)(logp)
    return loss, metrics, grad

  step = jnp.int32(40)
  rows = []

  def add(name, fn, *fargs, note=""):
    sec = timeit(jax.jit(fn), *fargs, repeats=args.repeats)
    rows.append((name, sec * 1e3, tokens / sec / 1e6, note))
    return sec

  t_full = add("full objective + grad (max_turns = L)",
               functools.partial(full, k_turns=None), bt["logp"], bt, step)
  add(f"full objective + grad (max_turns = {max_turns})",
      functools.partial(full, k_turns=max_turns), bt["logp"], bt, step)
  add("group_advantages (grpo)",
      lambda b: obj.group_advantages(b["rewards"], b["group_ids"], num_groups), bt)
  add("opd_signal", lambda b: obj.opd_signal(b["teacher_logp"], b["behaviour_logp"], b["mask"]), bt)
  add(f"tdur_weights soft_or (max_turns = {max_turns})",
      lambda b: obj.tdur_weights(b["behaviour_logp"], b["teacher_logp"], b["turn_ids"],
                                 b["mask"], max_turns=max_turns), bt)
  def advantages(b):
    a_traj = obj.group_advantages(b["rewards"], b["group_ids"], num_groups)
    dlogp = obj.opd_signal(b["teacher_logp"], b["behaviour_logp"], b["mask"])
    w = obj.tdur_weights(b["behaviour_logp"], b["teacher_logp"], b["turn_ids"], b["mask"],
                         max_turns=max_turns)
    return obj.atod_advantages(dlogp, w, a_traj, b["mask"], sched.kappa(step), sched.rho(step))

  adv = jax.jit(advantages)(bt)
  add("clipped_policy_loss + grad",
      jax.grad(lambda lp, b, a: obj.clipped_policy_loss(lp, b["behaviour_logp"], a,
                                                        b["mask"])[0]), bt["logp"], bt, adv)

  # Optional GKD-style path: full-vocabulary JSD from logits (fwd + bwd), 8 rows.
  vb = min(8, args.batch)
  key1, key2 = jax.random.split(jax.random.key(1))
  s_logits = jax.random.normal(key1, (vb, args.length, args.vocab), jnp.float32)
  t_logits = jax.random.normal(key2, (vb, args.length, args.vocab), jnp.float32)
  vmask = bt["mask"][:vb]
  div_sec = timeit(jax.jit(jax.grad(lambda s, t, m: jnp.sum(obj.vocab_divergence(
      s, t, m, "jsd", chunk_size=256)))), s_logits, t_logits, vmask,
                   repeats=max(3, args.repeats // 3))
  rows.append((f"vocab_divergence jsd + grad ({vb} x {args.length} x V={args.vocab})",
               div_sec * 1e3, vb * args.length / div_sec / 1e6, "GKD path, needs logits"))

  dev = jax.devices()[0]
  print(f"\ndevice: {dev.platform} ({dev.device_kind}), jax {jax.__version__}; "
        f"batch {args.batch} x {args.length} tokens ({gen_tokens / tokens:.0%} generated), "
        f"{num_groups} groups of {args.group_size}, up to {max_turns} turns per row\n")
  print("| part | ms / call | M tokens/s | note |")
  print("|---|---:|---:|---|")
  for name, ms, mtok, note in rows:
    print(f"| {name} | {ms:.2f} | {mtok:.3g} | {note} |")

  print(f"\nf32 matmul ceiling measured in this run: {ceiling:.0f} GFLOP/s")
  print("\nShare of a training step taken by the objective, if the model's forward+backward "
        "(>= 6 * params * tokens FLOPs) ran at that ceiling (an upper bound of the share):\n")
  print("| model | params | model fwd+bwd at ceiling (s) | objective share |")
  print("|---|---:|---:|---:|")
  for name, params in (("workload W (Qwen3-shaped, tiny)", 7.2e6),
                       ("Qwen3-0.6B", 0.6e9), ("Qwen3-4B", 4.0e9)):
    model_s = 6 * params * tokens / (ceiling * 1e9)
    print(f"| {name} | {params / 1e6:.1f}M | {model_s:.3g} | "
          f"{t_full / (t_full + model_s):.3%} |")


if __name__ == "__main__":
  main()
