"""The run's evaluation protocol: the same episodes for every model.

At every evaluation a model plays, at the validation temperature (``eval.temperature``,
the paper's 0.4), the first ``eval.episodes`` tasks of

* each report split (``eval.report_splits``; default the environment's evaluation
  split): the first gives ``eval/*`` (and, with ``eval.greedy``, ``greedy/*`` at
  temperature 0), the others ``eval@<split>/*``;
* the selection split (``eval.select_split``, when set): ``select/*``. The student kept
  as ``student_best/`` is the best on it, so a report split is never used to choose
  what is reported on it (without a selection split the best is chosen on ``eval/*``,
  as the paper did: that number is then optimistic).

All draws come from ``eval.seed``. The teacher's evaluation is cached next to a built
teacher (runs sharing it evaluate it once) or in the workdir, keyed by the protocol and
the teacher.
"""
from __future__ import annotations

import json
import os

from atod_jax.train import distributed


def report_splits(eval_config) -> list[str | None]:
  """The report splits (``None``: the environment's evaluation split)."""
  return list(eval_config.report_splits) or [None]


def selection_key(eval_config) -> str:
  """The metric ``student_best`` maximises."""
  return "select/success" if eval_config.get("select_split") else "eval/success"


def evaluate(eval_config, graphdef, params, source, teacher: tuple | None = None
             ) -> dict[str, float]:
  """Every metric of the protocol above for one model on ``source``; with ``teacher``
  (``(graphdef, params)``) and ``eval.kl``, also the exact KL between the model and the
  teacher over the whole vocabulary at every token the model generated in these
  episodes (``kl_reverse`` = KL(student || teacher), ``kl_forward``, per turn
  ``kl_reverse_turn<k>``: :func:`~atod_jax.train.steps.kl_metrics`), the measure of
  imitation that is not a training signal."""
  e = eval_config
  teacher = teacher if e.kl else None
  run = lambda split, temperature: source.evaluate(  # noqa: E731
      graphdef, params, episodes=e.episodes, temperature=temperature, seed=e.seed, split=split,
      **({} if teacher is None else {"teacher": teacher}))
  out = {}
  for i, split in enumerate(report_splits(e)):
    prefix = "eval" if i == 0 else f"eval@{split}"
    out.update({f"{prefix}/{k}": v for k, v in run(split, e.temperature).items()})
    if i == 0 and e.greedy:
      out.update({f"greedy/{k}": v for k, v in run(split, 0.0).items()})
  if e.get("select_split"):
    out.update({f"select/{k}": v for k, v in run(e.select_split, e.temperature).items()})
  return out


def teacher_metrics(config, graphdef, params, source, info: dict, workdir: str) -> dict:
  """The teacher's :func:`evaluate`, from its cache when the protocol and the teacher
  are those of the cached copy."""
  protocol = json.loads(json.dumps({"eval": config.eval.to_dict(), "env": config.env.to_dict()}))
  cache_file = os.path.join(info.get("dir", workdir), "teacher_eval.json")
  who = info.get("fingerprint", info.get("path"))
  if os.path.exists(cache_file):
    with open(cache_file) as f:
      cached = json.load(f)
    if cached.get("protocol") == protocol and cached.get("teacher") == who:
      return cached["metrics"]
  metrics = evaluate(config.eval, graphdef, params, source)
  if distributed.is_main():
    with open(cache_file, "w") as f:
      json.dump({"protocol": protocol, "teacher": who, "metrics": metrics}, f, indent=1)
  distributed.sync("teacher evaluation cached")
  return metrics
