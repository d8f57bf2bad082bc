"""Search-QA in the Search-R1 style, behind the batched text protocol.

Each episode is one question. Per turn the agent writes either
``<search>query</search>``, answered with the top-k passages of a retriever inside
``<information>...</information>``, or ``<answer>text</answer>``, which ends the
episode with the exact-match reward (SQuAD normalisation; token F1 in ``infos``). Any
other text is an invalid action: the episode goes on with a note saying what is
allowed. Without an answer the episode ends after ``max_turns`` (4, the paper's limit)
with reward 0.

Retrievers: :class:`BM25Retriever` over a local corpus (``bm25s``; install the
``search`` extra), or :class:`HTTPRetriever` for a server speaking the Search-R1
retrieval API (``POST {"queries", "topk", "return_scores"}`` -> ``{"result": [[{"document":
{"contents": ...}, "score": ...}]]}``), e.g. an E5 index over Wikipedia.

Question sets: :func:`load_questions` reads the JSONL files of the paper's seven
benchmarks (``{"question", "golden_answers"}``) or a HotpotQA JSON list,
:func:`questions_from_tfds` reads a TFDS dataset prepared as array_record, and
:func:`hotpot_corpus` turns the HotpotQA sample's context paragraphs into a corpus in
which every answer can be found. The expert (for demonstrations) searches the question
once, then answers the first gold answer.
"""
from __future__ import annotations

import ast
import collections
import json
import os
import re
import string
import urllib.request
from typing import Sequence

import numpy as np

from atod_jax.envs.base import Batch, start_step

SEARCH = re.compile(r"<search>(.*?)</search>", re.DOTALL)
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
INVALID_NOTE = ("Invalid action. Write <search>a query</search> to search, or "
                "<answer>the answer</answer> to answer.")


