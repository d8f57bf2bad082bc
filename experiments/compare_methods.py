"""Methods side by side: the same config, budget and teacher for each, over several seeds.

    python experiments/compare_methods.py --config configs/quickstart.py --workdir runs/compare
    python experiments/compare_methods.py --config configs/quickstart.py --workdir runs/c \
        --methods atod,opd,grpo --seeds 0,1 --config.train.steps=40

Each run lives in ``<workdir>/<method>/seed_<s>`` (a finished run is reused, a stopped
one resumes); the teacher is built once in ``<workdir>/teacher`` and shared. Writes
``<workdir>/comparison.md``: per method the mean over seeds with a 95% bootstrap
interval and the paired per-seed difference to the first method (``--methods``: ATOD
first), of the final and the kept student's success and of the final invalid-action
rate, then mean +- std of the other measures (the exact KL(student || teacher) on the
evaluation episodes among them); and ``<workdir>/comparison.png`` (success and that KL
along training, mean and the seeds' spread). The statistics: ``atod_jax.train.compare``.
"""
from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from atod_jax.cache import use_compilation_cache
from atod_jax.train.compare import comparison_table, run_methods

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", "base config")
_WORKDIR = flags.DEFINE_string("workdir", None, "where the runs and the tables go")
_METHODS = flags.DEFINE_string("methods", "atod,opd,grpo,gkd,gigpo,atod_fixed,atod_uniform",
                               "comma-separated methods")
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "comma-separated seeds")
flags.mark_flag_as_required("workdir")


def _mean_std(values):
  a = np.asarray(values, float)
  if np.isnan(a).any():
    return "-"
  return f"{a.mean():.3f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.3f}"


def _curves(path):
  steps, succ, kl = [], [], []
  with open(path) as f:
    for line in f:
      r = json.loads(line)
      if r["kind"] == "eval":
        steps.append(r["step"])
        succ.append(r["eval/success"])
        kl.append(r.get("eval/kl_reverse", np.nan))
  return steps, succ, kl


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  use_compilation_cache()
  base = _CONFIG.value
  workdir = os.path.abspath(_WORKDIR.value)
  methods = _METHODS.value.split(",")
  seeds = [int(s) for s in _SEEDS.value.split(",")]
  results = run_methods(base, workdir, methods, seeds,
                        say=lambda m: print(m, flush=True))
  curves = {m: [_curves(os.path.join(workdir, m, f"seed_{s}", "metrics.jsonl")) for s in seeds]
            for m in methods}
  teacher = results[methods[0]][0]["teacher"]
  intervals = "\n\n".join(comparison_table(results, methods[0], metric, title) for metric, title in (
      (lambda r: r["final"]["eval/success"], "final held-out success"),
      (lambda r: r["selected"]["eval/success"], "held-out success of the student kept "
       "(chosen on select/)" if base.eval.select_split else "best held-out success"),
      # lower is better; it moves where success does not yet (long tasks, short budgets)
      (lambda r: r["final"]["eval/invalid_rate"], "final held-out invalid-action rate")))

  cols = ("final eval success", "best eval success", "final greedy success", "final turns",
          "final invalid rate", "final KL(S‖T)")
  lines = [f"Budget: {base.train.steps} steps x {base.rollout.tasks_per_step} tasks x "
           f"{base.rollout.group_size} rollouts; seeds {seeds}; held-out success at "
           f"T={base.eval.temperature} over {base.eval.episodes} episodes (mean ± std).", "",
           "| method | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
  for method in methods:
    rs = results[method]
    lines.append(f"| {method} | " + " | ".join([
        _mean_std([r["final"]["eval/success"] for r in rs]),
        _mean_std([r["best_success"] for r in rs]),
        _mean_std([r["final"].get("greedy/success", np.nan) for r in rs]),
        _mean_std([r["final"]["eval/turns"] for r in rs]),
        _mean_std([r["final"]["eval/invalid_rate"] for r in rs]),
        _mean_std([r["final"].get("eval/kl_reverse", np.nan) for r in rs])]) + " |")
  greedy = teacher.get("greedy/success")
  lines.append(f"| teacher | {teacher['eval/success']:.3f} | - | "
               f"{'-' if greedy is None else f'{greedy:.3f}'} | {teacher['eval/turns']:.3f} | "
               f"{teacher['eval/invalid_rate']:.3f} | 0 |")
  first = results[methods[0]]
  lines.append(f"| student at step 0 | {_mean_std([r['step0']['eval/success'] for r in first])}"
               f" | - | - | {_mean_std([r['step0']['eval/turns'] for r in first])} | "
               f"{_mean_std([r['step0']['eval/invalid_rate'] for r in first])} | "
               f"{_mean_std([r['step0'].get('eval/kl_reverse', np.nan) for r in first])} |")
  table = intervals + "\n\n" + "\n".join(lines)
  with open(os.path.join(workdir, "comparison.md"), "w") as f:
    f.write(table + "\n")

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  task_name = (f"household-{base.env.preset}" if base.env.kind == "household"
               else base.env.kind)
  fig, (ax, ax_kl) = plt.subplots(1, 2, figsize=(12, 4.2))
  for method in methods:
    steps = curves[method][0][0]
    for axis, i in ((ax, 1), (ax_kl, 2)):
      ys = np.array([c[i] for c in curves[method]], float)
      if np.isnan(ys).all():
        continue
      mean, std = ys.mean(0), ys.std(0)
      axis.plot(steps, mean, "-o", ms=3, label=method)
      axis.fill_between(steps, mean - std, mean + std, alpha=0.15)
  ax.axhline(teacher["eval/success"], color="k", ls="--", label="teacher")
  ax.set(xlabel="training step", ylabel=f"held-out success (T={base.eval.temperature})",
         title=f"{task_name}: mean ± std over {len(seeds)} seeds",
         ylim=(-0.02, 1.02))
  ax.legend(fontsize=8)
  ax_kl.set(xlabel="training step", ylabel="KL(student ‖ teacher), nats per token",
            title="imitation: exact reverse KL on the held-out episodes")
  ax_kl.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "comparison.png"), dpi=110)
  print("\n" + table)
  print(f"\nwrote {workdir}/comparison.md and comparison.png")


if __name__ == "__main__":
  app.run(main)
