"""Start-up validation of a trainer config and what the methods mean.

A config is a plain ``ml_collections.ConfigDict`` (see ``configs/quickstart.py`` for every
field). :func:`validate` checks it before anything is built and raises
:class:`ConfigError` with one line naming the field and what is allowed.
"""
from __future__ import annotations

import dataclasses
import os

import ml_collections

from atod_jax.envs.household import HouseholdParams
from atod_jax.models.config import ModelConfig
from atod_jax.objectives import ESTIMATORS, MODES, SHAPES, AGGREGATIONS
from atod_jax.objectives.schedules import annealing_schedules
from atod_jax.rollout.host import LAYOUTS

# method -> (kappa/rho schedule override, T-DUR mode override); None: take the config's
METHODS = ("atod", "opd", "grpo", "sft", "atod_fixed", "atod_uniform")
STUDENT_INITS = ("fresh", "sft", "hf", "checkpoint")
TEACHER_SOURCES = ("build", "hf", "checkpoint")
ENV_KINDS = ("household", "alfworld", "webshop", "searchqa", "textworld", "scienceworld")
TEXT_EXTRAS = {"alfworld": ("alfworld", "alfworld"), "webshop": ("rapidfuzz", "webshop"),
               "searchqa": ("bm25s", "search"), "textworld": ("textworld", "textworld"),
               "scienceworld": ("scienceworld", "scienceworld")}
PRESETS = ("easy", "medium", "hard")


class ConfigError(ValueError):
  """A bad config value; the message is one line naming the field."""


def _need(ok: bool, field: str, message: str):
  if not ok:
    raise ConfigError(f"config.{field}: {message}")


def _choice(config, field: str, allowed):
  value = config
  for part in field.split("."):
    value = value[part]
  _need(value in allowed, field, f"got {value!r}; allowed: {', '.join(map(str, allowed))}")


def _positive(config, field: str, *, zero_ok: bool = False):
  value = config
  for part in field.split("."):
    value = value[part]
  ok = isinstance(value, (int, float)) and (value >= 0 if zero_ok else value > 0)
  _need(ok, field, f"must be {'>= 0' if zero_ok else '> 0'}, got {value!r}")


