"""A workdir resumes only the run it holds.

A run's ``config.json`` is written when it starts. A later start in the same workdir
(after a crash, a kill, a preemption, or a rerun of the same command) resumes from its
checkpoint only if its config equals that one in every field that can change what the
run computes or reports: the method, the objective, the models, the environment, the
rollout, the optimizer, the seed, the evaluation protocol, ... Otherwise it stops at
start-up in one line naming the fields that differ; ``--config.train.resume=force``
resumes anyway and records the fields in ``metrics.jsonl`` (a ``"resume"`` record).
The comparison tool applies the same rule before it reuses or resumes a run.

The fields that may differ (:data:`FREE`) change where things are or how often they are
saved, not the numbers:
"""
from __future__ import annotations

import json
import os

from atod_jax.train.checks import ConfigError

# fields (or whole sections, "section.*") that may differ between a run and its resume
FREE: tuple[str, ...] = (
    "train.steps",  # a longer run continues a shorter one (nothing else depends on it)
    "train.checkpoint_every", "train.keep_checkpoints",  # how often, how many kept
    "train.resume",  # this switch itself
    "teacher.cache_dir",  # where a built teacher is cached: a build is a function of its
    # settings (its fingerprint is checked when the cache is read)
    "teacher.offload",  # where the teacher's weights wait between uses
    "env.workers", "env.step_timeout",  # the worker pool's size and patience
    "mesh.*",  # the devices' layout (the same math; sums may differ in the last bits)
    "distributed.*",  # the coordinator's address and this process's id
)
RESUME_MODES = ("", "force")

__doc__ += "".join(f"\n* ``{f}``" for f in FREE) + "\n"


def _flat(tree, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flat(v, name + "."))
    else:
      out[name] = v
  return out


def _free(field: str) -> bool:
  return any(field == f or (f.endswith(".*") and field.startswith(f[:-1])) for f in FREE)


def differences(old: dict, new: dict, defaults: dict | None = None) -> list[str]:
  """The fields (dotted names) outside :data:`FREE` whose values differ between two
  configs as their ``config.json`` holds them. A field only one has counts, unless it
  is a field added since the old run started and ``new`` holds its default
  (``defaults``, a config of the same form: the run computed what it would have)."""
  a, b, d = _flat(old), _flat(new), _flat(defaults or {})
  def differs(f):
    if f not in a:
      return f not in b or f not in d or b[f] != d[f]
    return f not in b or a[f] != b[f]
  return sorted(f for f in set(a) | set(b) if not _free(f) and differs(f))


def config_json(config) -> dict:
  """The config as ``config.json`` holds it."""
  return json.loads(config.to_json_best_effort())


def has_run(workdir: str) -> bool:
  """Whether ``workdir`` holds a run that a start would resume or reuse (a checkpoint,
  or the summary of a finished run)."""
  ckpt = os.path.join(workdir, "checkpoints")
  return (os.path.exists(os.path.join(workdir, "summary.json"))
          or os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt)))


def check(workdir: str, config, what: str = "") -> list[str]:
  """Raises :class:`~atod_jax.train.checks.ConfigError` (one line) when ``workdir``
  holds a run whose ``config.json`` differs from ``config`` (:func:`differences`),
  unless ``train.resume = "force"``; returns the differing fields (empty: the same run,
  or nothing to resume)."""
  path = os.path.join(workdir, "config.json")
  mode = config.train.resume
  if mode not in RESUME_MODES:
    raise ConfigError(f"config.train.resume: must be '' (resume only the same run) or "
                      f"'force', got {mode!r}")
  if not (os.path.exists(path) and has_run(workdir)):
    return []
  with open(path) as f:
    old = json.load(f)
  from atod_jax.train import defaults
  diff = differences(old, config_json(config), config_json(defaults.base()))
  if diff and mode != "force":
    shown = ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
    raise ConfigError(
        f"config.train.resume: {what or workdir} holds a run with other settings "
        f"({shown}); use a new --workdir, or --config.train.resume=force to resume it "
        f"anyway (recorded in its metrics.jsonl)")
  return diff
