"""Every environment the trainer knows, declared once.

An entry says how to build the environment (a :class:`~atod_jax.envs.base.DeviceEnv`
played on device, or a :class:`~atod_jax.envs.base.BatchedEnv` factory run in worker
processes), which pip extra it needs, and how the windowed agent prompts word its
role and its answer (:class:`AgentFormat`). Config validation, the worker pool, the
prompts and the rollouts all read this table: adding an environment is its module and
one entry here (and its extra in ``setup.cfg``).
"""
from __future__ import annotations

import dataclasses
import importlib

from atod_jax.envs.prompts import INSTRUCTIONS, SEARCH_INSTRUCTIONS, SYSTEM


@dataclasses.dataclass(frozen=True)
class AgentFormat:
  """How a windowed prompt introduces the agent and asks for its answer."""

  system: str  # the system prompt
  instructions: str  # the closing format instructions
  action_tag: str | None = "action"  # the tag around the command; None: the command
  # carries its own tags (Search-QA's <search> / <answer>)


@dataclasses.dataclass(frozen=True)
class EnvEntry:
  """One environment kind.

  ``device``: ``"module:function"`` taking the ``env`` config section and returning a
  :class:`~atod_jax.envs.base.DeviceEnv` (an environment written in JAX); ``factory``:
  ``"module:function"`` building a :class:`~atod_jax.envs.base.BatchedEnv` in a pool
  worker from ``max_turns`` and ``env.options``. Exactly one of the two is set.
  ``requires``: a module that imports only with ``extra`` installed. ``check``:
  ``"module:function"`` run on the ``env`` config section at start-up (raising
  ``ValueError`` for a bad one, e.g. training tasks that are also evaluation tasks).
  """

  agent: AgentFormat
  device: str | None = None
  factory: str | None = None
  extra: str | None = None
  requires: str | None = None
  check: str | None = None

  def __post_init__(self):
    if (self.device is None) == (self.factory is None):
      raise ValueError("an environment is either a device env or a factory, not both")


def _action(system: str) -> AgentFormat:
  return AgentFormat(system, INSTRUCTIONS, "action")


ENVS: dict[str, EnvEntry] = {
    "household": EnvEntry(_action(SYSTEM), device="atod_jax.envs.household:device_env"),
    # the same tasks as text through the pool: any model with its own tokenizer, no data
    "household_text": EnvEntry(_action(SYSTEM),
                               factory="atod_jax.envs.household_text:household_text_env"),
    "alfworld": EnvEntry(
        _action("You are an expert agent operating in the ALFRED embodied household "
                "environment. You act by issuing one text command per turn."),
        factory="atod_jax.envs.textgames:alfworld_env", extra="alfworld", requires="alfworld"),
    "webshop": EnvEntry(
        _action("You are an expert agent shopping on a web store: you search, open "
                "products, choose their options and buy. You act by issuing one command "
                "per turn, search[query] or click[element]."),
        factory="atod_jax.envs.webshop:webshop_env", extra="webshop", requires="rapidfuzz"),
    "searchqa": EnvEntry(
        AgentFormat("You are an expert at answering questions with a search engine.",
                    SEARCH_INSTRUCTIONS, None),
        factory="atod_jax.envs.searchqa:searchqa_env", extra="search", requires="bm25s",
        check="atod_jax.envs.searchqa:check_disjoint"),
    "textworld": EnvEntry(
        _action("You are an expert player of text adventure games. You act by issuing "
                "one text command per turn."),
        factory="atod_jax.envs.textgames:textworld_env", extra="textworld",
        requires="textworld"),
    "scienceworld": EnvEntry(
        _action("You are an expert agent doing science experiments in a text simulation. "
                "You act by issuing one text command per turn."),
        factory="atod_jax.envs.scienceworld:scienceworld_env", extra="scienceworld",
        requires="scienceworld"),
}


def get(kind: str) -> EnvEntry:
  if kind not in ENVS:
    raise KeyError(f"unknown environment {kind!r}; known: {', '.join(ENVS)}")
  return ENVS[kind]


def resolve(target: str):
  """``"module:function"`` -> the function."""
  module, name = target.split(":")
  return getattr(importlib.import_module(module), name)


def missing_extra(kind: str) -> str | None:
  """The pip extra ``kind`` needs and lacks (None: ready)."""
  entry = get(kind)
  if entry.requires is None:
    return None
  try:
    importlib.import_module(entry.requires)
  except ImportError:
    return entry.extra
  return None
