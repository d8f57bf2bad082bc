"""Environment steps per second: the on-device household family (vmapped, jitted) at
several batch sizes, and the same tasks through the host text protocol.

    python experiments/bench_envs.py
    python experiments/bench_envs.py --preset hard --batches 1024 16384 131072
    python experiments/bench_envs.py --real-only   # ALFWorld, WebShop, Search-QA, TextWorld, ScienceWorld
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from atod_jax.envs import household as hh
from atod_jax.envs.household_text import HouseholdTextEnv, task_key
from atod_jax.scaling.measure import best_time

TURNS = 32


def device_rates(params, batch):
  keys = jax.vmap(lambda i: task_key(0, i))(jnp.arange(batch))
  states = jax.jit(jax.vmap(lambda k: hh.reset(params, k, "train")))(keys)
  # a table of well-formed commands naming things in each room (many will not apply)
  rng = np.random.default_rng(0)
  verb = jnp.asarray(rng.integers(0, len(hh.VERBS), (TURNS, batch)))
  obj = jnp.asarray(rng.integers(0, params.num_objects, (TURNS, batch)))
  rec = jnp.asarray(rng.integers(0, params.num_receptacles, (TURNS, batch)))
  actions = jax.jit(jax.vmap(jax.vmap(hh.action_tokens), in_axes=(None, 0, 0, 0)))(
      states, verb, obj, rec)
  step = jax.vmap(functools.partial(hh.step, params))
  observe = jax.vmap(functools.partial(hh.observe, params))

  @jax.jit
  def run_step(st, acts):
    return jax.lax.scan(lambda s, a: (step(s, a)[0], None), st, acts)[0].turn

  @jax.jit
  def run_step_observe(st, acts):
    def body(s, a):
      s, out = step(s, a)
      return s, observe(s, out.event)[:, 0]
    return jax.lax.scan(body, st, acts)[1]

  @jax.jit
  def run_expert(st):
    def body(s, _):
      s, out = step(s, jax.vmap(hh.expert_action)(s))
      return s, out.reward
    return jax.lax.scan(body, st, None, length=TURNS)[1]

  n = TURNS * batch
  return {
      "step": n / best_time(lambda: run_step(states, actions)),
      "step + observe (tokens)": n / best_time(lambda: run_step_observe(states, actions)),
      "expert policy + step": n / best_time(lambda: run_expert(states)),
  }


def host_rate(params, batch, admissible):
  env = HouseholdTextEnv(params, seed=0, with_admissible=admissible)
  out = env.reset("train", list(range(batch)))
  env.step(out.expert)  # compile
  steps, t0 = 0, time.perf_counter()
  out = env.reset("train", list(range(batch)))
  while not out.dones.all() and steps < 30:
    out = env.step([e or "look" for e in out.expert])
    steps += 1
  return steps * batch / (time.perf_counter() - t0)


def pool_rates(factory, split: str, ids: list[int], workers: int, rounds: int = 2):
  """One environment through the worker pool with its expert: pool start-up seconds,
  reset seconds per batch, expert steps/s (summed over live episodes)."""
  from atod_jax.envs.pool import EnvPool
  t_start = time.perf_counter()
  with EnvPool(factory, num_workers=workers, step_timeout=300.0, start_timeout=600.0) as pool:
    start = time.perf_counter() - t_start  # worker processes up, data / indexes loaded
    resets, steps, t_steps = [], 0, 0.0
    for _ in range(rounds):
      t0 = time.perf_counter()
      out = pool.reset(split, ids)
      resets.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      while not out.dones.all():
        steps += int((~out.dones).sum())
        out = pool.step([None if d else (e or "look") for d, e in zip(out.dones, out.expert)])
      t_steps += time.perf_counter() - t0
    assert not out.aborted.any(), pool.stats
    return start, min(resets), steps / t_steps, float(out.wons.mean())


def real_envs():
  """(name, factory, split, task ids, what) of each installed real environment."""
  from atod_jax.envs import searchqa as sq
  rows = []
  try:
    import bm25s  # noqa: F401
    rows.append(("Search-QA", functools.partial(sq.hotpot_sample_env), "train",
                 list(range(16)), "HotpotQA sample, BM25 top-3"))
    import rapidfuzz  # noqa: F401
    from atod_jax.envs import webshop as ws
    rows.append(("WebShop", functools.partial(ws.webshop_env), "test", list(range(16)),
                 "1k products, scripted buyer"))
  except ImportError:
    print("Search-QA / WebShop skipped: install the `search` and `webshop` extras")
  try:
    from atod_jax.envs import textgames as tg
    import alfworld  # noqa: F401
    env = tg.AlfWorldEnv()
    types = env.task_types("valid_seen")
    ids = [types.index(t) for t in tg.ALFWORLD_TASK_TYPES.values()]
    rows.append(("ALFWorld", functools.partial(tg.alfworld_env), "valid_seen", ids + ids[:2],
                 "one game per task type + 2, planner expert"))
    rows.append(("TextWorld", functools.partial(tg.textworld_env), "train", list(range(8)),
                 "tw-cooking 1 ingredient (cached games)"))
  except (ImportError, FileNotFoundError) as e:
    print(f"ALFWorld / TextWorld skipped: {e}")
  try:
    from atod_jax.envs import scienceworld as sw
    rows.append(("ScienceWorld", functools.partial(
        sw.scienceworld_env, tasks=("find-living-thing", "use-thermometer"), max_variations=4),
        "train", list(range(8)), "2 tasks x 4 variations, gold paths"))
  except ImportError:
    print("ScienceWorld skipped: install the `scienceworld` extra")
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="medium", choices=("easy", "medium", "hard"))
  ap.add_argument("--batches", type=int, nargs="+", default=[1024, 8192, 65536])
  ap.add_argument("--real-only", action="store_true", help="only the real environments")
  args = ap.parse_args()
  params = hh.HouseholdParams.preset(args.preset)
  dev = jax.devices()[0]
  print(f"device: {dev.platform} ({dev.device_kind}), jax {jax.__version__}; preset "
        f"{args.preset} ({params.num_receptacles} receptacles, {params.num_objects} objects); "
        f"{TURNS} steps per timed call\n")
  if args.real_only:
    return real_table()
  print("| batch | step (steps/s) | step + observe | expert + step |")
  print("|---:|---:|---:|---:|")
  for b in args.batches:
    r = device_rates(params, b)
    print(f"| {b} | {r['step']:.3g} | {r['step + observe (tokens)']:.3g} | "
          f"{r['expert policy + step']:.3g} |")
  print("\nHost text protocol (HouseholdTextEnv, expert commands, text in / text out):\n")
  print("| batch | admissible list | steps/s |")
  print("|---:|---|---:|")
  for b in (1, 16, 64):
    for adm in (False, True):
      print(f"| {b} | {'yes' if adm else 'no'} | {host_rate(params, b, adm):.0f} |")
  real_table()


def real_table():
  print("\nReal environments through the worker pool (expert play; reset = one batch; "
        "steps/s summed over episodes):\n")
  print("| env | what | episodes | workers | pool start (s) | reset (s) | steps/s | expert won |")
  print("|---|---|---:|---:|---:|---:|---:|---:|")
  for name, factory, split, ids, what in real_envs():
    for w in (1, 2):
      start, reset, rate, won = pool_rates(factory, split, ids, w)
      print(f"| {name} | {what} | {len(ids)} | {w} | {start:.1f} | {reset:.2f} | {rate:.0f} | "
            f"{won:.2f} |", flush=True)


if __name__ == "__main__":
  main()
