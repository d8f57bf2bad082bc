"""Hugging Face interop from local directories: safetensors in, safetensors out.

``load_pretrained(path)`` reads ``config.json`` and ``*.safetensors`` (a single file or
shards with ``model.safetensors.index.json``). Each parameter is built with
``jax.make_array_from_callback``: every device reads only its own slice of the tensor
from the file (safetensors slices are lazy), so no host ever holds a second full copy.
``save_pretrained(model, path)`` writes safetensors (sharded past ``max_shard_bytes``)
and a ``config.json`` that ``transformers`` loads, and copies tokenizer files.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.flax import save_file

from atod_jax.models.config import ModelConfig
from atod_jax.models.decoder import DecoderLM
from atod_jax.models.sharding import DEFAULT_RULES, state_shardings

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


@dataclasses.dataclass(frozen=True)
class _Spec:
  """How one of our arrays is made from HF tensors: ``hf.reshape(split).transpose(perm)``
  (then stacked on our axis ``stack`` when there are several ``names``: the experts of a
  MoE layer on axis 0, a dense MLP's gate and up projections on axis 1)."""

  names: tuple[str, ...]
  split: tuple[int, ...]
  perm: tuple[int, ...]
  stack: int = 0


def _layout(cfg: ModelConfig) -> dict[tuple[str, ...], _Spec]:
  h, n, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  out = {("embed",): _Spec(("model.embed_tokens.weight",), (cfg.vocab_size, h), (0, 1)),
         ("norm", "scale"): _Spec(("model.norm.weight",), (h,), (0,))}
  if not cfg.tie_word_embeddings:
    out[("lm_head",)] = _Spec(("lm_head.weight",), (cfg.vocab_size, h), (1, 0))
  for i in range(cfg.num_layers):
    pre, lp = f"model.layers.{i}.", ("layers", str(i))
    a = pre + "self_attn."

    def put(path, names, split, perm, stack=0):
      out[lp + path] = _Spec(tuple(names), split, perm, stack)

    put(("attn_norm", "scale"), [pre + "input_layernorm.weight"], (h,), (0,))
    put(("mlp_norm", "scale"), [pre + "post_attention_layernorm.weight"], (h,), (0,))
    put(("attn", "q"), [a + "q_proj.weight"], (n, d, h), (2, 0, 1))
    put(("attn", "k"), [a + "k_proj.weight"], (k, d, h), (2, 0, 1))
    put(("attn", "v"), [a + "v_proj.weight"], (k, d, h), (2, 0, 1))
    put(("attn", "o"), [a + "o_proj.weight"], (h, n, d), (1, 2, 0))
    if cfg.attention_bias:
      put(("attn", "q_bias"), [a + "q_proj.bias"], (n, d), (0, 1))
      put(("attn", "k_bias"), [a + "k_proj.bias"], (k, d), (0, 1))
      put(("attn", "v_bias"), [a + "v_proj.bias"], (k, d), (0, 1))
    if cfg.qk_norm:
      put(("attn", "q_norm", "scale"), [a + "q_norm.weight"], (d,), (0,))
      put(("attn", "k_norm", "scale"), [a + "k_norm.weight"], (d,), (0,))
    m = pre + "mlp."
    if cfg.is_moe_layer(i):
      e, im = cfg.num_experts, cfg.moe_intermediate_size
      put(("mlp", "router"), [m + "gate.weight"], (e, h), (1, 0))
      for ours, theirs, split in (("gate", "gate_proj", (im, h)), ("up", "up_proj", (im, h)),
                                  ("down", "down_proj", (h, im))):
        put(("mlp", ours), [f"{m}experts.{j}.{theirs}.weight" for j in range(e)], split, (1, 0))
    else:
      im = cfg.intermediate_size
      put(("mlp", "gate_up"), [m + "gate_proj.weight", m + "up_proj.weight"], (im, h), (1, 0),
          stack=1)
      put(("mlp", "down"), [m + "down_proj.weight"], (h, im), (1, 0))
  return out


def _groups(hf_shape: Sequence[int], split: Sequence[int]) -> list[list[int]]:
  """Which consecutive split axes merge into each HF axis."""
  groups, j = [], 0
  for size in hf_shape:
    group, prod = [], 1
    while j < len(split) and (prod < size or not group):
      prod *= split[j]
      group.append(j)
      j += 1
    if prod != size:
      raise ValueError
    groups.append(group)
  if j != len(split):
    raise ValueError
  return groups


def _read_block(sl, spec: _Spec, index: tuple[slice, ...]) -> np.ndarray:
  """Reads the part of one HF tensor that our array's ``index`` (without the expert
  axis) covers. Where a sliced axis leads its merged HF axis (heads in ``[N*D, H]``)
  only those rows are read; otherwise the whole HF axis is read and sliced after."""
  split_index = [slice(None)] * len(spec.split)
  for our_axis, split_axis in enumerate(spec.perm):
    split_index[split_axis] = index[our_axis]
  hf_index, shape, rest = [], [], []
  for group in _groups(_merged_shape(spec), spec.split):
    tail = [spec.split[j] for j in group[1:]]
    if all(split_index[j] == slice(None) for j in group[1:]):
      start, stop, _ = split_index[group[0]].indices(spec.split[group[0]])
      hf_index.append(slice(start * math.prod(tail), stop * math.prod(tail)))
      shape += [stop - start] + tail
      rest += [slice(None)] * len(group)
    else:
      hf_index.append(slice(None))
      shape += [spec.split[j] for j in group]
      rest += [split_index[j] for j in group]
  block = np.asarray(sl[tuple(hf_index)]).reshape(shape)[tuple(rest)]
  return block.transpose(spec.perm)


class _Checkpoint:
  """The safetensors files of a directory, opened lazily, tensor name -> file."""

  def __init__(self, path: str):
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      self.where = {name: os.path.join(path, file) for name, file in weight_map.items()}
    elif os.path.isfile(single):
      with safe_open(single, "flax") as f:
        self.where = {name: single for name in f.keys()}
    else:
      raise FileNotFoundError(
          f"no model.safetensors or model.safetensors.index.json in {path!r}")
    self._open = {}

  def slice(self, name: str):
    if name not in self.where:
      raise KeyError(f"tensor {name!r} is missing from the checkpoint")
    file = self.where[name]
    if file not in self._open:
      self._open[file] = safe_open(file, "flax")
    return self._open[file].get_slice(name)


def load_pretrained(
    path: str | os.PathLike,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules=DEFAULT_RULES,
    **config_overrides,
) -> DecoderLM:
  """Loads a local HF checkpoint directory into a :class:`DecoderLM`.

  Args:
    path: directory with ``config.json`` and safetensors weights.
    mesh: place each parameter on this mesh by the logical-axis ``rules`` (default: the
      first device).
    config_overrides: :class:`ModelConfig` fields to change, e.g. ``dtype="float32"``.

  Raises:
    FileNotFoundError: missing ``config.json`` or weights. ValueError: unsupported
    architecture, or a tensor whose shape does not match the config (named).
    KeyError: a tensor the config needs is missing (named).
  """
  path = os.fspath(path)
  cfg = ModelConfig.from_pretrained(path, **config_overrides)
  return load_from(cfg, _Checkpoint(path), mesh=mesh, rules=rules)


def load_from(cfg: ModelConfig, ckpt, *, mesh: jax.sharding.Mesh | None = None,
              rules=DEFAULT_RULES) -> DecoderLM:
  """Builds a :class:`DecoderLM` of ``cfg`` from ``ckpt``, anything whose
  ``slice(hf_name)`` gives an object with ``get_shape()`` and ``[index]`` over the HF
  tensor (a safetensors slice; :class:`atod_jax.models.gguf.GGUFCheckpoint`'s view).
  Every device reads only the part of each tensor its shard holds."""
  abstract = nnx.eval_shape(lambda: DecoderLM(cfg, nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  if mesh is None:
    dev = jax.devices()[0]
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(dev), state,
                             is_leaf=lambda x: isinstance(x, nnx.Variable))
  else:
    shardings = state_shardings(state, mesh, rules)
  layout = _layout(cfg)
  flat_state = dict(nnx.to_flat_state(state))
  flat_shard = dict(nnx.to_flat_state(shardings))
  cpu = jax.local_devices(backend="cpu")[0]
  for key, var in flat_state.items():
    key_s = tuple(str(k) for k in key)
    spec = layout[key_s]
    target = tuple(var.shape)
    for name in spec.names:
      found, expected = tuple(ckpt.slice(name).get_shape()), _merged_shape(spec)
      if found != expected:
        raise ValueError(f"tensor {name!r} has shape {found}, the config expects {expected}")
    dtype = var.dtype

    def read(index, spec=spec, dtype=dtype, target=target):
      with jax.default_device(cpu):
        if len(spec.names) == 1:
          block = _read_block(ckpt.slice(spec.names[0]), spec, index)
        else:  # stacked: our axis ``spec.stack`` runs over the files' tensors
          a = spec.stack
          rest = index[:a] + index[a + 1:]
          block = np.stack([_read_block(ckpt.slice(spec.names[e]), spec, rest)
                            for e in range(*index[a].indices(target[a]))], axis=a)
        return np.asarray(block).astype(dtype)

    value = jax.make_array_from_callback(target, flat_shard[key], read)
    var.set_value(value)
  return nnx.merge(graphdef, state)


def save_pretrained(
    model: DecoderLM,
    path: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
  """Writes ``model`` as an HF directory (safetensors + config.json) that
  ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

  Args:
    tokenizer_dir: copy tokenizer / generation files from here (e.g. the directory the
      model was loaded from).
    dtype: dtype of the written weights (default: the parameters' dtype).
    max_shard_bytes: split into ``model-0000i-of-0000n.safetensors`` past this size.
  """
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  cfg = model.cfg
  flat = {tuple(str(k) for k in key): var for key, var in nnx.to_flat_state(nnx.state(model))}
  tensors: dict[str, jax.Array] = {}
  for key, spec in _layout(cfg).items():
    ours = flat[key][...]
    inv = tuple(np.argsort(spec.perm))
    hf_shape = _merged_shape(spec)
    if dtype is not None:
      ours = ours.astype(dtype)
    ours = jax.device_get(ours)  # host copy, one parameter at a time
    if len(spec.names) == 1:
      tensors[spec.names[0]] = jnp.asarray(np.asarray(ours).transpose(inv).reshape(hf_shape))
    else:
      for e, name in enumerate(spec.names):
        part = np.take(np.asarray(ours), e, axis=spec.stack)
        tensors[name] = jnp.asarray(part.transpose(inv).reshape(hf_shape))
  _write_shards(tensors, path, max_shard_bytes)
  hf_cfg = cfg.to_hf()
  if dtype is not None:
    hf_cfg["torch_dtype"] = str(jnp.dtype(dtype))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=2)
  if tokenizer_dir is not None:
    for name in TOKENIZER_FILES:
      src = os.path.join(tokenizer_dir, name)
      if os.path.isfile(src):
        shutil.copy(src, os.path.join(path, name))


def _merged_shape(spec: _Spec) -> tuple[int, ...]:
  """The HF tensor shape: the split shape with head axes merged back (known layouts)."""
  s = spec.split
  if len(s) == 3 and spec.perm == (2, 0, 1):  # q/k/v: [N*D, H]
    return (s[0] * s[1], s[2])
  if len(s) == 3 and spec.perm == (1, 2, 0):  # o: [H, N*D]
    return (s[0], s[1] * s[2])
  if len(s) == 2 and spec.perm == (0, 1) and spec.names[0].endswith(".bias"):
    return (s[0] * s[1],)
  return tuple(s)


def _write_shards(tensors: dict[str, jax.Array], path: str, max_bytes: int) -> None:
  shards: list[dict[str, jax.Array]] = [{}]
  size = 0
  for name, t in tensors.items():
    nbytes = t.size * t.dtype.itemsize
    if shards[-1] and size + nbytes > max_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = t
    size += nbytes
  meta = {"format": "pt"}
  if len(shards) == 1:
    save_file(shards[0], os.path.join(path, "model.safetensors"), metadata=meta)
    return
  weight_map, total = {}, 0
  for i, shard in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(path, file), metadata=meta)
    for name, t in shard.items():
      weight_map[name] = file
      total += t.size * t.dtype.itemsize
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
