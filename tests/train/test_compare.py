"""The comparison statistics (bootstrap intervals, paired differences) and the
comparison script on a shrunk config."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from atod_jax.train.compare import bootstrap_interval, comparison_table, paired_differences

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bootstrap_interval_of_the_mean():
  assert bootstrap_interval([0.7]) == (0.7, 0.7)
  assert bootstrap_interval([0.5, 0.5, 0.5]) == (0.5, 0.5)
  x = np.random.default_rng(3).normal(0.6, 0.1, 400)
  lo, hi = bootstrap_interval(x)
  half = 1.96 * x.std(ddof=1) / np.sqrt(x.size)  # the normal approximation, for many values
  assert lo < x.mean() < hi
  np.testing.assert_allclose([lo, hi], [x.mean() - half, x.mean() + half], atol=0.15 * half)
  small = [0.2, 0.9, 0.4]
  lo, hi = bootstrap_interval(small)
  assert min(small) <= lo < np.mean(small) < hi <= max(small)
  assert bootstrap_interval(small, level=0.5)[1] - bootstrap_interval(small, level=0.5)[0] < hi - lo


def test_paired_differences_and_the_table():
  atod = [0.9, 0.8, 0.7]
  opd = [0.8, 0.8, 0.5]
  np.testing.assert_allclose(paired_differences(opd, atod), [-0.1, 0.0, -0.2])
  with pytest.raises(ValueError, match="same seeds"):
    paired_differences([0.1], atod)
  results = {m: [{"final": {"eval/success": v}} for v in vals]
             for m, vals in (("atod", atod), ("opd", opd))}
  table = comparison_table(results, "atod")
  rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
  assert f"{np.mean(atod):.3f} [" in rows["atod"]
  lo, hi = bootstrap_interval([-0.1, 0.0, -0.2])
  assert f"{-0.1:.3f} [{lo:.3f}, {hi:.3f}]" in rows["opd"] and rows["opd"].endswith("| 0 / 2 |")


@pytest.mark.slow  # 4 short runs and a teacher build, ~1.5 min (pytest -m slow)
def test_compare_script_on_a_shrunk_config(tmp_path):
  """2 methods x 2 seeds: the table's means and paired differences are those of the runs'
  summaries, and a seed starts every method from the same student."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "experiments/compare_methods.py",
         f"--config={ROOT}/tests/train/tiny_config.py", f"--workdir={tmp_path}",
         "--methods=atod,grpo", "--seeds=0,1", "--config.train.steps=2",
         "--config.train.eval_every=2"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summaries = {m: [json.load(open(tmp_path / m / f"seed_{s}" / "summary.json")) for s in (0, 1)]
               for m in ("atod", "grpo")}
  for s in (0, 1):  # same seed: same warm start, same evaluation episodes
    assert summaries["atod"][s]["step0"] == summaries["grpo"][s]["step0"]
  final = {m: [r["final"]["eval/success"] for r in rs] for m, rs in summaries.items()}
  table = (tmp_path / "comparison.md").read_text()
  row = next(line for line in table.splitlines() if line.startswith("| grpo |"))
  mean, lo, hi, dmean, dlo, dhi = map(float, re.findall(r"-?\d+\.\d+", row)[:6])
  np.testing.assert_allclose(mean, np.mean(final["grpo"]), atol=5e-4)
  diff = np.subtract(final["grpo"], final["atod"])
  np.testing.assert_allclose(dmean, diff.mean(), atol=5e-4)
  np.testing.assert_allclose([dlo, dhi], bootstrap_interval(diff), atol=5e-4)
  # the third interval table: the final invalid-action rate, same arithmetic
  rows = [line for line in table.splitlines() if line.startswith("| grpo |")]
  invalid = {m: [r["final"]["eval/invalid_rate"] for r in rs] for m, rs in summaries.items()}
  mean, lo, hi, dmean = map(float, re.findall(r"-?\d+\.\d+", rows[2])[:4])
  np.testing.assert_allclose(mean, np.mean(invalid["grpo"]), atol=5e-4)
  np.testing.assert_allclose(dmean, np.mean(np.subtract(invalid["grpo"], invalid["atod"])),
                             atol=5e-4)
  assert (tmp_path / "comparison.png").exists()
