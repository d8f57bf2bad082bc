"""The run's JSONL memory on resume, the end-of-run table."""
import json

from atod_jax.train.logs import MetricsLog, results_table


def test_resume_keeps_what_the_checkpoint_covers_and_drops_a_cut_line(tmp_path):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for rec in ({"step": 0, "kind": "eval", "eval/success": 0.1},
                {"step": 0, "kind": "train", "success": 0.0},
                {"step": 1, "kind": "train", "success": 0.5},
                {"step": 2, "kind": "eval", "eval/success": 0.4},
                {"step": 2, "kind": "train", "success": 0.6}):
      f.write(json.dumps(rec) + "\n")
    f.write('{"step": 3, "kind": "tra')  # killed mid-write
  log = MetricsLog(str(tmp_path), resume_step=2)  # the checkpoint holds 2 updates
  log.write("train", 2, {"success": 0.7})
  log.close()
  with open(tmp_path / "metrics.jsonl") as f:
    recs = [json.loads(line) for line in f]
  # train records of steps 0, 1 (updates 1, 2), the evals at 0 and 2, then the new step 2
  assert [(r["kind"], r["step"]) for r in recs] == [
      ("eval", 0), ("train", 0), ("train", 1), ("eval", 2), ("train", 2)]
  assert recs[-1]["success"] == 0.7


def test_results_table_rows(tmp_path):
  log = MetricsLog(str(tmp_path), resume_step=None)
  for step, s in ((0, 0.2), (10, 0.9), (20, 0.8)):
    log.write("eval", step, {"eval/success": s, "eval/turns": 5.0})
  table = results_table(log, {"eval/success": 0.85, "eval/turns": 4.0})
  log.close()
  lines = table.splitlines()
  assert lines[2].startswith("| student, step 0 | 0.200")
  assert lines[3].startswith("| student, step 20 (final) | 0.800")
  assert lines[4].startswith("| student, step 10 (best) | 0.900")
  assert lines[5].startswith("| teacher | 0.850")


def test_results_table_with_a_selection_split_and_a_second_report_split(tmp_path):
  """The student kept is the best on select/success (not on the reported split), and
  every split evaluated has its column."""
  log = MetricsLog(str(tmp_path), resume_step=None)
  for step, sel, rep in ((0, 0.1, 0.3), (10, 0.8, 0.5), (20, 0.6, 0.9)):
    log.write("eval", step, {"select/success": sel, "eval/success": rep,
                             "eval@valid_unseen/success": rep / 2, "eval/turns": 5.0})
  table = results_table(log, {"eval/success": 0.7, "select/success": 0.75},
                         select="select/success")
  log.close()
  lines = table.splitlines()
  assert lines[0].startswith("| model | select/success | eval/success | "
                             "eval@valid_unseen/success | eval/turns")
  assert lines[4].startswith("| student, step 10 (selected on select/) | 0.800 | 0.500 | 0.250")
  assert lines[5].startswith("| teacher | 0.750 | 0.700 | - |")