# ------------------------------------------------------------------------ answers
def normalize_answer(text: str) -> str:
  """SQuAD / Search-R1 normalisation: lower case, no punctuation, no articles, single
  spaces."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
  pred = normalize_answer(prediction)
  return float(any(pred == normalize_answer(a) for a in answers))


def f1_score(prediction: str, answers: Sequence[str]) -> float:
  """Best token-level F1 over the gold answers."""
  best = 0.0
  pred = normalize_answer(prediction).split()
  for answer in answers:
    gold = normalize_answer(answer).split()
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same:
      p, r = same / len(pred), same / len(gold)
      best = max(best, 2 * p * r / (p + r))
  return best


# ------------------------------------------------------------------------ data
def _field(value):
  """HotpotQA fields stored as Python-literal strings in some exports."""
  return ast.literal_eval(value) if isinstance(value, str) else value


def load_questions(path: str) -> list[dict]:
  """``[{"id", "question", "answers": [...]}]`` from a JSONL file with ``golden_answers``
  (or ``answer``) per line, or a JSON list of HotpotQA records."""
  path = os.path.expanduser(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"question file not found: {path}")
  with open(path) as f:
    text = f.read()
  records = json.loads(text) if text.lstrip().startswith("[") else [
      json.loads(line) for line in text.splitlines() if line.strip()]
  out = []
  for i, r in enumerate(records):
    answers = r.get("golden_answers", r.get("answers", r.get("answer")))
    if isinstance(answers, str):
      answers = [answers]
    if not r.get("question") or not answers:
      raise ValueError(f"{path}: record {i} has no question or no answer")
    out.append({"id": str(r.get("id", r.get("_id", i))), "question": r["question"].strip(),
                "answers": list(answers),
                "supporting_titles": sorted(set(_field(r["supporting_facts"])["title"]))
                if "supporting_facts" in r else []})
  return out


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _answer_list(value) -> list[str]:
  """Answers from TFDS answer fields: a string, a list of strings, or a dict with
  ``aliases`` / ``value`` / ``text`` (TriviaQA, SQuAD-style) fields."""
  if isinstance(value, dict):
    for key in ("aliases", "value", "text", "answers"):
      if key in value and len(value[key]):
        return _answer_list(value[key])
    return []
  if isinstance(value, (bytes, str)):
    return [_text(value)]
  return [_text(v) for v in np.asarray(value).ravel().tolist()]


def questions_from_tfds(dataset: str, split: str, *, data_dir: str | None = None,
                        question_key: str = "question", answer_key: str = "answer",
                        limit: int | None = None) -> list[dict]:
  """Questions from a TFDS dataset prepared in the array_record format (read with TFDS
  data sources, no TensorFlow): ``dataset`` is a registered name (e.g.
  ``"trivia_qa/rc.nocontext"``, found in ``data_dir``) or the directory of a prepared
  dataset version. Answers may be a string, a list, or a dict with ``aliases`` /
  ``value`` / ``text``."""
  import tensorflow_datasets as tfds  # the `data` extra
  if os.path.isdir(os.path.expanduser(dataset)):
    source = tfds.builder_from_directory(os.path.expanduser(dataset)).as_data_source(split=split)
  else:
    source = tfds.data_source(dataset, split=split, data_dir=data_dir)
  out = []
  for i in range(len(source) if limit is None else min(limit, len(source))):
    record = source[i]
    if question_key not in record or answer_key not in record:
      raise KeyError(f"{dataset}: records have {sorted(record)}; pass question_key / answer_key")
    answers = _answer_list(record[answer_key])
    if answers:
      out.append({"id": _text(record.get("id", i)), "question": _text(record[question_key]).strip(),
                  "answers": answers, "supporting_titles": []})
  return out


def hotpot_corpus(path: str) -> list[dict]:
  """The context paragraphs of a HotpotQA JSON file as passages ``{"title", "text"}``
  (each title once)."""
  with open(os.path.expanduser(path)) as f:
    records = json.load(f)
  seen, passages = set(), []
  for r in records:
    context = _field(r["context"])
    for title, sentences in zip(context["title"], context["sentences"]):
      if title not in seen:
        seen.add(title)
        passages.append({"title": title, "text": "".join(sentences).strip()})
  return passages


# ------------------------------------------------------------------------ retrievers
class BM25Retriever:
  """BM25 (``bm25s``) over passages ``{"title", "text"}``; English stop words removed."""

  def __init__(self, passages: Sequence[dict]):
    import bm25s  # the `search` extra
    self._bm25s = bm25s
    self.passages = list(passages)
    if not self.passages:
      raise ValueError("empty corpus")
    texts = [f"{p['title']}\n{p['text']}" for p in self.passages]
    self._index = bm25s.BM25()
    self._index.index(bm25s.tokenize(texts, stopwords="en", show_progress=False),
                      show_progress=False)

  def search(self, queries: Sequence[str], k: int) -> list[list[dict]]:
    k = min(k, len(self.passages))
    tokens = self._bm25s.tokenize(list(queries), stopwords="en", show_progress=False)
    docs, scores = self._index.retrieve(tokens, k=k, show_progress=False)
    return [[dict(self.passages[int(d)], score=float(s)) for d, s in zip(row, srow)]
            for row, srow in zip(np.asarray(docs), np.asarray(scores))]


class HTTPRetriever:
  """A Search-R1 compatible retrieval server (e.g. its E5 Wikipedia index)."""

  def __init__(self, url: str, timeout: float = 30.0):
    self.url = url
    self.timeout = timeout

  def search(self, queries: Sequence[str], k: int) -> list[list[dict]]:
    body = json.dumps({"queries": list(queries), "topk": k, "return_scores": True}).encode()
    request = urllib.request.Request(self.url, data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=self.timeout) as response:
      result = json.load(response)["result"]
    out = []
    for row in result:
      hits = []
      for hit in row:
        doc = hit.get("document", hit)
        contents = doc.get("contents", "")
        title, _, text = contents.partition("\n")
        hits.append({"title": title.strip().strip('"'), "text": text.strip(),
                     "score": float(hit.get("score", 0.0))})
      out.append(hits)
    return out


def format_passages(hits: Sequence[dict]) -> str:
  """Search-R1's rendering of retrieved passages."""
  docs = "\n".join(f"Doc {i + 1}(Title: {h['title']}) {h['text']}" for i, h in enumerate(hits))
  return f"<information>{docs}</information>"


