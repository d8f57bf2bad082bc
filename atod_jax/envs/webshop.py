"""WebShop (the small 1,000-product setting) as a text environment of our own.

No package runs WebShop offline, so this re-implements its text mode on the original
product, instruction and goal files (``webshop/`` in the shared data, or a path /
``$WEBSHOP_DATA``):

* pages: search -> results (10 per page, 50 results) -> item (options, Description,
  Features, Reviews, Buy Now) -> the item's sub-pages; observations are the visible
  texts joined by ``[SEP]`` as in WebShop's ``observation_mode="text"``;
* actions: ``search[keywords]`` where there is a search bar, ``click[name]`` for a
  button, a product (its ASIN), an option value, ``< prev``, ``next >``, ``back to
  search``; anything else does nothing and is flagged ``info["invalid"]``;
* reward on ``click[buy now]``: WebShop's: (goal attributes matched + goal options
  matched + price within bound) / (their count + 1), times the type match; success is
  reward 1.0; at most 15 turns (the paper's limit);
* goals: the synthetic goals (one per option combination of each of the 415 products
  with an instruction: 6,910), shuffled with seed 233 and split as upstream does
  (test = first 500, eval = next 1,000, train = the rest), and the 13 human goals
  whose products are in the catalogue (split "human").

Where it differs from upstream (documented in ``docs/webshop.md``): BM25 from ``bm25s``
over the same documents instead of Lucene, so result order differs; the type match's
noun overlap uses lower-cased content words (no spaCy model offline); no review texts
or ratings (the 1k files carry none); prices and price bounds come from a seeded
generator, so the same seed always gives the same goals; colours are normalised to the
first basic colour word they contain.

The expert (for demonstrations) is the scripted buyer: it searches the goal's product
query, pages on until the target product shows, opens it, clicks each goal option and
buys.
"""
from __future__ import annotations

import ast
import dataclasses
import gzip
import itertools
import json
import os
import random
import re
from decimal import Decimal
from typing import Sequence

import numpy as np

from atod_jax.envs.base import Batch, start_step
from atod_jax.envs.searchqa import default_data_dir

SEARCH_RETURN_N = 50
PRODUCT_WINDOW = 10
PRICE_RANGE = [10.0 * i for i in range(1, 100)]
EXACT_MATCH_OPTS = ("size",)
BUY, NEXT, PREV, BACK = "buy now", "next >", "< prev", "back to search"
SUB_PAGES = ("description", "features", "reviews")
SEP = " [SEP] "
_ACTION = re.compile(r"^\s*(search|click)\[(.+)\]\s*$", re.DOTALL)
_BASIC_COLOURS = (
    "black", "white", "grey", "gray", "silver", "gold", "red", "pink", "purple", "blue",
    "navy", "green", "olive", "yellow", "orange", "brown", "beige", "khaki", "ivory",
    "cream", "tan", "coffee", "wine", "burgundy", "teal", "turquoise", "aqua", "mint",
    "coral", "rose", "multicolor", "clear")
_STOP = frozenset((
    "a", "an", "and", "the", "of", "for", "with", "in", "on", "to", "by", "from", "or",
    "at", "is", "are", "be", "it", "its", "as", "x", "pack", "count", "set", "inch", "oz",
    "ounce", "size", "color", "new"))


def webshop_data_dir(path: str | None = None) -> str:
  if path:
    return os.path.abspath(os.path.expanduser(path))
  return os.path.abspath(os.path.expanduser(os.environ.get("WEBSHOP_DATA") or
                                            os.path.join(default_data_dir(), "webshop")))


# ------------------------------------------------------------------------ catalogue
def _listish(value) -> list[str]:
  if isinstance(value, list):
    return [str(v) for v in value]
  if isinstance(value, str) and value.startswith("["):
    try:
      return [str(v) for v in ast.literal_eval(value)]
    except (ValueError, SyntaxError):
      pass
  return [str(value)] if value else []


