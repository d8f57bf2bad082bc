"""ALFWorld and TextWorld: TextWorld-engine games behind the batched text protocol.

Both hold one TextWorld environment per episode slot of the batch and load a game into
it at ``reset``; commands are plain text, the admissible commands come with every
observation, the reward is 1.0 on the step that wins (ALFWorld's and the paper's sparse
reward) and an episode ends when it is won, lost or out of turns. An action that is not
among the admissible commands still costs its turn (the game answers "Nothing
happens." or its parser's complaint) and is flagged ``info["invalid"]``.

* :class:`AlfWorldEnv` plays the real ALFWorld games (``game.tw-pddl``) with the
  ``alfworld`` package's demangler (install the ``alfworld`` extra). Splits are the
  folders of ``json_2.1.1``: ``valid_train`` (200 games here, for training),
  ``valid_seen`` (140), ``valid_unseen`` (134). The expert is the PDDL planner: its plan
  is taken once at reset (re-planning costs ~0.5 s a step, minutes in some states);
  with ``replan=True`` it is re-planned when the agent leaves it, else there is no
  expert command from then on. The PDDL-to-SAS translation TextWorld runs four times
  per load and reset is computed once per game and process (:func:`_translate_once`),
  and a slot that holds the game already is only reset: measured beside a training
  job, 0.65 s for a game the process has not played (1.15 s before), 0.09 s for one
  its slot holds. ``info["task_type"]`` names the task family (pick, look, clean, heat,
  cool, pick2) for per-type results (:func:`success_by_type`).
* :class:`TextWorldEnv` plays games generated offline with ``tw-make`` (the ``textworld``
  extra), cached on disk by (kind, options, seed) so a seed is generated once. The
  expert follows the game's walkthrough (it reads the cookbook, so what the recipe needs
  is in the context for a clone to learn from) and, after the agent leaves it,
  TextWorld's ``policy_commands``. The ASCII banner and the status line are stripped
  from observations.
"""
from __future__ import annotations

import collections
import collections.abc
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import warnings
from typing import Sequence

import numpy as np

from atod_jax.envs.base import Batch, start_step
from atod_jax.envs.searchqa import default_data_dir

ALFWORLD_TASK_TYPES = {  # folder prefix -> the short name papers report
    "pick_and_place_simple": "pick",
    "look_at_obj_in_light": "look",
    "pick_clean_then_place_in_recep": "clean",
    "pick_heat_then_place_in_recep": "heat",
    "pick_cool_then_place_in_recep": "cool",
    "pick_two_obj_and_place": "pick2",
}
_TASK = re.compile(r"Your task is to:\s*(.*?)\s*$", re.DOTALL)


def success_by_type(task_types: Sequence[str], wons: Sequence[bool]) -> dict[str, tuple[float, int]]:
  """``{task type: (success rate, episodes)}`` plus ``"all"``, in ALFWorld's order."""
  groups: dict[str, list[bool]] = collections.defaultdict(list)
  for t, w in zip(task_types, wons):
    groups[t].append(bool(w))
  order = [t for t in ALFWORLD_TASK_TYPES.values() if t in groups] + sorted(
      t for t in groups if t not in ALFWORLD_TASK_TYPES.values())
  out = {t: (float(np.mean(groups[t])), len(groups[t])) for t in order}
  out["all"] = (float(np.mean(wons)) if len(wons) else 0.0, len(wons))
  return out


def _clean_command(action: str | None) -> str:
  """Printable ASCII, single spaces, at most 200 characters: the Z-machine interpreter
  (jericho's Frotz) can hang on control characters, which a learning policy emits."""
  text = "".join(ch for ch in (action or "") if 32 <= ord(ch) < 127)
  return " ".join(text.split())[:200]


