"""The *_tiny configs run real training steps on the real environments through the
command line: tokenizer built from expert episodes, teacher built, student warm start,
host rollouts through a 2-worker pool, ATOD updates, evaluation, the results table."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SMALL = ["--config.train.steps=2", "--config.train.eval_every=2",
         "--config.train.checkpoint_every=1", "--config.teacher.build.sft_steps=3",
         "--config.teacher.build.select_episodes=2",
         "--config.teacher.build.demo_episodes=4", "--config.student.sft.steps=2",
         "--config.student.sft.demo_episodes=4", "--config.env.tokenizer_episodes=4",
         "--config.rollout.tasks_per_step=2", "--config.rollout.group_size=2",
         "--config.eval.episodes=4", "--config.env.eval_batch=4"]


def _needs(module):
  try:
    __import__(module)
    return False
  except ImportError:
    return True


def _data(*parts):
  """Skips a test whose shared data is not there (``../shared/data``, ``$ATOD_JAX_DATA``,
  ``$WEBSHOP_DATA`` for WebShop)."""
  from atod_jax.envs.searchqa import default_data_dir
  from atod_jax.envs.webshop import webshop_data_dir
  path = webshop_data_dir() if parts == ("webshop",) else os.path.join(default_data_dir(), *parts)
  return pytest.mark.skipif(not os.path.exists(path), reason=f"shared data not found: {path}")


def _run(config, workdir, *extra):
  cmd = [sys.executable, "-m", "atod_jax.main", f"--config={ROOT}/configs/{config}",
         f"--workdir={workdir}", *SMALL, *extra]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  train = [r for r in records if r["kind"] == "train"]
  assert [r["step"] for r in train] == [0, 1]
  for r in train:  # real episodes were played and trained on
    assert r["tokens_per_s"] > 0 and r["response_tokens"] > 0 and r["turns"] >= 1 and r["grad_norm"] > 0
    if "--config.method=gigpo" in extra:
      assert r["kappa"] == 0.0 and r["rho"] == 1.0 and "abs_step_adv" in r
    elif "--config.method=gkd" in extra:
      assert r["kappa"] == 1.0 and r["rho"] == 0.0 and r["divergence"] > 0
    else:
      assert 0.9 <= r["rho"] <= 2.0 and 0.1 <= r["kappa"] <= 1.0
  assert os.path.exists(os.path.join(workdir, "results.md"))
  teacher = os.path.join(workdir, "teacher")
  assert any(os.path.isfile(os.path.join(teacher, d, "tokenizer.json"))
             for d in os.listdir(teacher) if d.startswith("tokenizer-"))
  return records, proc


@pytest.mark.long
@pytest.mark.skipif(_needs("textworld"), reason="needs the textworld extra")
def test_textworld_tiny(tmp_path):
  # few seeds: each game not yet in the (default) cache takes tw-make 2-5 s
  records, _ = _run("textworld_tiny.py", tmp_path / "run", "--config.env.max_turns=6",
                    "--config.env.options.splits.train=(0, 1, 2, 3)",
                    "--config.env.options.splits.heldout=(100000, 100001)")
  evals = [r for r in records if r["kind"] == "eval"]
  assert [e["step"] for e in evals] == [0, 2]


@pytest.mark.long
@pytest.mark.skipif(_needs("bm25s"), reason="needs the search extra")
@_data("searchqa", "hotpot_distractor")
@pytest.mark.parametrize("method", ["atod", "gigpo", "gkd"])
def test_searchqa_tiny(tmp_path, method):
  _run("searchqa_tiny.py", tmp_path / "run", f"--config.method={method}")


@pytest.mark.long
@pytest.mark.skipif(_needs("rapidfuzz"), reason="needs the webshop extra")
@_data("webshop")
def test_webshop_tiny(tmp_path):
  _run("webshop_tiny.py", tmp_path / "run", "--config.env.max_turns=6")


@pytest.mark.slow  # ~2 min: ALFWorld resets are slow (pytest -m slow)
@pytest.mark.skipif(_needs("alfworld"), reason="needs the alfworld extra")
def test_alfworld_tiny_reports_task_types(tmp_path):
  # ALFWorld resets are slow: as few episodes as a real run allows
  records, _ = _run("alfworld_tiny.py", tmp_path / "run", "--config.env.max_turns=4",
                    "--config.student.init=fresh", "--config.env.tokenizer_episodes=2",
                    "--config.teacher.build.demo_episodes=2", "--config.eval.episodes=2")
  final = [r for r in records if r["kind"] == "eval"][-1]
  assert any(k.startswith("eval/success/") for k in final)


@pytest.mark.long
@pytest.mark.skipif(_needs("bm25s"), reason="needs the search extra")
def test_paper_scale_config_runs_with_hf_student_and_teacher(tmp_path):
  """configs/searchqa_qwen3.py as is (HF student and teacher, the student's tokenizer,
  the paper's question files), shrunk: a random tiny Qwen3 in an HF directory stands in
  for Qwen3-0.6B; the run trains it and exports it back to HF."""
  from atod_jax.envs.searchqa import default_data_dir
  from atod_jax.models import load_pretrained
  from tests.train.qwen3_dir import tiny_qwen3_dir

  hotpot = os.path.join(default_data_dir(), "searchqa", "hotpot_distractor",
                        "hotpot_dev_distractor_100.json")
  if not os.path.exists(hotpot):
    pytest.skip("shared data not found")
  hf, vocab = tiny_qwen3_dir(str(tmp_path))
  work = tmp_path / "run"
  cmd = [sys.executable, "-m", "atod_jax.main", f"--config={ROOT}/configs/searchqa_qwen3.py",
         f"--workdir={work}", f"--config.student.path={hf}", f"--config.teacher.path={hf}",
         "--config.student.model.dtype=float32", "--config.teacher.model.dtype=float32",
         f"--config.env.options.corpus={hotpot}", "--config.env.workers=2",
         "--config.env.prompt_len=384", "--config.env.response_len=32",
         "--config.env.eval_batch=4", "--config.optim.microbatches=2",
         "--config.rollout.tasks_per_step=2", "--config.rollout.group_size=2",
         "--config.optim.minibatches=2", "--config.optim.learning_rate=1e-3",
         "--config.train.steps=1", "--config.train.eval_every=1", "--config.eval.episodes=4"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  exported = load_pretrained(os.path.join(work, "student_hf"), dtype="float32")
  assert exported.cfg.vocab_size == vocab
  assert os.path.exists(os.path.join(work, "student_hf", "tokenizer.json"))


def _smollm2_missing():
  """The gguf reader or ALFWorld is missing (the file itself is fetched when the test
  runs, not at collection: smollm2_path)."""
  import importlib.util
  return importlib.util.find_spec("gguf") is None or _needs("alfworld")


@pytest.mark.slow  # ~3 min and ~9 GB on a 2-core CPU (compiling a 30-layer model's steps)
@pytest.mark.skipif(_smollm2_missing(), reason="needs the pretrained and alfworld extras")
@_data("alfworld", "json_2.1.1")
def test_alfworld_smollm2_pretrained_student(tmp_path):
  # the real SmolLM2-135M-Instruct (GGUF) as student, its tokenizer and chat template for
  # the paper's windowed prompts, a teacher built from it by behaviour cloning, two ATOD
  # steps on real ALFWorld games
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "atod_jax.main", f"--config={ROOT}/configs/alfworld_smollm2.py",
         f"--workdir={workdir}", "--config.train.steps=2", "--config.train.eval_every=2",
         "--config.train.checkpoint_every=1", "--config.teacher.build.sft_steps=1",
         "--config.teacher.build.demo_episodes=1", "--config.teacher.build.batch_size=1",
         "--config.teacher.build.select_every=0", "--config.rollout.tasks_per_step=1",
         "--config.rollout.group_size=2", "--config.env.max_turns=2",
         "--config.env.response_len=32", "--config.eval.episodes=1", "--config.env.eval_batch=1",
         "--config.eval.select_split=", "--config.eval.report_splits=()",
         "--config.optim.minibatches=1", "--config.optim.microbatches=1"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "from SmolLM2-135M-Instruct.Q4_1.gguf" in proc.stdout + proc.stderr
  with open(workdir / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  train = [r for r in records if r["kind"] == "train"]
  assert [r["step"] for r in train] == [0, 1]
  for r in train:  # the teacher scored the student's tokens and the update ran
    assert r["response_tokens"] > 0 and r["grad_norm"] > 0 and r["seconds/score"] > 0
  evals = [r for r in records if r["kind"] == "eval"]
  assert 0.0 <= evals[-1]["eval/format_error_rate"] <= 1.0
  # the trained student is exported with the GGUF's tokenizer, readable by transformers
  out = workdir / "student_hf"
  assert (out / "tokenizer.json").exists() and (out / "model.safetensors").exists()
  from atod_jax.models import Tokenizer
  assert "<|im_start|>" in Tokenizer.from_pretrained(out).chat_template