def _product(raw: dict, attributes: dict) -> dict:
  pricing = raw.get("pricing")
  if not pricing:
    pricing, price_tag = [100.0], "$100.0"
  else:
    pricing = [float(Decimal(re.sub(r"[^\d.]", "", p))) for p in str(pricing).split("$")[1:]
               if re.sub(r"[^\d.]", "", p)][:2]
    price_tag = f"${pricing[0]}" if len(pricing) == 1 else f"${pricing[0]} to ${pricing[1]}"
  options: dict[str, list[str]] = {}
  for name, contents in (raw.get("customization_options") or {}).items():
    if contents:
      options[name.lower()] = [c["value"].strip().replace("/", " | ").lower() for c in contents]
  attrs = attributes.get(raw["asin"], {})
  return {
      "asin": raw["asin"], "Title": raw["name"], "name": raw["name"],
      "Description": raw.get("full_description") or "",
      "BulletPoints": _listish(raw.get("small_description")),
      "pricing": pricing, "Price": price_tag, "options": options,
      "Attributes": attrs.get("attributes") or ["DUMMY_ATTR"],
      "instruction_text": attrs.get("instruction"),
      "instruction_attributes": attrs.get("instruction_attributes"),
      "category": raw.get("category", ""), "query": (raw.get("query") or "").lower().strip(),
      "product_category": raw.get("product_category", ""),
  }


@dataclasses.dataclass
class Catalogue:
  """Products, goals and the search index of one WebShop data folder."""

  products: dict[str, dict]
  prices: dict[str, float]
  goals: dict[str, list[dict]]
  documents: list[str]  # asin per indexed document
  index: object

  def search(self, keywords: str, k: int = SEARCH_RETURN_N) -> list[str]:
    import bm25s
    tokens = bm25s.tokenize([keywords], stopwords="en", show_progress=False)
    if not tokens.vocab:  # only stop words
      return []
    docs, scores = self.index.retrieve(tokens, k=min(k, len(self.documents)),
                                       show_progress=False)
    return [self.documents[int(d)] for d, s in zip(docs[0], scores[0]) if s > 0
            and self.documents[int(d)] in self.products]


def load_catalogue(data_dir: str | None = None, seed: int = 233) -> Catalogue:
  """Reads the 1k products, builds the goals and the BM25 index (a few seconds)."""
  root = webshop_data_dir(data_dir)
  paths = {"items": os.path.join(root, "data", "items_shuffle_1000.json"),
           "attributes": os.path.join(root, "data", "items_ins_v2_1000.json"),
           "human": os.path.join(root, "data", "items_human_ins_1000subset.json"),
           "documents": os.path.join(root, "search_engine", "resources_1k",
                                     "documents.jsonl.gz")}
  for what, path in paths.items():
    if not os.path.exists(path):
      raise FileNotFoundError(f"WebShop {what} file not found: {path} (pass data_dir or set "
                              "$WEBSHOP_DATA to the webshop data folder)")
  with open(paths["items"]) as f:
    raw = json.load(f)
  with open(paths["attributes"]) as f:
    attributes = json.load(f)
  with open(paths["human"]) as f:
    human = json.load(f)
  products: dict[str, dict] = {}
  for r in raw:
    if r["asin"] != "nan" and len(r["asin"]) <= 10 and r["asin"] not in products:
      products[r["asin"]] = _product(r, attributes)
  prices, goals = _prices_and_goals(products, human, seed)
  documents, index = _search_index(paths["documents"])
  return Catalogue(products, prices, goals, documents, index)


def _goal(asin: str, p: dict, instruction: str, attributes, upper: float, options) -> dict:
  return {"asin": asin, "category": p["category"], "query": p["query"], "name": p["Title"],
          "product_category": p["product_category"], "instruction_text": instruction,
          "attributes": attributes, "price_upper": upper, "goal_options": options}