# ------------------------------------------------------------------------ environment
class SearchQAEnv:
  """Batched text protocol over question sets and a retriever.

  Args:
    splits: split name -> questions (from :func:`load_questions`).
    retriever: anything with ``search(queries, k) -> [[{"title", "text"}]]``.
    topk: passages per search (3 in the paper).
    max_turns: 4 in the paper.
  """

  def __init__(self, splits: dict[str, list[dict]], retriever, topk: int = 3,
               max_turns: int = 4):
    if topk < 1 or max_turns < 1:
      raise ValueError("topk and max_turns must be >= 1")
    self.splits = splits
    self.retriever = retriever
    self.topk = topk
    self.max_turns = max_turns
    self._items: list[dict] = []

  def num_tasks(self, split: str) -> int:
    if split not in self.splits:
      raise ValueError(f"split must be one of {tuple(self.splits)}, got {split!r}")
    return len(self.splits[split])

  def _batch(self, observations, rewards, infos) -> Batch:
    done = self._done.copy()
    expert = [None if d else (f"<search>{q['question']}</search>" if t == 0 else
                              f"<answer>{q['answers'][0]}</answer>")
              for q, t, d in zip(self._items, self._turn, done)]
    return Batch(observations=observations, tasks=[q["question"] for q in self._items],
                 rewards=np.asarray(rewards, np.float32), dones=done, wons=self._won.copy(),
                 expert=expert, aborted=np.zeros(len(done), bool), infos=infos)

  def reset(self, split: str, task_ids: Sequence[int]) -> Batch:
    if split not in self.splits:
      raise ValueError(f"split must be one of {tuple(self.splits)}, got {split!r}")
    questions = self.splits[split]
    bad = [i for i in task_ids if not 0 <= i < len(questions)]
    if bad:
      raise ValueError(f"task ids {bad[:5]} out of range for split {split!r} "
                       f"({len(questions)} questions)")
    self._items = [questions[i] for i in task_ids]
    n = len(task_ids)
    self._turn = np.zeros(n, int)
    self._done = np.zeros(n, bool)
    self._won = np.zeros(n, bool)
    obs = [f"Question: {q['question']}" for q in self._items]
    return self._batch(obs, np.zeros(n), [{"task_id": int(i), "split": split, "id": q["id"]}
                                          for i, q in zip(task_ids, self._items)])

  def step(self, actions: Sequence[str | None]) -> Batch:
    n = len(self._items)
    obs, rewards, infos = start_step(actions, n)
    searches: dict[int, str] = {}
    was_live = ~self._done
    for i, action in enumerate(actions):
      if self._done[i]:
        continue
      text = action or ""
      answer, search = ANSWER.search(text), SEARCH.search(text)
      first = min((m for m in (answer, search) if m), key=lambda m: m.start(), default=None)
      if first is not None and first is answer:
        pred = answer.group(1).strip()
        em = exact_match(pred, self._items[i]["answers"])
        rewards[i] = em
        self._won[i] = em == 1.0
        self._done[i] = True
        obs[i] = "Answer received."
        infos[i] = {"answer": pred, "em": em, "f1": f1_score(pred, self._items[i]["answers"]),
                    "invalid": False}
      elif first is not None:
        searches[i] = search.group(1).strip()
        infos[i] = {"query": searches[i], "invalid": False}
      else:
        obs[i] = INVALID_NOTE
        infos[i] = {"invalid": True}
    if searches:
      hits = self.retriever.search(list(searches.values()), self.topk)
      for i, h in zip(searches, hits):
        obs[i] = format_passages(h)
        infos[i]["titles"] = [x["title"] for x in h]
    self._turn[was_live] += 1
    out_of_turns = ~self._done & (self._turn >= self.max_turns)
    self._done |= out_of_turns
    for i in np.flatnonzero(out_of_turns):
      infos[i].update(em=0.0, f1=0.0, answer=None)
    return self._batch(obs, rewards, infos)

  def close(self) -> None:
    self._items = []


def default_data_dir() -> str:
  """``$ATOD_JAX_DATA`` or the ``shared/data`` folder next to the repository."""
  here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return os.path.abspath(os.path.expanduser(
      os.environ.get("ATOD_JAX_DATA", os.path.join(os.path.dirname(here), "shared", "data"))))


