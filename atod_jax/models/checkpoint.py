"""Models as files: a fresh model, our own checkpoint format, and one loader for both
that and HF directories.

Our checkpoint is a directory with ``model_config.json`` (the :class:`ModelConfig` and
the parameter layout, :data:`PARAMS_LAYOUT`) and ``params/`` (an orbax checkpoint of the
NNX parameter state). HF directories (``config.json`` + safetensors) go through
:func:`atod_jax.models.hf.load_pretrained`, GGUF files through
:func:`atod_jax.models.gguf.load_gguf`. Every loader takes a ``mesh``: each device
then reads only its own slice of every parameter.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from atod_jax.models import hf
from atod_jax.models.config import ModelConfig
from atod_jax.models.decoder import PARAMS_LAYOUT, DecoderLM
from atod_jax.models.sharding import host_values, leaf_shardings, sync

SOURCES = ("hf", "checkpoint", "gguf")  # the kinds :func:`load` reads (gguf: a file)


def fresh(cfg: ModelConfig, key: jax.Array):
  """``(graphdef, params)`` of a randomly initialised model (parameters drawn from
  ``key``)."""
  return nnx.split(DecoderLM(cfg, nnx.Rngs(params=key)))


def abstract(cfg: ModelConfig):
  """``(graphdef, params)`` with ``jax.ShapeDtypeStruct`` leaves: the structure of a
  model without computing (or allocating) a single parameter."""
  return nnx.split(nnx.eval_shape(lambda: DecoderLM(cfg, nnx.Rngs(0))))


def save(path: str, params, cfg: ModelConfig, extra: dict | None = None):
  """Writes ``model_config.json`` (and ``info.json`` from ``extra``) and ``params/``;
  the structure is rebuilt from the config on load."""
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  sync(f"saving {path}")  # the gathers and orbax's barriers are collectives: arrive together
  if jax.process_count() > 1:  # orbax takes numpy values or global arrays, not a process's own
    params = host_values(params)
  with ocp.StandardCheckpointer() as ckpt:  # in a multi-process run, every process calls
    ckpt.save(os.path.join(path, "params"), params, force=True)
  if jax.process_index() == 0:
    with open(os.path.join(path, "model_config.json"), "w") as f:
      json.dump(dict(dataclasses.asdict(cfg), params_layout=PARAMS_LAYOUT), f, indent=1)
    if extra is not None:
      with open(os.path.join(path, "info.json"), "w") as f:
        json.dump(extra, f, indent=1)
  sync(f"saved {path}")  # the files are there for every process from here on


def saved_config(path: str) -> ModelConfig:
  """The :class:`ModelConfig` of our checkpoint; one-line errors for a directory that is
  not one, or one of an older parameter layout."""
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


def config_of(kind: str, path: str, overrides: dict | None = None) -> ModelConfig:
  """The :class:`ModelConfig` of an HF directory or a GGUF file (``overrides``: model fields that replace
  its ``config.json``'s, e.g. ``dtype``, ``remat``) or of our checkpoint, without
  reading a weight."""
  path = os.path.abspath(os.path.expanduser(path))
  if kind == "hf":
    return ModelConfig.from_pretrained(path, **{"dtype": "bfloat16", **(overrides or {})})
  if kind == "checkpoint":
    return saved_config(path)
  if kind == "gguf":
    from atod_jax.models.gguf import config_from_gguf
    return config_from_gguf(path, **{"dtype": "bfloat16", **(overrides or {})})
  raise ValueError(f"kind must be one of {SOURCES}, got {kind!r}")


def load(kind: str, path: str, overrides: dict | None = None, mesh=None):
  """``(graphdef, params, cfg)`` from an HF directory, a GGUF file or our checkpoint. With ``mesh``,
  every parameter is placed on its shards as it is read (no device holds a full copy of
  a sharded tensor)."""
  path = os.path.abspath(os.path.expanduser(path))
  if kind in ("hf", "gguf"):
    if kind == "hf":
      loader = hf.load_pretrained
    else:
      from atod_jax.models.gguf import load_gguf as loader
    model = loader(path, mesh=mesh, **{"dtype": "bfloat16", **(overrides or {})})
    graphdef, params = nnx.split(model)
    return graphdef, params, model.cfg
  cfg = config_of(kind, path)
  graphdef, shapes = abstract(cfg)
  if mesh is not None:
    shardings = leaf_shardings(shapes, mesh)
    shapes = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
  with ocp.StandardCheckpointer() as ckpt:
    params = ckpt.restore(os.path.join(path, "params"), shapes)
  return graphdef, params, cfg
