"""Profile of one training step of a config: rollout, teacher scoring, advantages and
update, each timed on its own after compilation, with their shares and tokens/s.

    python experiments/bench_train_step.py                     # configs/quickstart.py
    python experiments/bench_train_step.py --config configs/quickstart.py --repeats 5

The models are freshly initialised (their speed does not depend on their weights, but
the episode lengths do: an untrained student plays every episode to the turn limit, the
slowest case, and that is what is measured).
"""
from __future__ import annotations

import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from atod_jax.models import ModelConfig
from atod_jax.models import checkpoint as model_io
from atod_jax.rollout import pack, summarize, trim
from atod_jax.sampling import SamplingParams
from atod_jax.train.config import validate
from atod_jax.train.methods import make_update
from atod_jax.train.sources.device import DeviceSource, rollout_fn, task_keys
from atod_jax.train.steps import UpdateSpec, advantages, jit_atod_update, jit_score

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", "config")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed repetitions (after one warm-up)")


def _time(fn, repeats):
  out = jax.block_until_ready(fn(0))  # compile + warm up
  t0 = time.perf_counter()
  for i in range(repeats):
    out = jax.block_until_ready(fn(i + 1))
  return (time.perf_counter() - t0) / repeats, out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  validate(config)
  r, opt = config.rollout, config.optim
  spec = DeviceSource(config).spec
  graphdef, params = model_io.fresh(ModelConfig(**config.student.model), jax.random.key(0))
  t_graph, t_params = model_io.fresh(ModelConfig(**config.teacher.model), jax.random.key(1))
  roll = rollout_fn(graphdef, spec, "train", SamplingParams(r.temperature))
  keys, groups = task_keys(jax.random.key(2), r.tasks_per_step, r.group_size)
  rows = r.tasks_per_step * r.group_size

  t_roll, traj = _time(lambda i: roll(params, keys, jax.random.key(i), groups), _REPEATS.value)
  packed = trim(pack(traj))
  t_pack, _ = _time(lambda i: trim(pack(traj)), _REPEATS.value)
  t_score, t_logp = _time(lambda i: jit_score(t_graph, t_params, packed), _REPEATS.value)
  upd = make_update(config, config.method, graphdef, max_turns=spec.max_turns)
  # the advantages alone (a part of the update, timed apart here)
  adv_only = jax.jit(advantages, static_argnums=(4,))
  t_adv, _ = _time(lambda i: adv_only(packed, t_logp, upd.sched.kappa(i), upd.sched.rho(i),
                                      upd.advantage), _REPEATS.value)
  state = [upd.init(params)]
  _, walk = upd.slicing(packed)
  spec_ = UpdateSpec(graphdef, upd.tx, walk, upd.loss, upd.advantage)

  def update(i):
    state[0], m = jit_atod_update(spec_, state[0], packed, jax.random.key(i), t_logp,
                                  upd.sched.kappa(i), upd.sched.rho(i))
    return m
  t_upd, _ = _time(update, _REPEATS.value)

  total = t_roll + t_pack + t_score + t_upd
  gen = int(traj.num_tokens)
  m = summarize(traj)
  print(f"{jax.devices()[0].device_kind}, {len(jax.devices())} device(s); {rows} episodes "
        f"({r.tasks_per_step} tasks x {r.group_size}), {float(m['turns']):.1f} turns each, "
        f"{gen} generated tokens; layout {spec.length} slots, packed to "
        f"{packed.tokens.shape[1]}")
  print()
  print("| part | ms | share |")
  print("|---|---:|---:|")
  for name, t in (("rollout (student sampling + env, one jit)", t_roll),
                  ("pack + trim", t_pack), ("teacher scoring", t_score),
                  (f"update: advantages + {opt.minibatches} minibatches x {opt.epochs} "
                   "epochs (atod_update)", t_upd),
                  ("of which the advantages (GRPO + OPD + T-DUR), jitted alone", t_adv)):
    print(f"| {name} | {t * 1e3:.0f} | {t / total:.0%} |")
  print(f"| **step** | **{total * 1e3:.0f}** | |")
  print()
  print(f"generated tokens/s over the step: {gen / total:.0f}; rollout alone: "
        f"{gen / t_roll:.0f} generated tokens/s")


if __name__ == "__main__":
  app.run(main)