def _prices_and_goals(products: dict, human: dict, seed: int) -> tuple[dict, dict]:
  """Each product's price (drawn in its range) and the goals: every option combination
  of every product with an instruction (split test / eval / train), and the human ones."""
  rng = random.Random(seed)
  prices = {}
  for asin, p in products.items():
    prices[asin] = p["pricing"][0] if len(p["pricing"]) == 1 else rng.uniform(*p["pricing"][:2])

  def price_bound(asin):
    above = [x for x in PRICE_RANGE if x > prices[asin]][:4]
    if len(above) >= 2:
      upper = sorted(rng.sample(above, 2))[1]
      return upper, f", and price lower than {upper:.2f} dollars"
    return 1000000.0, ""

  synthetic = []
  for asin, p in products.items():
    if not p["instruction_text"] or not p["instruction_attributes"]:
      continue
    upper, price_text = price_bound(asin)
    names = sorted(p["options"])
    for combo in itertools.product(*(p["options"][n] for n in names)):
      goal_options = dict(zip(names, combo))
      text = ", and ".join(f"{k}: {v}" for k, v in goal_options.items())
      synthetic.append(_goal(
          asin, p, p["instruction_text"] + (f" with {text}" if text else "") + price_text,
          p["instruction_attributes"], upper, goal_options))
  human_goals = []
  for asin, items in human.items():
    if asin not in products:
      continue
    for item in items:
      if not item.get("instruction_attributes"):
        continue
      upper, price_text = price_bound(asin)
      human_goals.append(_goal(asin, products[asin], item["instruction"].strip(".") + price_text,
                               item["instruction_attributes"], upper,
                               list(item.get("instruction_options") or [])))
  random.Random(seed).shuffle(synthetic)
  return prices, {"test": synthetic[:500], "eval": synthetic[500:1500],
                  "train": synthetic[1500:], "human": human_goals}


def _search_index(path: str):
  """The products' documents and a BM25 index of their contents."""
  import bm25s  # the `webshop` / `search` extra
  documents, texts = [], []
  with gzip.open(path, "rt") as f:
    for line in f:
      doc = json.loads(line)
      documents.append(doc["id"])
      texts.append(doc["contents"])
  index = bm25s.BM25()
  index.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
  return documents, index


# ------------------------------------------------------------------------ reward
def normalize_color(text: str) -> str:
  for colour in _BASIC_COLOURS:
    if re.search(rf"\b{colour}\b", text):
      return "grey" if colour == "gray" else colour
  return text


def _content_words(text: str) -> set[str]:
  return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 2 and w not in _STOP}


def type_reward(product: dict, goal: dict) -> float:
  query_match = product["query"] == goal["query"]
  cats = lambda c: {x.strip() for x in c.split("›")}  # noqa: E731
  category_match = len(cats(product["product_category"]) & cats(goal["product_category"])) >= 2
  desired = _content_words(goal["name"])
  title_score = len(_content_words(product["name"]) & desired) / len(desired) if desired else 0.2
  r_type = 1.0 if (query_match or category_match or title_score > 0.2) else 0.5
  if title_score < 0.1:
    r_type = 0.1
  if title_score == 0.0:
    r_type = 0.0
  return r_type


def _ratio(a: str, b: str) -> float:
  from rapidfuzz import fuzz  # the `webshop` extra
  return fuzz.token_set_ratio(a, b)


def _in_text(product: dict, value: str) -> bool:
  return (value in product["Title"].lower() or value in " ".join(product["BulletPoints"]).lower()
          or value in product["Description"].lower())


def webshop_reward(product: dict, goal: dict, price: float, options: dict[str, str]) -> tuple[float, dict]:
  """WebShop's purchase reward and its parts."""
  r_type = type_reward(product, goal)
  attrs = 0
  for g in goal["attributes"]:
    if any(_ratio(p, g) > 85 for p in product["Attributes"]) or _in_text(product, g):
      attrs += 1
  goal_options = list(goal["goal_options"].values()) if isinstance(goal["goal_options"], dict) \
      else list(goal["goal_options"])
  goal_options = [normalize_color(o) for o in goal_options]
  opts = 0
  for key, value in options.items():
    value = normalize_color(value)
    if key.lower() in EXACT_MATCH_OPTS:
      matched = value in goal_options
    else:
      matched = any(_ratio(g, value) > 85 for g in goal_options)
    if matched or _in_text(product, value):
      opts += 1
  r_price = float(price <= goal["price_upper"])
  total = (attrs + opts + r_price) / (len(goal["attributes"]) + len(goal_options) + 1) * r_type
  return total, {"r_type": r_type, "attributes_matched": attrs, "options_matched": opts,
                 "r_price": r_price}


# ------------------------------------------------------------------------ sessions
@dataclasses.dataclass
class _Session:
  goal: dict
  page: str = "search"  # search | results | item | description | features | reviews | done
  keywords: str = ""
  results: list = dataclasses.field(default_factory=list)
  page_no: int = 1
  asin: str | None = None
  options: dict = dataclasses.field(default_factory=dict)