def model_config(fields) -> ModelConfig:
  return ModelConfig(**dict(fields))


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises :class:`ConfigError` (one line) for the first bad field."""
  for section in ("env", "student", "teacher", "rollout", "objective", "optim", "train",
                  "eval", "mesh"):
    _need(section in config, section, "missing section")
  _choice(config, "method", METHODS)
  _choice(config, "env.kind", ENV_KINDS)
  household = config.env.kind == "household"
  if household:
    _choice(config, "env.preset", PRESETS)
  else:
    _validate_text_env(config)
  if config.env.get("layout", "context") == "context":  # windowed: observations sit in
    _positive(config, "env.obs_len")  # each turn's prompt
  _positive(config, "train.steps", zero_ok=True)
  for f in ("train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
            "rollout.tasks_per_step", "rollout.group_size", "optim.learning_rate",
            "optim.minibatches", "optim.epochs", "eval.episodes"):
    _positive(config, f)
  _positive(config, "rollout.temperature")
  _positive(config, "eval.temperature", zero_ok=True)
  _positive(config, "optim.max_grad_norm", zero_ok=True)
  _positive(config, "optim.weight_decay", zero_ok=True)
  _positive(config, "optim.warmup_steps", zero_ok=True)
  _choice(config, "objective.estimator", ESTIMATORS)
  _choice(config, "objective.tdur_mode", MODES)
  _choice(config, "objective.schedule", SHAPES)
  _choice(config, "objective.aggregation", AGGREGATIONS)
  _positive(config, "objective.anneal_steps", zero_ok=True)
  _positive(config, "objective.clip_eps")
  rows = config.rollout.tasks_per_step * config.rollout.group_size
  _need(rows % config.optim.minibatches == 0, "optim.minibatches",
        f"must divide the {rows} trajectories of a step (tasks_per_step x group_size)")
  if "microbatches" in config.optim:
    _positive(config, "optim.microbatches")
    size = rows // config.optim.minibatches
    _need(size % config.optim.microbatches == 0, "optim.microbatches",
          f"must divide the {size} trajectories of a mini-batch (gradient accumulation "
          f"slices), got {config.optim.microbatches}")
  if config.method in ("grpo", "atod", "atod_fixed", "atod_uniform"):
    _need(config.rollout.group_size >= 2, "rollout.group_size",
          f"must be >= 2 for method {config.method!r} (group advantages need a group), "
          f"got {config.rollout.group_size}")
  for f in ("teacher.build.expert_noise", "student.sft.expert_noise"):
    sec, sub, leaf = f.split(".")
    v = config[sec][sub][leaf]
    _need(0.0 <= v < 1.0, f, f"must be in [0, 1), got {v!r}")
  for f in ("grpo_steps", "grpo_learning_rate"):
    if f in config.teacher.build:
      _positive(config, f"teacher.build.{f}", zero_ok=True)
  _choice(config, "student.init", STUDENT_INITS)
  _choice(config, "teacher.source", TEACHER_SOURCES)
  for who, kind in (("student", config.student.init), ("teacher", config.teacher.source)):
    if kind in ("hf", "checkpoint"):
      path = config[who].path
      _need(bool(path) and os.path.isdir(os.path.expanduser(path)), f"{who}.path",
            f"{kind} directory {path!r} does not exist")
    if kind == "hf":  # the model fields given override the directory's config
      known = {f.name for f in dataclasses.fields(ModelConfig)}
      for field in config[who].model:
        _need(field in known, f"{who}.model.{field}",
              f"not a model field (allowed: {', '.join(sorted(known))})")
  for who, kind in (("student", config.student.init), ("teacher", config.teacher.source)):
    if kind in ("hf", "checkpoint"):
      continue  # the shape comes from the directory
    try:
      cfg = model_config(config[who].model)
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config.{who}.model: {e}") from None
    if household:
      _need(cfg.vocab_size >= 89, f"{who}.model.vocab_size",
            f"the household vocabulary has 89 words; got {cfg.vocab_size}")
    elif config.env.tokenizer == "build":
      _need(cfg.vocab_size >= config.env.vocab_size, f"{who}.model.vocab_size",
            f"must hold the env.vocab_size={config.env.vocab_size} tokens of the built "
            f"tokenizer; got {cfg.vocab_size}")
  if household:
    try:
      HouseholdParams.preset(config.env.preset)
    except ValueError as e:
      raise ConfigError(f"config.env.preset: {e}") from None
  _need(config.mesh.data == -1 or config.mesh.data > 0, "mesh.data", "must be -1 or > 0")


def _validate_text_env(config) -> None:
  e = config.env
  for f in ("max_turns", "prompt_len", "response_len", "workers", "eval_batch",
            "step_timeout"):
    _need(f in e, f"env.{f}", f"missing (needed for env.kind={e.kind!r})")
    _positive(config, f"env.{f}")
  _need(e.response_len >= 2, "env.response_len", f"must be >= 2 (a command and <eos>), "
        f"got {e.response_len}")
  for f in ("train_split", "eval_split", "tokenizer"):
    _need(isinstance(e.get(f), str) and e.get(f), f"env.{f}", "must be a non-empty string")
  if "layout" in e:
    _choice(config, "env.layout", LAYOUTS)
  if "history" in e:
    _positive(config, "env.history", zero_ok=True)
  _need("options" in e, "env.options", "missing (a dict of the environment's arguments)")
  if e.tokenizer == "build":
    _positive(config, "env.vocab_size")
    _positive(config, "env.tokenizer_episodes")
  elif e.tokenizer == "student":
    _need(config.student.init == "hf", "env.tokenizer",
          f"'student' takes the tokenizer of an HF student (student.init='hf'), but "
          f"student.init is {config.student.init!r}")
  else:
    path = os.path.expanduser(e.tokenizer)
    _need(os.path.isfile(os.path.join(path, "tokenizer.json")), "env.tokenizer",
          f"'build', 'student' or a directory with tokenizer.json; {e.tokenizer!r} has none")
  module, extra = TEXT_EXTRAS[e.kind]
  try:
    __import__(module)
  except ImportError:
    raise ConfigError(f"config.env.kind: {e.kind!r} needs the {extra!r} extra "
                      f"(pip install -e \".[{extra}]\")") from None


def schedules(config):
  """kappa(s), rho(s) and the T-DUR mode that ``config.method`` trains with."""
  o = config.objective
  method = config.method
  if method == "opd":
    return annealing_schedules(0, 1.0, 1.0, 0.0, 0.0, "constant"), o.tdur_mode
  if method == "grpo":
    return annealing_schedules(0, 0.0, 0.0, 1.0, 1.0, "constant"), o.tdur_mode
  if method == "atod_fixed":
    return annealing_schedules(0, 1.0, 1.0, 1.0, 1.0, "constant"), o.tdur_mode
  sched = annealing_schedules(o.anneal_steps, o.kappa_init, o.kappa_min, o.rho_init, o.rho_max,
                              o.schedule)
  return sched, ("uniform" if method == "atod_uniform" else o.tdur_mode)
