"""A workdir resumes only its own run (atod_jax.train.resume); through the command line:
tests/train/test_trainer.py (test_a_run_with_other_settings_does_not_resume...)."""
import json
import os

import pytest

from atod_jax.train import ConfigError, resume
from atod_jax.train import defaults as d
from tests.train import tiny_config


def test_differences_name_every_result_field_and_ignore_the_free_ones():
  old = resume.config_json(tiny_config.get_config())
  new = tiny_config.get_config()
  new.method = "grpo"
  new.optim.learning_rate = 1e-3
  new.train.steps = 12  # free: a longer run continues a shorter one
  new.env.obs_len = 16
  new.mesh.data = 1  # free
  new.teacher.cache_dir = "/elsewhere"  # free
  base = resume.config_json(d.base())
  got = resume.differences(old, resume.config_json(new), base)
  assert got == ["env.obs_len", "method", "optim.learning_rate"]
  assert resume.differences(old, old, base) == []
  # a field added since the old run started: the same run at its default, not otherwise
  older = json.loads(json.dumps(old))
  del older["objective"]["opd_clip"]
  assert resume.differences(older, old, base) == []
  changed = json.loads(json.dumps(old))
  changed["objective"]["opd_clip"] = 2.0
  assert resume.differences(older, changed, base) == ["objective.opd_clip"]
  assert resume.differences(old, older, base) == ["objective.opd_clip"]  # dropped: differs


def test_check_refuses_another_run_in_one_line_and_force_lets_it(tmp_path):
  config = tiny_config.get_config()
  work = str(tmp_path)
  with open(os.path.join(work, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  assert resume.check(work, config) == []  # nothing to resume yet: any config starts afresh
  os.makedirs(os.path.join(work, "checkpoints", "4"))
  other = tiny_config.get_config()
  other.method = "grpo"
  assert resume.check(work, config) == []
  with pytest.raises(ConfigError) as e:
    resume.check(work, other)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("config.train.resume:") and "method" in msg
  assert "--config.train.resume=force" in msg
  other.train.resume = "force"
  assert resume.check(work, other) == ["method"]
  other.train.resume = "yes"
  with pytest.raises(ConfigError, match="train.resume"):
    resume.check(work, other)


def test_the_comparison_tool_reuses_only_the_same_run(tmp_path):
  """A finished run in the comparison's folder is reused for the same settings and refused
  (before anything trains) for others: a changed setting never mixes old and new runs in
  one table."""
  from atod_jax.train.compare import run_methods
  base = tiny_config.get_config()
  run_dir = tmp_path / "atod" / "seed_0"
  run_dir.mkdir(parents=True)
  done = base.copy_and_resolve_references()
  done.teacher.cache_dir = str(tmp_path / "teacher")
  (run_dir / "config.json").write_text(done.to_json_best_effort())
  (run_dir / "summary.json").write_text(json.dumps({"final": {"eval/success": 0.5}}))
  got = run_methods(base, str(tmp_path), ["atod"], [0], say=lambda m: None)
  assert got["atod"][0]["final"]["eval/success"] == 0.5  # reused, nothing trained
  base.objective.opd_clip = 2.0
  with pytest.raises(ConfigError, match="objective.opd_clip"):
    run_methods(base, str(tmp_path), ["atod"], [0], say=lambda m: None)
