"""Methods side by side, with the statistics a claim needs.

:func:`run_methods` trains every method with every seed on one config: the same
teacher (built once and shared), the same budget and the same evaluation episodes
(``eval.seed``); a seed fixes the student's initialisation, its warm start and the task
draws, so seed ``s`` of two methods starts from the same student on the same tasks.
:func:`comparison_table` reports each method's mean over seeds with a 95% bootstrap
interval, and the paired per-seed difference to a reference method (ATOD) with its own
interval: pairing removes the spread between seeds' starting points.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import jax
import numpy as np


def bootstrap_interval(values: Sequence[float], *, level: float = 0.95, resamples: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
  """Percentile bootstrap interval of the mean of ``values`` (resampled with
  replacement ``resamples`` times); a single value gives ``(v, v)``."""
  a = np.asarray(values, float)
  if a.size == 0:
    raise ValueError("no values")
  rng = np.random.default_rng(seed)
  means = a[rng.integers(0, a.size, (resamples, a.size))].mean(axis=1)
  tail = (1.0 - level) / 2.0
  return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def paired_differences(method: Sequence[float], reference: Sequence[float]) -> np.ndarray:
  """Per-seed ``method - reference`` (the same seeds, in the same order)."""
  a, b = np.asarray(method, float), np.asarray(reference, float)
  if a.shape != b.shape:
    raise ValueError(f"paired values need the same seeds: {a.shape} vs {b.shape}")
  return a - b


def _interval(values) -> str:
  lo, hi = bootstrap_interval(values)
  return f"{np.mean(values):.3f} [{lo:.3f}, {hi:.3f}]"


def comparison_table(results: dict[str, list[dict]], reference: str,
                     metric: Callable[[dict], float] = lambda s: s["final"]["eval/success"],
                     title: str = "final held-out success") -> str:
  """A markdown table: per method, the mean of ``metric`` over its runs' summaries with
  a 95% bootstrap interval, and the paired difference to ``reference`` (mean [interval],
  and on how many seeds the method was above / below)."""
  ref = [metric(s) for s in results[reference]]
  lines = [f"| method | {title}: mean [95% CI] | minus {reference}: mean [95% CI] | "
           "seeds above / below |", "|---|---|---|---|"]
  for method, summaries in results.items():
    values = [metric(s) for s in summaries]
    if method == reference:
      lines.append(f"| {method} | {_interval(values)} | - | - |")
      continue
    diff = paired_differences(values, ref)
    lines.append(f"| {method} | {_interval(values)} | {_interval(diff)} | "
                 f"{int(np.sum(diff > 0))} / {int(np.sum(diff < 0))} |")
  return "\n".join(lines)


def run_methods(base, workdir: str, methods: Sequence[str], seeds: Sequence[int],
                say=print) -> dict[str, list[dict]]:
  """Trains (or reuses the finished run of) every method x seed in
  ``<workdir>/<method>/seed_<s>``; returns the runs' summaries per method, in seed order.
  A built teacher is shared through ``<workdir>/teacher``."""
  from atod_jax.train import resume
  from atod_jax.train.loop import train
  results: dict[str, list[dict]] = {m: [] for m in methods}
  for method in methods:
    for seed in seeds:
      run_dir = os.path.join(workdir, method, f"seed_{seed}")
      summary_file = os.path.join(run_dir, "summary.json")
      config = base.copy_and_resolve_references()
      config.unlock()
      config.method, config.seed = method, seed
      if config.teacher.source == "build" and not config.teacher.cache_dir:
        config.teacher.cache_dir = os.path.join(workdir, "teacher")
      # a finished or stopped run is reused or resumed only if it is this run
      resume.check(run_dir, config, what=run_dir)
      if not os.path.exists(summary_file):
        say(f"== {method}, seed {seed} -> {run_dir}")
        train(config, run_dir, quiet=True)
        # each run compiles its own functions; XLA:CPU maps every compiled program's code
        # into memory, and ~17 quickstart runs in one process exhausted the mappings
        # (LLVM: "Unable to allocate section memory"): drop them between runs
        jax.clear_caches()
      with open(summary_file) as f:
        results[method].append(json.load(f))
  return results
