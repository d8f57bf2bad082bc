"""Start-up validation of a trainer config.

A config is a plain ``ml_collections.ConfigDict``; :mod:`atod_jax.train.defaults` builds
every field with its default and documents it, and ``configs/*.py`` change what they
need. :func:`validate` checks a config before anything is built and raises
:class:`ConfigError` with one line naming the field and what is allowed. The
``method`` and ``objective`` fields are checked by :mod:`atod_jax.train.methods`, what
an environment needs comes from :mod:`atod_jax.envs.registry`.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections

from atod_jax.envs import registry
from atod_jax.models.config import ModelConfig
from atod_jax.rollout.host import LAYOUTS
from atod_jax.train.checks import ConfigError, choice as _choice, get as _get, need as _need
from atod_jax.train.checks import number
from atod_jax.train.methods import validate_objective
from atod_jax.train.steps import OPTIMIZERS

MODEL_FILES = ("hf", "gguf", "checkpoint")  # what atod_jax.models.checkpoint.load reads
STUDENT_INITS = ("fresh", "sft") + MODEL_FILES
TEACHER_SOURCES = ("build",) + MODEL_FILES
TEACHER_STARTS = ("fresh",) + MODEL_FILES  # teacher.build.init


def _positive(config, field: str, *, zero_ok: bool = False):
  number(config, field, strict=not zero_ok)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises :class:`ConfigError` (one line) for the first bad field."""
  for section in ("env", "student", "teacher", "rollout", "objective", "optim", "train",
                  "eval", "mesh"):
    _need(section in config, section, "missing section")
  _choice(config, "env.kind", tuple(registry.ENVS))
  _validate_numbers(config)
  if "optimizer" in config.optim:
    _choice(config, "optim.optimizer", OPTIMIZERS)
  validate_objective(config)
  if registry.get(config.env.kind).device is not None:
    _validate_device_env(config)
  else:
    _validate_text_env(config)
  _validate_models(config)
  _validate_mesh(config)


def _validate_numbers(config) -> None:
  _positive(config, "train.steps", zero_ok=True)
  for f in ("train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
            "rollout.tasks_per_step", "rollout.group_size", "optim.learning_rate",
            "optim.minibatches", "optim.epochs", "eval.episodes", "rollout.temperature"):
    _positive(config, f)
  for f in ("eval.temperature", "optim.max_grad_norm", "optim.weight_decay",
            "optim.warmup_steps"):
    _positive(config, f, zero_ok=True)
  for f in ("select_split", "report_splits"):
    _need(f in config.eval, f"eval.{f}", "missing (see atod_jax/train/defaults.py)")
  _need(isinstance(config.eval.select_split, str), "eval.select_split",
        f"must be a split name or '' (none), got {config.eval.select_split!r}")
  splits = config.eval.report_splits
  _need(isinstance(splits, (tuple, list)) and all(isinstance(x, str) and x for x in splits),
        "eval.report_splits", f"must be a list of split names, got {splits!r}")
  _need(isinstance(config.eval.kl, bool), "eval.kl",
        f"must be True or False, got {config.eval.get('kl')!r}")
  _need(config.eval.select_split not in splits, "eval.select_split",
        f"{config.eval.select_split!r} is also a report split: choose on another")
  if "invalid_penalty" in config.env:
    _positive(config, "env.invalid_penalty", zero_ok=True)
  rows = config.rollout.tasks_per_step * config.rollout.group_size
  _need(rows % config.optim.minibatches == 0, "optim.minibatches",
        f"must divide the {rows} trajectories of a step (tasks_per_step x group_size)")
  if "microbatches" in config.optim:
    _positive(config, "optim.microbatches")
    size = rows // config.optim.minibatches
    _need(size % config.optim.microbatches == 0, "optim.microbatches",
          f"must divide the {size} trajectories of a mini-batch (gradient accumulation "
          f"slices), got {config.optim.microbatches}")


def _validate_device_env(config) -> None:
  _positive(config, "env.obs_len")
  try:
    registry.resolve(registry.get(config.env.kind).device)(config.env)
  except (ValueError, KeyError, AttributeError) as e:
    raise ConfigError(f"config.env: {e}".splitlines()[0]) from None


