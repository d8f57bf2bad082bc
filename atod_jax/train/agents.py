"""Building, saving and loading the student and teacher, and running them in the env.

Our own model checkpoint is a directory with ``model_config.json`` and ``params/`` (an
orbax checkpoint of the NNX parameter state). HF directories load through
:func:`atod_jax.models.load_pretrained`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from atod_jax.models import PARAMS_LAYOUT, DecoderLM, ModelConfig, load_pretrained
from atod_jax.rollout.device import HouseholdRollout, rollout
from atod_jax.rollout.trajectory import Trajectory, summarize
from atod_jax.sampling.generate import SamplingParams

# Purposes of random draws: every key is fold_in(fold_in(key(seed), purpose), step).
TASKS, POLICY, SHUFFLE, INIT, DEMOS, EVAL_TASKS, EVAL_POLICY = range(7)


def draw(seed: int, purpose: int, step: int = 0) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), purpose), step)


def fresh_model(cfg: ModelConfig, seed: int, purpose_step: int = 0):
  """``(graphdef, params)`` of a randomly initialised model."""
  key = draw(seed, INIT, purpose_step)
  model = DecoderLM(cfg, nnx.Rngs(params=key))
  return nnx.split(model)


def save_model(path: str, graphdef, params, cfg: ModelConfig, extra: dict | None = None):
  """Writes ``model_config.json`` (and ``info.json``) and ``params/`` to ``path``."""
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(path, "params"), params, force=True)
  with open(os.path.join(path, "model_config.json"), "w") as f:
    json.dump(dict(dataclasses.asdict(cfg), params_layout=PARAMS_LAYOUT), f, indent=1)
  if extra is not None:
    with open(os.path.join(path, "info.json"), "w") as f:
      json.dump(extra, f, indent=1)


def _saved_config(path: str) -> ModelConfig:
  cfg_file = os.path.join(path, "model_config.json")
  if not os.path.exists(cfg_file):
    raise FileNotFoundError(f"{cfg_file} not found: not an atod_jax model checkpoint")
  with open(cfg_file) as f:
    fields = json.load(f)
  layout = fields.pop("params_layout", 1)
  if layout != PARAMS_LAYOUT:
    raise ValueError(
        f"{path} holds parameters in layout {layout}; this atod_jax reads layout "
        f"{PARAMS_LAYOUT}. Export it to an HF directory with the atod_jax that wrote it "
        "(save_pretrained) and load that, or retrain")
  return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def config_of(kind: str, path: str, model_fields: dict) -> ModelConfig:
  """The :class:`ModelConfig` of an HF directory or our checkpoint, without its weights."""
  path = os.path.abspath(os.path.expanduser(path))
  if kind == "hf":
    return ModelConfig.from_pretrained(path, dtype=model_fields.get("dtype", "bfloat16"))
  return _saved_config(path)


def load_model(path: str):
  """``(graphdef, params, cfg)`` from a directory written by :func:`save_model`."""
  path = os.path.abspath(os.path.expanduser(path))
  cfg = _saved_config(path)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: DecoderLM(cfg, nnx.Rngs(0))))
  with ocp.StandardCheckpointer() as ckpt:
    params = ckpt.restore(os.path.join(path, "params"), abstract)
  return graphdef, params, cfg


def load_any(kind: str, path: str, model_fields: dict):
  """A model from an HF directory or our checkpoint; checks it matches ``model_fields``
  where the config names the architecture."""
  if kind == "hf":  # the fields given (dtype, remat, ...) override the directory's config
    model = load_pretrained(path, **{"dtype": "bfloat16", **model_fields})
    graphdef, params = nnx.split(model)
    return graphdef, params, model.cfg
  return load_model(path)


@functools.lru_cache(maxsize=None)
def rollout_fn(graphdef, spec: HouseholdRollout, split: str, sampling: SamplingParams | None,
               expert_noise: float = 0.0):
  """A jitted ``(params, task_keys, key, group_ids) -> Trajectory``."""
  def run(params, task_keys, key, group_ids):
    model = None if sampling is None else nnx.merge(graphdef, params)
    return rollout(model, spec, task_keys, key, split=split, sampling=sampling,
                   group_ids=group_ids, expert_noise=expert_noise)
  return jax.jit(run)


def task_keys(seed: int, purpose: int, step: int, tasks: int, group: int):
  """``tasks`` task keys each repeated ``group`` times, and the group ids."""
  keys = jax.random.split(draw(seed, purpose, step), tasks)
  return jnp.repeat(keys, group, axis=0), jnp.repeat(jnp.arange(tasks, dtype=jnp.int32), group)


def expert_demos(spec: HouseholdRollout, seed: int, episodes: int,
                 noise: float = 0.0) -> Trajectory:
  """``episodes`` expert episodes on training tasks, in the rollout layout (with
  ``noise``, a share of random commands that are not imitated: see ``rollout``)."""
  keys, groups = task_keys(seed, DEMOS, 0, episodes, 1)
  return rollout_fn(None, spec, "train", None, float(noise))(
      None, keys, draw(seed, DEMOS, 1), groups)


def evaluate(graphdef, params, spec: HouseholdRollout, *, episodes: int, temperature: float,
             seed: int, batch: int = 256) -> dict[str, float]:
  """Held-out success, reward, turns and invalid-action rate (``temperature = 0``: greedy).
  The tasks and draws depend only on ``seed``, so every model and method is evaluated
  on the same episodes."""
  sampling = SamplingParams(temperature=temperature)
  fn = rollout_fn(graphdef, spec, "heldout", sampling)
  keys, groups = task_keys(seed, EVAL_TASKS, 0, episodes, 1)
  parts = []
  for start in range(0, episodes, batch):
    sl = slice(start, start + batch)
    traj = fn(params, keys[sl], draw(seed, EVAL_POLICY, start), groups[sl])
    parts.append({k: float(v) * len(keys[sl]) for k, v in summarize(traj).items()})
  return {k: sum(p[k] for p in parts) / episodes for k in parts[0]}


def evaluate_protocol(eval_config, graphdef, params, tasks) -> dict:
  """The run's evaluation on ``tasks`` (see ``atod_jax.train.tasks``): ``eval/*`` at the
  validation temperature and, when ``eval_config.greedy``, ``greedy/*``; the same for
  student and teacher."""
  e = eval_config
  out = {f"eval/{k}": v for k, v in tasks.evaluate(
      graphdef, params, episodes=e.episodes, temperature=e.temperature, seed=e.seed).items()}
  if e.greedy:
    out.update({f"greedy/{k}": v for k, v in tasks.evaluate(
        graphdef, params, episodes=e.episodes, temperature=0.0, seed=e.seed).items()})
  return out