class _TextGameEnv:
  """The slot machinery shared by ALFWorld and TextWorld (see the module doc)."""

  max_turns: int

  def __init__(self, max_turns: int):
    if max_turns < 1:
      raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    import textworld  # the `alfworld` / `textworld` extra
    self._tw = textworld
    self.max_turns = max_turns
    self._slots: list = []
    self._loaded: list[str | None] = []  # the game file each slot holds
    self._states: list = []
    self._tasks: list[str] = []
    self._infos: list[dict] = []

  # ---- hooks
  def game_files(self, split: str) -> list[str]:
    raise NotImplementedError

  def num_tasks(self, split: str) -> int:
    return len(self.game_files(split))

  def _request_infos(self):
    raise NotImplementedError

  def _wrappers(self) -> list:
    return []

  def _clean(self, text: str) -> str:
    return text.strip()

  def _task_of(self, intro: str, state) -> str:
    raise NotImplementedError

  def _admissible(self, state) -> list[str]:
    return list(state["admissible_commands"] or [])

  def _expert(self, i: int) -> str | None:
    raise NotImplementedError

  def _on_reset(self, i: int, state) -> None:
    pass

  def _on_step(self, i: int, action: str, state) -> None:
    pass

  # ---- protocol
  def _slot(self, i: int, path: str):
    while len(self._slots) <= i:
      self._slots.append(None)
      self._loaded.append(None)
    if self._slots[i] is None:
      self._slots[i] = self._tw.start(path, request_infos=self._request_infos(),
                                      wrappers=self._wrappers())
    elif self._loaded[i] != path:  # a slot that holds the game already is only reset
      self._slots[i].load(path)
    self._loaded[i] = path
    return self._slots[i]

  def _batch(self, observations, rewards, infos) -> Batch:
    live = ~self._done
    return Batch(
        observations=observations, tasks=list(self._tasks),
        rewards=np.asarray(rewards, np.float32), dones=self._done.copy(),
        wons=self._won.copy(),
        admissible=[self._admissible(s) if d else [] for s, d in zip(self._states, live)],
        expert=[self._expert(i) if d else None for i, d in enumerate(live)],
        aborted=np.zeros(len(self._done), bool), infos=infos)

  def reset(self, split: str, task_ids: Sequence[int]) -> Batch:
    files = self.game_files(split)
    bad = [t for t in task_ids if not 0 <= t < len(files)]
    if bad:
      raise ValueError(f"task ids {bad[:5]} out of range for split {split!r} "
                       f"({len(files)} games)")
    n = len(task_ids)
    self._states, self._tasks, self._infos, obs = [], [], [], []
    self._turn = np.zeros(n, int)
    self._done = np.zeros(n, bool)
    self._won = np.zeros(n, bool)
    for i, t in enumerate(task_ids):
      env = self._slot(i, files[t])
      state = env.reset()
      self._states.append(state)
      intro = self._clean(state.feedback)
      self._tasks.append(self._task_of(intro, state))
      self._infos.append({"task_id": int(t), "split": split, "game": files[t]})
      self._on_reset(i, state)
      obs.append(intro)
    return self._batch(obs, np.zeros(n), [dict(x) for x in self._infos])

  def step(self, actions: Sequence[str | None]) -> Batch:
    n = len(self._states)
    obs, rewards, infos = start_step(actions, n)
    for i, action in enumerate(actions):
      if self._done[i]:
        continue
      action = _clean_command(action)
      invalid = action not in self._admissible(self._states[i])
      state, _, done = self._slots[i].step(action)
      self._states[i] = state
      self._on_step(i, action, state)
      self._turn[i] += 1
      won = bool(state["won"])
      if won:
        rewards[i], self._won[i] = 1.0, True
      self._done[i] = won or bool(done) or bool(state.get("lost")) or \
          self._turn[i] >= self.max_turns
      obs[i] = self._clean(state.feedback)
      infos[i] = {"invalid": invalid, **self._extra_info(i, state)}
    return self._batch(obs, rewards, infos)

  def _extra_info(self, i: int, state) -> dict:
    return {}

  def close(self) -> None:
    for env in self._slots:
      if env is not None:
        env.close()
    self._slots, self._loaded = [], []


# ------------------------------------------------------------------------ ALFWorld
_TRANSLATIONS: collections.OrderedDict = collections.OrderedDict()
_TRANSLATIONS_KEPT = 512  # games; one is ~0.2 MB


