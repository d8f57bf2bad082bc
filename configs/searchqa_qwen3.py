"""ATOD on Search-QA with a Qwen3 student and teacher from local HF directories, the
paper's hyperparameters (GPU / TPU), against a Search-R1 retrieval server.

    python -m atod_jax.main --config configs/searchqa_qwen3.py --workdir runs/sqa_q3 \\
        --config.student.path=/models/Qwen3-0.6B --config.teacher.path=/models/teacher-4B \\
        --config.env.options.retriever_url=http://127.0.0.1:8000/retrieve

Questions: the paper's seven benchmarks as flattened by DeepResearcher
(../shared/data/searchqa/deepresearcher/{dev,test}.jsonl; train on dev minus the
questions also in test, evaluate on test: point questions.train at your own training
set, e.g. NQ + HotpotQA train). A training question that is also an evaluation question
stops the run at start-up. 4 turns,
top-3 passages, exact-match reward. The student answers
<think>...</think><search>query</search> or <think>...</think><answer>...</answer>.
Other settings (windowed prompts, memory) as configs/alfworld_qwen3.py.
"""
import os

from atod_jax.train import defaults as d

_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                     "shared", "data", "searchqa", "deepresearcher")


def get_config():
  # train on dev minus the questions that are also in test (191 of dev's 875 by
  # normalised text: all of Bamboogle's), so no evaluation question is seen in training
  questions = dict(train=dict(path=os.path.normpath(os.path.join(_DATA, "dev.jsonl")),
                              minus=["test"]),
                   test=os.path.normpath(os.path.join(_DATA, "test.jsonl")))
  c = d.paper_run(d.text_env(
      "searchqa", max_turns=4, layout="window", history=2, prompt_len=2048, response_len=512,
      obs_len=0, workers=4, step_timeout=600.0, train_split="train", eval_split="test",
      eval_batch=128, tokenizer="student", vocab=0, tokenizer_episodes=0,
      options=dict(questions=questions, retriever_url="", corpus="", path="", heldout=20,
                   topk=3)))
  c.eval.episodes = 3197
  return c
