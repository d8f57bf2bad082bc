"""The run's evaluation protocol: the same held-out episodes for every model.

``eval/*`` are the metrics at the validation temperature (``eval.temperature``, the
paper's 0.4) and, with ``eval.greedy``, ``greedy/*`` at temperature 0, on the first
``eval.episodes`` held-out tasks of the source, with the draws of ``eval.seed``. The
teacher's evaluation is cached next to a built teacher (runs sharing it evaluate it
once) or in the workdir, keyed by the protocol and the teacher.
"""
from __future__ import annotations

import json
import os


def evaluate(eval_config, graphdef, params, source) -> dict[str, float]:
  """``eval/*`` and (``eval_config.greedy``) ``greedy/*`` of a model on ``source``."""
  e = eval_config
  out = {f"eval/{k}": v for k, v in source.evaluate(
      graphdef, params, episodes=e.episodes, temperature=e.temperature, seed=e.seed).items()}
  if e.greedy:
    out.update({f"greedy/{k}": v for k, v in source.evaluate(
        graphdef, params, episodes=e.episodes, temperature=0.0, seed=e.seed).items()})
  return out


def teacher_metrics(config, graphdef, params, source, info: dict, workdir: str) -> dict:
  """The teacher's :func:`evaluate`, from its cache when the protocol and the teacher
  are those of the cached copy."""
  e = config.eval
  protocol = json.loads(json.dumps({"episodes": e.episodes, "temperature": e.temperature,
                                    "greedy": e.greedy, "seed": e.seed,
                                    "env": config.env.to_dict()}))
  cache_file = os.path.join(info.get("dir", workdir), "teacher_eval.json")
  who = info.get("fingerprint", info.get("path"))
  if os.path.exists(cache_file):
    with open(cache_file) as f:
      cached = json.load(f)
    if cached.get("protocol") == protocol and cached.get("teacher") == who:
      return cached["metrics"]
  metrics = evaluate(e, graphdef, params, source)
  with open(cache_file, "w") as f:
    json.dump({"protocol": protocol, "teacher": who, "metrics": metrics}, f, indent=1)
  return metrics
