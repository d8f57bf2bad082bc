"""Search-QA on the real HotpotQA sample: rewards, retrieval recall, the HTTP retriever,
the worker pool and the demonstrations dataset."""
import functools
import http.server
import json
import os
import threading

import numpy as np
import pytest

pytest.importorskip("bm25s")

from atod_jax.envs import searchqa as sq  # noqa: E402
from atod_jax.envs.pool import EnvPool  # noqa: E402

HOTPOT = os.path.join(sq.default_data_dir(), "searchqa", "hotpot_distractor",
                      "hotpot_dev_distractor_100.json")
needs_data = pytest.mark.skipif(not os.path.exists(HOTPOT),
                                reason=f"shared data not found at {HOTPOT} (set ATOD_JAX_DATA)")


def test_answer_scores_by_hand():
  assert sq.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
  assert sq.exact_match("the Beatles", ["Beatles", "x"]) == 1.0
  assert sq.exact_match("Beatles band", ["Beatles"]) == 0.0
  # pred "beatles band" vs gold "beatles": p = 1/2, r = 1 -> f1 = 2/3
  assert sq.f1_score("Beatles band", ["Beatles"]) == pytest.approx(2 / 3)
  assert sq.f1_score("nothing", ["Beatles"]) == 0.0


@pytest.fixture(scope="module")
def env():
  return sq.hotpot_sample_env(path=HOTPOT)


@needs_data
def test_gold_answer_earns_one_and_a_wrong_one_less(env):
  batch = env.reset("train", [0, 1, 2])
  gold = [f"<answer>{q['answers'][0]}</answer>" for q in env._items]
  batch = env.step([gold[0], "<answer>Paris</answer>", f"I think <answer>{env._items[2]['answers'][0].upper()}</answer>"])
  np.testing.assert_array_equal(batch.rewards, [1.0, 0.0, 1.0])
  np.testing.assert_array_equal(batch.wons, [True, False, True])
  assert batch.dones.all() and batch.infos[1]["em"] == 0.0 and "f1" in batch.infos[1]


@needs_data
def test_search_returns_a_supporting_paragraph_for_most_questions(env):
  questions = env.splits["train"] + env.splits["heldout"]
  hits = env.retriever.search([q["question"] for q in questions], 3)
  recall = np.mean([any(h["title"] in q["supporting_titles"] for h in row)
                    for q, row in zip(questions, hits)])
  print(f"\nBM25 recall@3 of a supporting paragraph over {len(questions)} questions: {recall:.2f}")
  assert recall >= 0.9  # measured 0.94
  batch = env.reset("heldout", [0])
  batch = env.step([f"<search>{env._items[0]['question']}</search>"])
  obs = batch.observations[0]
  assert obs.startswith("<information>Doc 1(Title: ") and obs.count("Doc ") == 3
  assert not batch.dones[0] and batch.infos[0]["query"] == env._items[0]["question"]


@needs_data
def test_invalid_actions_and_the_turn_limit(env):
  batch = env.reset("train", [3, 4])
  for turn in range(4):
    batch = env.step(["let me think", "<search>x</search>"])
    assert batch.infos[0]["invalid"] and batch.observations[0] == sq.INVALID_NOTE
    assert batch.dones.all() == (turn == 3)
  assert not batch.wons.any() and (batch.rewards == 0).all()
  with pytest.raises(ValueError, match="out of range"):
    env.reset("heldout", [20])


class _SearchR1Server(http.server.BaseHTTPRequestHandler):
  def do_POST(self):  # noqa: N802
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    result = [[{"document": {"id": str(j), "contents": f'"Title {q} {j}"\ntext {j}'},
                "score": 1.0 / (j + 1)} for j in range(body["topk"])] for q in body["queries"]]
    data = json.dumps({"result": result}).encode()
    self.send_response(200)
    self.send_header("Content-Type", "application/json")
    self.end_headers()
    self.wfile.write(data)

  def log_message(self, *args):
    pass


def test_http_retriever_speaks_the_search_r1_api():
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SearchR1Server)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    r = sq.HTTPRetriever(f"http://127.0.0.1:{server.server_port}/retrieve")
    hits = r.search(["a", "b"], 2)
    assert [[h["title"] for h in row] for row in hits] == [["Title a 0", "Title a 1"],
                                                            ["Title b 0", "Title b 1"]]
    assert hits[1][1]["text"] == "text 1" and hits[0][1]["score"] == 0.5
    env = sq.SearchQAEnv({"test": [{"id": "0", "question": "q?", "answers": ["x"]}]}, r, topk=2)
    env.reset("test", [0])
    assert "Doc 2(Title: Title q 1) text 1" in env.step(["<search>q</search>"]).observations[0]
  finally:
    server.shutdown()


