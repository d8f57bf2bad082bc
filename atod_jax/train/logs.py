"""Where a run's numbers go: a JSONL log, TensorBoard event files, a PNG and a table.

``metrics.jsonl`` holds one record per line, ``{"step": s, "kind": "train"|"eval", ...}``.
It is the run's memory: on resume the lines after the restored step are dropped and the
rest is replayed into the plot and the table, so a resumed run's files equal those of an
uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os

from tensorboardX import SummaryWriter


class MetricsLog:
  """The run's records; ``write=False`` (a multi-process run's other processes) keeps
  them in memory only."""

  def __init__(self, workdir: str, resume_step: int | None, write: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.records: list[dict] = []
    self._file = self._tb = None
    if resume_step is not None and os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          line = line.strip()
          if not line:
            continue
          try:
            rec = json.loads(line)
          except json.JSONDecodeError:
            break  # a line cut by a crash: everything before it is good
          if rec["step"] <= resume_step if rec["kind"] == "eval" else rec["step"] < resume_step:
            self.records.append(rec)
    if not write:
      return
    with open(self.path, "w") as f:
      for rec in self.records:
        f.write(json.dumps(rec) + "\n")
    self._file = open(self.path, "a")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                             purge_step=resume_step if resume_step else None)

  def write(self, kind: str, step: int, metrics: dict):
    rec = {"step": int(step), "kind": kind, **{k: float(v) for k, v in metrics.items()}}
    self.records.append(rec)
    if self._file is None:
      return
    self._file.write(json.dumps(rec) + "\n")
    self._file.flush()
    for k, v in metrics.items():
      self._tb.add_scalar(k if "/" in k else f"{kind}/{k}", float(v), int(step))

  def note(self, kind: str, step: int, **values):
    """A record that is not a metric (e.g. ``"resume"``: the fields a forced resume let
    differ), JSON as given; kept and dropped on resume like a train record."""
    rec = {"step": int(step), "kind": kind, **values}
    self.records.append(rec)
    if self._file is not None:
      self._file.write(json.dumps(rec) + "\n")
      self._file.flush()

  def flush(self):
    if self._file is not None:
      self._file.flush()
      self._tb.flush()

  def close(self):
    if self._file is not None:
      self._file.close()
      self._tb.close()

  def series(self, kind: str, key: str):
    pts = [(r["step"], r[key]) for r in self.records if r["kind"] == kind and key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(log: MetricsLog, teacher: dict, path: str, title: str):
  """Learning curves: held-out success (student vs teacher; the selection split's too),
  training success, the kappa / rho schedule, mean turns and the exact KL(student ||
  teacher) on the evaluation episodes."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
  ax = axes[0]
  for key, style in (("eval/success", "-o"), ("greedy/success", "--s"),
                     ("select/success", ":^")):
    x, y = log.series("eval", key)
    if x:
      ax.plot(x, y, style, label=f"student {key.split('/')[0]}")
    if key in teacher:
      ax.axhline(teacher[key], color="gray", ls="-" if key.startswith("eval") else "--",
                 label=f"teacher {key.split('/')[0]}")
  x, y = log.series("train", "success")
  ax.plot(x, y, alpha=0.4, label="student train rollouts")
  ax.set(xlabel="step", ylabel="success rate", title="success", ylim=(-0.02, 1.02))
  ax.legend(fontsize=7)
  ax = axes[1]
  for key in ("kappa", "rho", "turn_weight"):
    x, y = log.series("train", key)
    if x:
      ax.plot(x, y, label=key)
  ax.set(xlabel="step", title="kappa / rho / mean T-DUR weight")
  ax.legend(fontsize=7)
  ax = axes[2]
  x, y = log.series("train", "turns")
  ax.plot(x, y, label="train rollouts")
  x, y = log.series("eval", "eval/turns")
  ax.plot(x, y, "-o", label="held-out")
  ax.set(xlabel="step", title="mean turns per episode")
  ax.legend(fontsize=7)
  ax = axes[3]
  for key, label in (("eval/kl_reverse", "KL(student || teacher)"),
                     ("eval/kl_forward", "KL(teacher || student)")):
    x, y = log.series("eval", key)
    if x:
      ax.plot(x, y, "-o", label=label)
  ax.set(xlabel="step", title="held-out KL, nats per token")
  ax.legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _fmt(v):
  return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def results_table(log: MetricsLog, teacher: dict, select: str = "eval/success") -> str:
  """Markdown table: the student at step 0, at the end and where ``select`` was best
  (the one kept as ``student_best/``), and the teacher, on every split evaluated."""
  evals = [r for r in log.records if r["kind"] == "eval"]
  keys = set(teacher).union(*evals) if evals else set(teacher)
  cols = [c for c in ("select/success", "eval/success", "greedy/success") if c in keys]
  cols += sorted(k for k in keys if k.startswith("eval@") and k.endswith("/success"))
  cols += ["eval/turns", "eval/invalid_rate"]
  rows = []
  if evals:
    rows.append((f"student, step {evals[0]['step']}", evals[0]))
    rows.append((f"student, step {evals[-1]['step']} (final)", evals[-1]))
    best = max(evals, key=lambda r: r.get(select, -1))
    how = "best" if select == "eval/success" else "selected on select/"
    rows.append((f"student, step {best['step']} ({how})", best))
  rows.append(("teacher", teacher))
  head = "| model | " + " | ".join(cols) + " |"
  out = [head, "|" + "---|" * (len(cols) + 1)]
  for name, r in rows:
    out.append(f"| {name} | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
  return "\n".join(out)