def _translate_once() -> None:
  """Makes ``fast_downward.pddl2sas`` remember its results in this process.

  TextWorld's PDDL games translate the domain and problem to SAS twice when a game is
  loaded and twice again at every reset (``PddlState.__init__``: once plain, once
  optimised): ~0.75 s of a ~1.1 s ALFWorld reset. The result depends only on the two
  texts and the flag, and TextWorld only reads it (the task's objects, initial facts
  and actions, the SAS text handed to the planner), so the same game is translated once
  per process. The installed package is not changed; the wrapper is set on its module
  at run time, in the worker processes that play ALFWorld."""
  import fast_downward
  if getattr(fast_downward.pddl2sas, "_atod_jax_memo", False):
    return
  translate = fast_downward.pddl2sas

  def pddl2sas(domain: str, problem: str, verbose: bool = False, optimize=False):
    key = hashlib.sha1(f"{optimize}\0{domain}\0{problem}".encode()).hexdigest()
    if key in _TRANSLATIONS:
      _TRANSLATIONS.move_to_end(key)
      return _TRANSLATIONS[key]
    out = _TRANSLATIONS[key] = translate(domain, problem, verbose=verbose, optimize=optimize)
    if len(_TRANSLATIONS) > _TRANSLATIONS_KEPT:
      _TRANSLATIONS.popitem(last=False)
    return out

  pddl2sas._atod_jax_memo = True
  fast_downward.pddl2sas = pddl2sas


def alfworld_data_dir(path: str | None = None) -> str:
  """The ``json_2.1.1`` folder: ``path``, else ``$ALFWORLD_DATA/json_2.1.1`` (the
  upstream convention) where it exists, else ``alfworld/json_2.1.1`` in the shared data
  folder. (Importing ``alfworld`` sets ``$ALFWORLD_DATA`` to ``~/.cache/alfworld`` when it
  is unset, hence the existence check.)"""
  if path:
    return os.path.abspath(os.path.expanduser(path))
  env = os.environ.get("ALFWORLD_DATA")
  if env and os.path.isdir(os.path.join(os.path.expanduser(env), "json_2.1.1")):
    return os.path.abspath(os.path.join(os.path.expanduser(env), "json_2.1.1"))
  return os.path.join(default_data_dir(), "alfworld", "json_2.1.1")


def alfworld_task_type(game_file: str) -> str:
  folder = os.path.basename(os.path.dirname(os.path.dirname(game_file)))
  return ALFWORLD_TASK_TYPES.get(folder.split("-")[0], "other")


class AlfWorldEnv(_TextGameEnv):
  """The real ALFWorld text games (see the module doc).

  Args:
    data_dir: the ``json_2.1.1`` folder (default: :func:`alfworld_data_dir`).
    max_turns: 50, the paper's limit.
    replan: re-plan the expert after the agent leaves its plan (else no expert command
      from then on). Off by default: a re-plan runs the PDDL planner, ~0.5 s usually but
      minutes in some states, on every step a policy is off the plan.
  """

  def __init__(self, data_dir: str | None = None, max_turns: int = 50, replan: bool = False):
    super().__init__(max_turns)
    self.data_dir = alfworld_data_dir(data_dir)
    if not os.path.isdir(self.data_dir):
      raise FileNotFoundError(
          f"ALFWorld games not found at {self.data_dir} (pass data_dir or set $ALFWORLD_DATA "
          "to the folder holding json_2.1.1)")
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler  # `alfworld` extra
    self._demangler = AlfredDemangler
    _translate_once()
    self.replan = replan
    self._files: dict[str, list[str]] = {}
    self._plans: list[list[str]] = []

  @property
  def splits(self) -> list[str]:
    return sorted(d for d in os.listdir(self.data_dir)
                  if os.path.isdir(os.path.join(self.data_dir, d)))

  def game_files(self, split: str) -> list[str]:
    if split not in self._files:
      if split not in self.splits:
        raise ValueError(f"split must be one of {self.splits} (folders of {self.data_dir}), "
                         f"got {split!r}")
      # upstream skips the "movable" and "Sliced" trials and games marked unsolvable
      files = sorted(f for f in glob.glob(os.path.join(self.data_dir, split, "*", "*",
                                                       "game.tw-pddl"))
                     if "movable" not in f and "Sliced" not in f)
      self._files[split] = files
    return self._files[split]

  def task_types(self, split: str) -> list[str]:
    return [alfworld_task_type(f) for f in self.game_files(split)]

  def _request_infos(self):
    return self._tw.EnvInfos(won=True, admissible_commands=True, extras=["walkthrough"])

  def _wrappers(self):
    return [self._demangler(shuffle=False)]

  def _task_of(self, intro, state):
    m = _TASK.search(intro)
    return m.group(1).rstrip(".") if m else ""

  def _clean(self, text):
    text = text.replace("-= Welcome to TextWorld, ALFRED! =-", "")
    return text.strip()

  def _admissible(self, state):
    return [a for a in state["admissible_commands"] or [] if a != "help"]

  def _on_reset(self, i, state):
    self._infos[i]["task_type"] = alfworld_task_type(self._infos[i]["game"])
    plan = list(state["extra.walkthrough"] or [])
    if i < len(self._plans):
      self._plans[i] = plan
    else:
      self._plans.append(plan)

  def _on_step(self, i, action, state):
    plan = self._plans[i]
    if plan and plan[0] == action:
      plan.pop(0)
    elif self.replan and not state["won"]:
      pddl = self._slots[i].unwrapped
      self._plans[i] = list(pddl._pddl_state.replan(pddl._entity_infos))
    else:
      self._plans[i] = []

  def _expert(self, i):
    return self._plans[i][0] if self._plans[i] else None

  def _extra_info(self, i, state):
    return {"task_type": self._infos[i]["task_type"]}


