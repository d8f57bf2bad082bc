"""What shapes plain on-policy distillation (``--config.method=opd``): one factor at a time.

    python experiments/opd_factors.py --config configs/quickstart.py --workdir runs/opd_factors \
        --factors lr,opd_clip --seeds 0,1,2,3,4 --config.train.steps=40

Every variant is the base config (``--config`` and its overrides) with the factor's
fields changed; each is trained with ``opd`` over the seeds, all with the same teacher
(built once in ``<workdir>/teacher``) and the same evaluation episodes. A variant whose
settings equal another's (the defaults, in every factor) is run once and reused. Prints
and writes ``<workdir>/factors.md``: per factor and variant, the mean held-out success
along training, the final one with a 95% bootstrap interval, the lowest seed (a
collapse shows there), the exact KL(student || teacher) on the evaluation episodes
(``eval/kl_reverse``: the imitation measure that is not the training signal), and the
update's mean gradient norm and share of clipped signal tokens.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from atod_jax.cache import use_compilation_cache
from atod_jax.train.compare import bootstrap_interval, run_methods

# factor -> [(variant name, {field: value})]; the first variant of each is the default
FACTORS = {
    "lr": [("lr 5e-4 (default)", {}), ("lr 2e-3 (4x)", {"optim.learning_rate": 2e-3})],
    "opd_clip": [("no clip (paper)", {}), ("clip 2", {"objective.opd_clip": 2.0}),
                 ("clip 2, lr 2e-3", {"objective.opd_clip": 2.0, "optim.learning_rate": 2e-3})],
    "grad_clip": [("max_grad_norm 1 (default)", {}),
                  ("max_grad_norm 0 (off)", {"optim.max_grad_norm": 0.0})],
    "temperature": [("rollout T 1.0 (default)", {}),
                    ("rollout T 0.7", {"rollout.temperature": 0.7})],
    "minibatches": [("4 mini-batches (default)", {}),
                    ("1 mini-batch", {"optim.minibatches": 1})],
    "aggregation": [("seq-mean token-mean (default)", {}),
                    ("token-mean", {"objective.aggregation": "token_mean"})],
    "signal": [("sampled (paper)", {}),
               ("full-vocabulary reverse KL", {"objective.opd_signal": "full_vocab",
                                               "objective.divergence_beta": 1.0})],
}

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", "base config")
_WORKDIR = flags.DEFINE_string("workdir", None, "where the runs and the tables go")
_FACTORS = flags.DEFINE_string("factors", ",".join(FACTORS), "comma-separated factors")
_SEEDS = flags.DEFINE_string("seeds", "0,1,2,3,4", "comma-separated seeds")
_VARIANTS = flags.DEFINE_string("variants", "", "comma-separated indices of the variants of "
                                "each factor to run, in that order (default: all; 0 is the "
                                "default setting)")
flags.mark_flag_as_required("workdir")


def _variant_dir(workdir: str, fields: dict) -> str:
  """One directory per distinct setting (the defaults: ``default``)."""
  if not fields:
    return os.path.join(workdir, "default")
  key = json.dumps(sorted(fields.items()))
  return os.path.join(workdir, "v_" + hashlib.sha1(key.encode()).hexdigest()[:10])


def _records(run_dir: str) -> list[dict]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _row(name: str, runs: list[list[dict]]) -> tuple[str, list[int]]:
  evals = [[r for r in recs if r["kind"] == "eval"] for recs in runs]
  steps = [r["step"] for r in evals[0]]
  succ = np.array([[r["eval/success"] for r in e] for e in evals])
  final = succ[:, -1]
  lo, hi = bootstrap_interval(final) if len(final) > 1 else (final[0], final[0])
  kl = [e[-1].get("eval/kl_reverse", np.nan) for e in evals]
  trains = [[r for r in recs if r["kind"] == "train"] for recs in runs]
  grad = np.mean([np.mean([r["grad_norm"] for r in t]) for t in trains])
  clipped = np.mean([np.mean([r.get("opd_clipped", 0.0) for r in t]) for t in trains])
  curve = " / ".join(f"{v:.2f}" for v in succ.mean(0))
  return (f"| {name} | {curve} | {final.mean():.3f} [{lo:.3f}, {hi:.3f}] | {final.min():.3f} | "
          f"{np.mean(kl):.3f} | {grad:.2f} | {clipped:.3f} |"), steps


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  use_compilation_cache()
  base = _CONFIG.value
  workdir = os.path.abspath(_WORKDIR.value)
  seeds = [int(s) for s in _SEEDS.value.split(",")]
  factors = _FACTORS.value.split(",")
  unknown = [f for f in factors if f not in FACTORS]
  if unknown:
    raise SystemExit(f"--factors: unknown {unknown}; known: {', '.join(FACTORS)}")
  if base.teacher.source == "build" and not base.teacher.cache_dir:
    base.teacher.cache_dir = os.path.join(workdir, "teacher")
  out = [f"Plain OPD, {base.train.steps} steps x {base.rollout.tasks_per_step} tasks x "
         f"{base.rollout.group_size} rollouts, seeds {seeds}; held-out success at "
         f"T={base.eval.temperature} over {base.eval.episodes} episodes."]
  teacher = None
  for factor in factors:
    rows, steps = [], None
    chosen = ([FACTORS[factor][int(i)] for i in _VARIANTS.value.split(",")]
              if _VARIANTS.value else FACTORS[factor])
    for name, fields in chosen:
      config = base.copy_and_resolve_references()
      for field, value in fields.items():
        section, key = field.split(".")
        config[section][key] = value
      run_dir = _variant_dir(workdir, fields)
      summaries = run_methods(config, run_dir, ["opd"], seeds,
                              say=lambda m, n=name: print(f"[{factor}: {n}] {m}", flush=True))
      teacher = summaries["opd"][0]["teacher"]
      row, steps = _row(name, [_records(os.path.join(run_dir, "opd", f"seed_{s}"))
                               for s in seeds])
      rows.append(row)
    out += ["", f"### {factor}", "",
            f"| variant | mean success at steps {' / '.join(map(str, steps))} | final: mean "
            "[95% CI] | lowest seed | final KL(S‖T) | mean grad norm | clipped signal |",
            "|---|---|---|---|---|---|---|", *rows]
  if teacher is not None:
    out.insert(1, f"Teacher: {teacher['eval/success']:.3f} held-out success.")
  table = "\n".join(out)
  with open(os.path.join(workdir, "factors.md"), "w") as f:
    f.write(table + "\n")
  print("\n" + table + f"\n\nwrote {workdir}/factors.md")


if __name__ == "__main__":
  app.run(main)