class WebShopEnv:
  """See the module doc. ``catalogue`` is shared by all episodes (load it once)."""

  def __init__(self, catalogue: Catalogue | None = None, *, data_dir: str | None = None,
               max_turns: int = 15):
    if max_turns < 1:
      raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    self.catalogue = catalogue or load_catalogue(data_dir)
    self.max_turns = max_turns
    self._sessions: list[_Session] = []

  @property
  def splits(self) -> dict[str, int]:
    return {k: len(v) for k, v in self.catalogue.goals.items()}

  def num_tasks(self, split: str) -> int:
    if split not in self.catalogue.goals:
      raise ValueError(f"split must be one of {tuple(self.catalogue.goals)}, got {split!r}")
    return len(self.catalogue.goals[split])

  # ---- pages
  def _clickables(self, s: _Session) -> list[str]:
    if s.page == "results":
      out = [BACK] + ([PREV] if s.page_no > 1 else [])
      if s.page_no * PRODUCT_WINDOW < len(s.results):
        out.append(NEXT)
      return out + [a.lower() for a in self._shown(s)]
    if s.page == "item":
      p = self.catalogue.products[s.asin]
      return [BACK, PREV] + [v for vs in p["options"].values() for v in vs] + \
          list(SUB_PAGES) + [BUY]
    if s.page in SUB_PAGES:
      return [BACK, PREV]
    return []

  def _shown(self, s: _Session) -> list[str]:
    return s.results[(s.page_no - 1) * PRODUCT_WINDOW:s.page_no * PRODUCT_WINDOW]

  def admissible(self, i: int) -> list[str]:
    s = self._sessions[i]
    if s.page == "done":
      return []
    return (["search[<keywords>]"] if s.page == "search" else []) + \
        [f"click[{c}]" for c in self._clickables(s)]

  def _render(self, s: _Session) -> str:
    head = ["Instruction:", s.goal["instruction_text"]]
    if s.page == "search":
      return SEP.join(["WebShop"] + head + ["Search"])
    if s.page == "results":
      parts = head + [BACK.title(), f"Page {s.page_no} (Total results: {len(s.results)})"]
      if s.page_no > 1:
        parts.append("< Prev")
      if s.page_no * PRODUCT_WINDOW < len(s.results):
        parts.append("Next >")
      for asin in self._shown(s):
        p = self.catalogue.products[asin]
        parts += [asin, p["Title"], p["Price"]]
      return SEP.join(parts)
    p = self.catalogue.products[s.asin]
    if s.page == "item":
      parts = head + [BACK.title(), "< Prev"]
      for name, values in p["options"].items():
        parts += [name] + values
      parts += [p["Title"], f"Price: {p['Price']}", "Rating: N.A.", "Description", "Features",
                "Reviews", "Buy Now"]
      return SEP.join(parts)
    content = {"description": p["Description"], "features": SEP.join(p["BulletPoints"]),
               "reviews": "No reviews"}[s.page]
    return SEP.join(head + [BACK.title(), "< Prev", content or "N.A."])

  # ---- expert: the scripted buyer
  def _expert(self, s: _Session) -> str | None:
    target = s.goal["asin"]
    if s.page == "search":
      return f"search[{s.goal['query'] or s.goal['name']}]"
    if s.page == "results":
      shown = self._shown(s)
      if target in shown:
        return f"click[{target.lower()}]"
      if target in s.results[s.page_no * PRODUCT_WINDOW:]:
        return f"click[{NEXT}]"
      if target in s.results[:(s.page_no - 1) * PRODUCT_WINDOW]:
        return f"click[{PREV}]"
      return f"click[{BACK}]" if s.keywords != s.goal["name"].lower() else None
    if s.page == "item":
      if s.asin != target:
        return f"click[{PREV}]"
      want = s.goal["goal_options"]
      want = list(want.values()) if isinstance(want, dict) else list(want)
      for name, values in self.catalogue.products[target]["options"].items():
        for v in want:
          if v in values and s.options.get(name) != v:
            return f"click[{v}]"
      return f"click[{BUY}]"
    if s.page in SUB_PAGES:
      return f"click[{PREV}]"
    return None

  def _expert_for(self, i: int) -> str | None:
    s = self._sessions[i]
    if s.page == "search" and s.keywords:  # the query did not find it: search the title
      return f"search[{s.goal['name'].lower()}]"
    return self._expert(s)

  # ---- protocol
  def _batch(self, obs, rewards, infos) -> Batch:
    live = ~self._done
    return Batch(observations=obs, tasks=[s.goal["instruction_text"] for s in self._sessions],
                 rewards=np.asarray(rewards, np.float32), dones=self._done.copy(),
                 wons=self._won.copy(),
                 admissible=[self.admissible(i) if d else [] for i, d in enumerate(live)],
                 expert=[self._expert_for(i) if d else None for i, d in enumerate(live)],
                 aborted=np.zeros(len(live), bool), infos=infos)

  def reset(self, split: str, task_ids: Sequence[int]) -> Batch:
    goals = self.catalogue.goals.get(split)
    if goals is None:
      raise ValueError(f"split must be one of {tuple(self.catalogue.goals)}, got {split!r}")
    bad = [t for t in task_ids if not 0 <= t < len(goals)]
    if bad:
      raise ValueError(f"task ids {bad[:5]} out of range for split {split!r} ({len(goals)} goals)")
    self._sessions = [_Session(goal=goals[t]) for t in task_ids]
    n = len(task_ids)
    self._turn = np.zeros(n, int)
    self._done = np.zeros(n, bool)
    self._won = np.zeros(n, bool)
    return self._batch([self._render(s) for s in self._sessions], np.zeros(n),
                       [{"task_id": int(t), "split": split, "asin": goals[t]["asin"]}
                        for t in task_ids])

  def _act(self, s: _Session, action: str) -> tuple[bool, float, dict]:
    """Applies one action; returns (valid, reward, info)."""
    m = _ACTION.match(action)
    if m is None:
      return False, 0.0, {}
    kind, arg = m.group(1), m.group(2).strip().lower()
    if kind == "search":
      if s.page != "search" or not arg:
        return False, 0.0, {}
      s.keywords, s.results, s.page_no, s.page = arg, self.catalogue.search(arg), 1, "results"
      s.asin, s.options = None, {}
      return True, 0.0, {}
    if arg not in self._clickables(s):
      return False, 0.0, {}
    if arg == BACK:
      s.page, s.asin, s.options = "search", None, {}
    elif arg == NEXT:
      s.page_no += 1
    elif arg == PREV:
      if s.page == "results":
        s.page_no -= 1
      elif s.page == "item":
        s.page, s.asin, s.options = "results", None, {}
      else:
        s.page = "item"
    elif s.page == "results":
      s.asin, s.page, s.options = arg.upper(), "item", {}
    elif arg in SUB_PAGES:
      s.page = arg
    elif arg == BUY:
      product = self.catalogue.products[s.asin]
      reward, parts = webshop_reward(product, s.goal, self.catalogue.prices[s.asin], s.options)
      s.page = "done"
      return True, reward, {"purchased": s.asin, "options": dict(s.options), **parts}
    else:  # an option value
      for name, values in self.catalogue.products[s.asin]["options"].items():
        if arg in values:
          s.options[name] = arg
          break
    return True, 0.0, {}

  def step(self, actions: Sequence[str | None]) -> Batch:
    n = len(self._sessions)
    obs, rewards, infos = start_step(actions, n)
    for i, action in enumerate(actions):
      if self._done[i]:
        continue
      s = self._sessions[i]
      valid, reward, info = self._act(s, action or "")
      self._turn[i] += 1
      if s.page == "done":
        rewards[i] = reward
        self._won[i] = reward >= 1.0 - 1e-9
        self._done[i] = True
        obs[i] = SEP.join(["Thank you for shopping with us!", "Purchased", s.asin,
                           f"Reward: {reward:.2f}"])
        infos[i] = {"invalid": False, "reward": float(reward), **info}
        continue
      self._done[i] = self._turn[i] >= self.max_turns
      obs[i] = self._render(s)
      infos[i] = {"invalid": not valid}
    return self._batch(obs, rewards, infos)

  def close(self) -> None:
    self._sessions = []


_CATALOGUES: dict[str, Catalogue] = {}


def webshop_env(worker_index: int = 0, *, data_dir: str | None = None, max_turns: int = 15) -> WebShopEnv:
  """:class:`WebShopEnv` as an :class:`~atod_jax.envs.pool.EnvPool` factory; the
  catalogue is loaded once per process."""
  del worker_index
  key = webshop_data_dir(data_dir)
  if key not in _CATALOGUES:
    _CATALOGUES[key] = load_catalogue(key)
  return WebShopEnv(_CATALOGUES[key], max_turns=max_turns)