def alfworld_env(worker_index: int = 0, **kwargs) -> AlfWorldEnv:
  """:class:`AlfWorldEnv` as an :class:`~atod_jax.envs.pool.EnvPool` factory (the worker
  index first; set the rest with ``functools.partial``)."""
  del worker_index
  return AlfWorldEnv(**kwargs)


# ------------------------------------------------------------------------ TextWorld
_BANNER_LINE = re.compile(r"^[\s_|\\/$<>]*$")
_STATUS = re.compile(r"\n>\s*(?:-= .* =-)?[\d/]*\s*$")


def strip_textworld(text: str) -> str:
  """A TextWorld observation without its ASCII-art banner (the lines of only ``_ | \\ /
  $`` before the first words), the prompt / status line at the end and the
  "Would you like to RESTART" question after the game ends."""
  lines = text.split("\n")
  start = 0
  if any("$$" in line for line in lines[:30]):
    for j, line in enumerate(lines):
      if line.strip() and not _BANNER_LINE.match(line):
        start = j
        break
  text = "\n".join(lines[start:])
  text = text.split("Would you like to RESTART")[0]
  text = _STATUS.sub("", text)
  text = text.replace("\n>", "\n")
  return re.sub(r"\n{3,}", "\n\n", text).strip()


def textworld_cache_dir() -> str:
  return os.path.abspath(os.path.expanduser(os.environ.get(
      "ATOD_JAX_TEXTWORLD_CACHE", os.path.join("~", ".cache", "atod_jax", "textworld"))))


def make_textworld_game(kind: str, options: Sequence[str], seed: int, cache_dir: str) -> str:
  """The path of game ``seed`` made by ``tw-make {kind} {options} --seed {seed}``,
  generating it only when the cache does not hold it yet."""
  key = hashlib.sha1(json.dumps([kind, list(options)]).encode()).hexdigest()[:10]
  folder = os.path.join(cache_dir, f"{kind}-{key}")
  path = os.path.join(folder, f"seed{seed}.z8")
  if os.path.exists(path) and os.path.exists(path[:-3] + ".json"):
    return path
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f".tmp{os.getpid()}-seed{seed}.z8")
  tw_make = os.path.join(os.path.dirname(sys.executable), "tw-make")
  cmd = [tw_make if os.path.exists(tw_make) else "tw-make", kind, *options,
         "--seed", str(seed), "--output", tmp, "-f", "--silent"]
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode != 0 or not os.path.exists(tmp):
    raise RuntimeError(f"tw-make failed for seed {seed}: {' '.join(cmd)}\n{done.stderr[-2000:]}")
  for ext in (".json", ".ni", ".z8"):  # the .z8 last: its presence means complete
    if os.path.exists(tmp[:-3] + ext):
      os.replace(tmp[:-3] + ext, path[:-3] + ext)
  return path