def _validate_models(config) -> None:
  _choice(config, "student.init", STUDENT_INITS)
  _choice(config, "teacher.source", TEACHER_SOURCES)
  if not isinstance(config.teacher.offload, bool):
    raise ConfigError(f"config.teacher.offload: must be True or False, got "
                      f"{config.teacher.offload!r}")
  if config.teacher.source == "build":
    _need("build" in config.teacher, "teacher.build", "missing (teacher.source='build')")
    for f in ("demo_episodes", "sft_steps", "batch_size", "learning_rate"):
      _positive(config, f"teacher.build.{f}")
    for f in ("grpo_steps", "grpo_learning_rate", "select_every", "select_episodes"):
      if f in config.teacher.build:
        _positive(config, f"teacher.build.{f}", zero_ok=True)
    _fraction(config, "teacher.build.expert_noise")
    if "init" in config.teacher.build:
      _choice(config, "teacher.build.init", TEACHER_STARTS)
  if config.student.init == "sft" or config.method == "sft":
    _need("sft" in config.student, "student.sft",
          f"missing (student.init={config.student.init!r}, method={config.method!r})")
    _fraction(config, "student.sft.expert_noise")
  teacher_kind, teacher_path = config.teacher.source, "teacher.path"
  if teacher_kind == "build" and config.teacher.build.init != "fresh":
    # built from a pretrained start: teacher.model overrides the start's config
    teacher_kind, teacher_path = config.teacher.build.init, "teacher.build.init_path"
  for who, kind, where in (("student", config.student.init, "student.path"),
                           ("teacher", teacher_kind, teacher_path)):
    path = _get(config, where) if kind in MODEL_FILES else ""
    if kind in ("hf", "checkpoint"):
      _need(bool(path) and os.path.isdir(os.path.expanduser(path)), where,
            f"{kind} directory {path!r} does not exist")
    if kind == "gguf":
      _need(bool(path) and os.path.isfile(os.path.expanduser(path)), where,
            f"GGUF file {path!r} does not exist")
    if kind in ("hf", "gguf"):  # the model fields given override the file's config
      known = {f.name for f in dataclasses.fields(ModelConfig)}
      for field in config[who].model:
        _need(field in known, f"{who}.model.{field}",
              f"not a model field (allowed: {', '.join(sorted(known))})")
      continue
    if kind == "checkpoint":
      continue  # the shape comes from the directory
    try:
      cfg = ModelConfig(**config[who].model)
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config.{who}.model: {e}") from None
    _validate_vocab(config, who, cfg)


def _validate_vocab(config, who: str, cfg: ModelConfig) -> None:
  entry = registry.get(config.env.kind)
  if entry.device is not None:
    words = registry.resolve(entry.device)(config.env).vocab_size
    _need(cfg.vocab_size >= words, f"{who}.model.vocab_size",
          f"the {config.env.kind} vocabulary has {words} words; got {cfg.vocab_size}")
  elif config.env.tokenizer == "build":
    _need(cfg.vocab_size >= config.env.vocab_size, f"{who}.model.vocab_size",
          f"must hold the env.vocab_size={config.env.vocab_size} tokens of the built "
          f"tokenizer; got {cfg.vocab_size}")


def _validate_mesh(config) -> None:
  m = config.mesh
  _need(m.data == -1 or (isinstance(m.data, int) and m.data > 0), "mesh.data",
        f"must be -1 (all devices left) or > 0, got {m.data!r}")
  _need(m.fsdp == -1 and m.data != -1 or isinstance(m.fsdp, int) and m.fsdp > 0, "mesh.fsdp",
        f"must be > 0, or -1 (all devices left) with data > 0, got {m.fsdp!r}")
  _positive(config, "mesh.tensor")
  n = jax.device_count()
  if m.fsdp == -1:
    _need(n % (m.data * m.tensor) == 0, "mesh",
          f"data x tensor = {m.data * m.tensor} must divide the {n} devices present")
    return
  model_axes = m.fsdp * m.tensor
  if m.data == -1:
    _need(n % model_axes == 0, "mesh",
          f"fsdp x tensor = {model_axes} must divide the {n} devices present")
  else:
    _need(m.data * model_axes == n, "mesh",
          f"data x fsdp x tensor = {m.data * model_axes} must equal the {n} devices present "
          f"({jax.default_backend()}); use data=-1 for all that are left")


def _fraction(config, field: str) -> None:
  v = _get(config, field)
  _need(isinstance(v, (int, float)) and 0.0 <= v < 1.0, field, f"must be in [0, 1), got {v!r}")


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
  if e.layout == "context":  # windowed: observations sit in each
    _positive(config, "env.obs_len")  # turn's prompt
  _need("options" in e, "env.options", "missing (a dict of the environment's arguments)")
  if e.tokenizer == "build":
    _positive(config, "env.vocab_size")
    _positive(config, "env.tokenizer_episodes")
  elif e.tokenizer == "student":
    _need(config.student.init in ("hf", "gguf"), "env.tokenizer",
          f"'student' takes the tokenizer of an HF or GGUF student (student.init='hf' or "
          f"'gguf'), but student.init is {config.student.init!r}")
  else:
    path = os.path.expanduser(e.tokenizer)
    _need(os.path.isfile(os.path.join(path, "tokenizer.json")), "env.tokenizer",
          f"'build', 'student' or a directory with tokenizer.json; {e.tokenizer!r} has none")
  extra = registry.missing_extra(e.kind)
  _need(extra is None, "env.kind", f"{e.kind!r} needs the {extra!r} extra "
        f"(pip install -e \".[{extra}]\")")
  check = registry.get(e.kind).check
  if check is not None:
    try:
      registry.resolve(check)(e)
    except (ValueError, FileNotFoundError) as err:
      raise ConfigError(f"config.env.options: {err}".splitlines()[0]) from None
