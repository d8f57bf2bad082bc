"""Is the built teacher reliably good? Builds it with several seeds and reports each one's
success on the run's report split, under the run's evaluation protocol.

    python experiments/teacher_seeds.py                          # quickstart, seeds 0-4
    python experiments/teacher_seeds.py --config configs/quickstart.py --seeds 0,1,2 \\
        --config.teacher.build.sft_steps=150

Each build lives in ``<workdir>/seed_<s>`` (a finished one is reused). Prints a table:
the step the selection kept, its success on the selection split, and the teacher's
``eval/success`` (and greedy) on the report split.
"""
from __future__ import annotations

import os
import time

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from atod_jax.cache import use_compilation_cache
from atod_jax.models.sharding import make_mesh
from atod_jax.train import evaluation, validate
from atod_jax.train.sources import make_source
from atod_jax.train.teacher import get_teacher

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", "config")
_WORKDIR = flags.DEFINE_string("workdir", "runs/teacher_seeds", "where the builds go")
_SEEDS = flags.DEFINE_string("seeds", "0,1,2,3,4", "comma-separated build seeds")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  use_compilation_cache()
  base = _CONFIG.value
  validate(base)
  rows = []
  for seed in [int(s) for s in _SEEDS.value.split(",")]:
    config = base.copy_and_resolve_references()
    config.teacher.build.seed = seed
    config.teacher.cache_dir = ""
    workdir = os.path.abspath(os.path.join(_WORKDIR.value, f"seed_{seed}"))
    source = make_source(config, workdir, make_mesh(-1, 1, 1), say=lambda *a: None)
    try:
      t0 = time.perf_counter()
      graphdef, params, _, info = get_teacher(config, source, workdir, say=lambda *a: None)
      metrics = evaluation.teacher_metrics(config, graphdef, params, source, info, workdir)
      seconds = time.perf_counter() - t0
    finally:
      source.close()
    chosen = info.get("selection", {}).get("chosen", {})
    rows.append((seed, chosen, metrics, info.get("build_seconds", seconds)))
    print(f"seed {seed}: {metrics.get('eval/success'):.3f}", flush=True)
  b, e = base.teacher.build, base.eval
  print(f"\n{b.sft_steps} behaviour-cloning steps on {b.demo_episodes} expert episodes "
        f"(noise {b.expert_noise}), selection every {b.get('select_every', 0)} steps on "
        f"{b.get('select_episodes', 0)} episodes of {e.select_split or 'the train split'!r}; "
        f"report: {e.episodes} episodes at T={e.temperature}\n")
  print("| build seed | kept step | selection success | eval/success | greedy/success | "
        "eval/invalid_rate | build s |")
  print("|---:|---:|---:|---:|---:|---:|---:|")
  for seed, chosen, m, secs in rows:
    greedy = m.get("greedy/success", float("nan"))
    print(f"| {seed} | {chosen.get('step', '-')} | {chosen.get('success', float('nan')):.3f} | "
          f"{m['eval/success']:.3f} | {greedy:.3f} | {m['eval/invalid_rate']:.3f} | "
          f"{secs:.0f} |")
  success = np.array([m["eval/success"] for _, _, m, _ in rows])
  print(f"\nmin {success.min():.3f}, mean {success.mean():.3f} over {len(rows)} seeds")


if __name__ == "__main__":
  app.run(main)