COOKING = ("tw-cooking", ("--recipe", "1", "--take", "1", "--go", "1"))


class TextWorldEnv(_TextGameEnv):
  """Games made with ``tw-make`` (see the module doc).

  Args:
    kind, options: the ``tw-make`` sub-command and its options; the default is a one-room,
      one-ingredient cooking game (``tw-cooking --recipe 1 --take 1 --go 1``); e.g.
      ``("custom", ("--world-size", "3", "--nb-objects", "5", "--quest-length", "3"))``.
    splits: split name -> game seeds (task id i plays seed ``splits[split][i]``); by
      default "train" = seeds 0..999 and "heldout" = seeds 100000..100099.
    cache_dir: where generated games are kept (default ``$ATOD_JAX_TEXTWORLD_CACHE`` or
      ``~/.cache/atod_jax/textworld``).
    max_turns: 50.
  """

  def __init__(self, kind: str = COOKING[0], options: Sequence[str] = COOKING[1], *,
               splits: dict[str, Sequence[int]] | None = None, cache_dir: str | None = None,
               max_turns: int = 50):
    super().__init__(max_turns)
    self.kind, self.options = kind, tuple(options)
    self.splits = {k: list(v) for k, v in (splits or {
        "train": range(1000), "heldout": range(100000, 100100)}).items()}
    self.cache_dir = cache_dir or textworld_cache_dir()

  def game_files(self, split: str) -> list[str]:
    if split not in self.splits:
      raise ValueError(f"split must be one of {tuple(self.splits)}, got {split!r}")
    return _LazyGames(self, self.splits[split])

  def _slot(self, i, path):
    with warnings.catch_warnings():  # jericho: "not fully supported" (TextWorld games are)
      warnings.filterwarnings("ignore", message=".*is not fully supported")
      return super()._slot(i, path)

  def _request_infos(self):
    return self._tw.EnvInfos(won=True, lost=True, admissible_commands=True,
                             policy_commands=True, objective=True, score=True,
                             max_score=True, extras=["walkthrough"])

  def _clean(self, text):
    return strip_textworld(text)

  def _task_of(self, intro, state):
    return state["objective"] or ""

  def _on_reset(self, i, state):
    self._last = getattr(self, "_last", [])
    self._plans = getattr(self, "_plans", [])
    while len(self._last) <= i:
      self._last.append(None)
      self._plans.append([])
    self._last[i] = state
    self._plans[i] = list(state["extra.walkthrough"] or [])

  def _on_step(self, i, action, state):
    self._last[i] = state
    plan = self._plans[i]
    self._plans[i] = plan[1:] if plan and plan[0] == action else []

  def _expert(self, i):
    # the walkthrough while the agent follows it (it reads the cookbook, so what the
    # recipe needs is in the context); after a detour, the game's policy_commands
    if self._plans[i]:
      return self._plans[i][0]
    plan = self._last[i]["policy_commands"]
    return plan[0] if plan else None

  def _extra_info(self, i, state):
    return {"score": int(state["score"] or 0), "max_score": int(state["max_score"] or 0)}


class _LazyGames(collections.abc.Sequence):
  """Game paths of a seed list, generated on first access."""

  def __init__(self, env: TextWorldEnv, seeds: list[int]):
    self._env, self._seeds = env, seeds

  def __len__(self):
    return len(self._seeds)

  def __getitem__(self, i):
    return make_textworld_game(self._env.kind, self._env.options, self._seeds[i],
                               self._env.cache_dir)


def textworld_env(worker_index: int = 0, **kwargs) -> TextWorldEnv:
  """:class:`TextWorldEnv` as an :class:`~atod_jax.envs.pool.EnvPool` factory."""
  del worker_index
  return TextWorldEnv(**kwargs)