@needs_data
def test_expert_through_the_pool_with_2_workers_and_into_the_dataset(tmp_path):
  from atod_jax.data.demos import (
      build_demonstrations, collect_expert_episodes, decode_episode, load_demonstrations)
  factory = functools.partial(sq.hotpot_sample_env, path=HOTPOT)
  with EnvPool(factory, num_workers=2, step_timeout=30.0) as pool:
    episodes = list(collect_expert_episodes(pool, "train", range(40), batch_size=20))
    assert len(episodes) == 40 and all(ep["won"] for ep in episodes)
    assert all(len(ep["actions"]) == 2 for ep in episodes)  # search, then answer
    assert pool.stats["restarts"] == 0
  build_demonstrations(episodes, tmp_path, "searchqa-hotpot")
  src = load_demonstrations(tmp_path, "searchqa-hotpot", "train")
  got = decode_episode(src[0])
  assert got["actions"][0].startswith("<search>") and got["observations"][1].startswith(
      "<information>")


@needs_data
def test_survives_a_worker_killed_mid_episode(env):
  from tests.envs.real_env_checks import check_pool
  check_pool(functools.partial(sq.hotpot_sample_env, path=HOTPOT), "train", [0, 1, 2, 3],
             local=env)


@needs_data
def test_the_papers_question_files_load():
  path = os.path.join(sq.default_data_dir(), "searchqa", "deepresearcher", "test.jsonl")
  questions = sq.load_questions(path)
  assert len(questions) == 3197
  assert all(q["question"] and q["answers"] for q in questions)
  with pytest.raises(FileNotFoundError, match="question file not found"):
    sq.load_questions(path + ".missing")


def test_questions_from_a_tfds_array_record_dataset(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyTriviaQa(tfds.core.GeneratorBasedBuilder):  # TriviaQA's answer layout
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
          "question": tfds.features.Text(),
          "answer": {"value": tfds.features.Text(),
                     "aliases": tfds.features.Sequence(tfds.features.Text())}}))

    def _split_generators(self, dl_manager):
      return {"validation": self._generate_examples()}

    def _generate_examples(self):
      yield 0, {"question": "Who wrote Hamlet?", "answer": {"value": "Shakespeare",
                "aliases": ["Shakespeare", "William Shakespeare"]}}
      yield 1, {"question": "Capital of France?", "answer": {"value": "Paris", "aliases": []}}

  builder = TinyTriviaQa(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  questions = sq.questions_from_tfds(builder.data_dir, "validation")
  by_q = {q["question"]: q["answers"] for q in questions}
  assert by_q == {"Who wrote Hamlet?": ["Shakespeare", "William Shakespeare"],
                  "Capital of France?": ["Paris"]}
  env = sq.SearchQAEnv({"validation": questions}, retriever=None)
  env.reset("validation", [0, 1])
  gold = [f"<answer>{q['answers'][-1]}</answer>" for q in env._items]
  assert env.step(gold).wons.all()
  with pytest.raises(KeyError, match="question_key"):
    sq.questions_from_tfds(builder.data_dir, "validation", question_key="query")


def test_training_questions_that_are_evaluation_questions_stop_the_run(tmp_path):
  """A question in both the training and the evaluation split (by normalised text) fails
  config validation in one line; ``minus`` trains on the difference."""
  import json as _json

  from atod_jax.envs.searchqa import question_splits
  from atod_jax.train import ConfigError, validate
  from atod_jax.train import defaults as d

  def write(name, questions):
    path = tmp_path / name
    path.write_text("\n".join(_json.dumps({"question": q, "golden_answers": ["x"]})
                              for q in questions))
    return str(path)

  dev = write("dev.jsonl", ["Who wrote Hamlet?", "What is the capital of France?", "Why?"])
  test = write("test.jsonl", ["who wrote  hamlet", "How far is the Moon?"])
  splits = question_splits({"train": {"path": dev, "minus": ["test"]}, "test": test})
  assert [q["question"] for q in splits["train"]] == ["What is the capital of France?", "Why?"]
  with pytest.raises(ValueError, match="not a split"):
    question_splits({"train": {"path": dev, "minus": ["valid"]}, "test": test})
  config = d.tiny_text_run("searchqa", max_turns=4, train_split="train", eval_split="test",
                           options=dict(questions=dict(train=dev, test=test), corpus=dev))
  with pytest.raises(ConfigError) as e:
    validate(config)
  message = str(e.value)
  assert message.startswith("config.env.options: 1 of the 3 'train' questions are also in "
                            "the 'test' split") and "\n" not in message
  config.env.options.questions = dict(train=dict(path=dev, minus=["test"]), test=test)
  validate(config)