def hotpot_sample_env(worker_index: int = 0, *, path: str | None = None, heldout: int = 20,
                      topk: int = 3, max_turns: int = 4) -> SearchQAEnv:
  """The HotpotQA distractor sample: its context paragraphs as a BM25 corpus, the last
  ``heldout`` questions as the "heldout" split and the rest as "train". Also the
  :class:`~atod_jax.envs.pool.EnvPool` factory (it takes the worker index first; set
  the rest with ``functools.partial``)."""
  del worker_index
  path = path or os.path.join(default_data_dir(), "searchqa", "hotpot_distractor",
                              "hotpot_dev_distractor_100.json")
  questions = load_questions(path)
  splits = {"train": questions[:-heldout], "heldout": questions[-heldout:]}
  return SearchQAEnv(splits, BM25Retriever(hotpot_corpus(path)), topk, max_turns)


def question_key(question: str) -> str:
  """A question's identity across files: its SQuAD-normalised text."""
  return normalize_answer(question)


def question_splits(questions: dict) -> dict[str, list[dict]]:
  """Split name -> questions, from split name -> a question file, or -> ``{"path": file,
  "minus": [split, ...]}``: the file's questions without those (by :func:`question_key`)
  of the named splits (e.g. train on DeepResearcher's dev minus its test)."""
  spec = {k: v if isinstance(v, dict) else {"path": v} for k, v in dict(questions).items()}
  splits = {k: load_questions(v["path"]) for k, v in spec.items()}
  for name, v in spec.items():
    for other in v.get("minus", ()):
      if other not in splits:
        raise ValueError(f"questions.{name}.minus names {other!r}, not a split "
                         f"({', '.join(splits)})")
      taken = {question_key(q["question"]) for q in splits[other]}
      splits[name] = [q for q in splits[name] if question_key(q["question"]) not in taken]
  return splits


def check_disjoint(env_config) -> None:
  """Start-up check (the registry's ``check``): no training question is also a question
  of the evaluation split. Raises ``ValueError`` naming how many and one of them."""
  options = env_config.options.to_dict() if hasattr(env_config.options, "to_dict") \
      else dict(env_config.options)
  if not options.get("questions"):
    return  # the HotpotQA sample: its splits are disjoint slices of one file
  splits = question_splits(options["questions"])
  train, evaluate = env_config.train_split, env_config.eval_split
  for name in (train, evaluate):
    if name not in splits:
      raise ValueError(f"env.options.questions has no split {name!r} ({', '.join(splits)})")
  held = {question_key(q["question"]) for q in splits[evaluate]}
  shared = [q["question"] for q in splits[train] if question_key(q["question"]) in held]
  if shared:
    raise ValueError(
        f"{len(shared)} of the {len(splits[train])} {train!r} questions are also in the "
        f"{evaluate!r} split (e.g. {shared[0][:80]!r}); train on the difference: "
        f"questions.{train} = {{'path': ..., 'minus': [{evaluate!r}]}}")


def searchqa_env(worker_index: int = 0, *, questions: dict | None = None, retriever_url: str = "",
                 corpus: str = "", path: str = "", heldout: int = 20, topk: int = 3,
                 max_turns: int = 4) -> SearchQAEnv:
  """The trainer's Search-QA factory (also an :class:`~atod_jax.envs.pool.EnvPool` one).

  With ``questions`` (split -> question file, e.g. the paper's
  ``deepresearcher/{test,dev}.jsonl``, or -> ``{"path", "minus"}``: see
  :func:`question_splits`): those splits, searched through
  ``retriever_url`` (a Search-R1 retrieval server, e.g. an E5 Wikipedia index) or a BM25
  index over ``corpus`` (a HotpotQA JSON file whose paragraphs form the corpus).
  Without: the HotpotQA sample (:func:`hotpot_sample_env`, ``path`` to override)."""
  if not questions:
    return hotpot_sample_env(worker_index, path=path or None, heldout=heldout, topk=topk,
                             max_turns=max_turns)
  splits = question_splits(questions)
  if retriever_url:
    retriever = HTTPRetriever(retriever_url)
  elif corpus:
    retriever = BM25Retriever(hotpot_corpus(corpus))
  else:
    raise ValueError("searchqa_env: give retriever_url (a Search-R1 retrieval server) or "
                     "corpus (a HotpotQA JSON file) with questions")
  return SearchQAEnv(splits, retriever, topk, max_turns)
