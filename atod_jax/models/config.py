"""Model configuration: one dataclass for Qwen2/2.5, Qwen3, Qwen3-MoE and Llama 3 decoders."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

# HF `model_type` -> the architecture features it switches on.
_ARCHS = {
    "qwen2": dict(attention_bias=True, qk_norm=False),
    "qwen3": dict(attention_bias=False, qk_norm=True),
    "qwen3_moe": dict(attention_bias=False, qk_norm=True),
    "llama": dict(attention_bias=False, qk_norm=False),
}
_HF_CLASS = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
             "qwen3_moe": "Qwen3MoeForCausalLM", "llama": "LlamaForCausalLM"}
SUPPORTED_MODEL_TYPES = tuple(_ARCHS)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a decoder-only LM.

  Build one by hand (tiny sizes for CPU), with :meth:`from_hf` from a ``config.json``
  dict, or with :meth:`from_pretrained` from a local HF directory.
  """

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  model_type: str = "qwen3"
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  # Llama 3 rope scaling: (factor, low_freq_factor, high_freq_factor, original_max_pos).
  rope_llama3: tuple[float, float, float, int] | None = None
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # q/k/v projection biases (Qwen2)
  qk_norm: bool = False  # RMSNorm on each query / key head before RoPE (Qwen3)
  # Mixture of experts (Qwen3-MoE). num_experts == 0 means dense.
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int = 0
  norm_topk_prob: bool = False
  decoder_sparse_step: int = 1
  mlp_only_layers: tuple[int, ...] = ()
  max_position_embeddings: int = 32768
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  # Numerics (not part of the HF config).
  dtype: str = "bfloat16"  # compute dtype
  param_dtype: str = "float32"
  remat: bool = False  # rematerialise each layer in the backward pass

  def __post_init__(self):
    if self.model_type not in _ARCHS:
      raise ValueError(
          f"unsupported architecture {self.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                       f"({self.num_kv_heads})")
    if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
      raise ValueError("num_experts_per_tok must be in [1, num_experts]")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self):
    return jnp.dtype(self.param_dtype)

  def is_moe_layer(self, i: int) -> bool:
    return (self.num_experts > 0 and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0)

  def num_params(self) -> int:
    h, d = self.hidden_size, self.head_dim
    attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
    if self.attention_bias:
      attn += d * (self.num_heads + 2 * self.num_kv_heads)
    if self.qk_norm:
      attn += 2 * d
    total = self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + h
    for i in range(self.num_layers):
      mlp = (self.num_experts * 3 * h * self.moe_intermediate_size + self.num_experts * h
             if self.is_moe_layer(i) else 3 * h * self.intermediate_size)
      total += attn + mlp + 2 * h
    return total

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  # ------------------------------------------------------------------ HF interop
  @classmethod
  def from_hf(cls, hf: dict[str, Any], **overrides) -> "ModelConfig":
    """From a transformers ``config.json`` dict (transformers 4.x or 5.x layout)."""
    model_type = hf.get("model_type")
    if model_type not in _ARCHS:
      archs = hf.get("architectures")
      raise ValueError(f"unsupported architecture: model_type={model_type!r} "
                       f"(architectures={archs}); supported: {SUPPORTED_MODEL_TYPES}")
    rope = dict(hf.get("rope_parameters") or {})  # transformers 5
    scaling = hf.get("rope_scaling") or {}  # transformers 4
    rope = {**scaling, **rope}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    llama3 = None
    if rope_type == "llama3":
      llama3 = (float(rope["factor"]), float(rope["low_freq_factor"]),
                float(rope["high_freq_factor"]), int(rope["original_max_position_embeddings"]))
    elif rope_type not in ("default", None):
      raise ValueError(f"unsupported rope_type {rope_type!r} (supported: default, llama3)")
    heads = hf["num_attention_heads"]
    eos = hf.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    kw = dict(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        intermediate_size=hf["intermediate_size"],
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_llama3=llama3,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", _ARCHS[model_type]["attention_bias"])),
        qk_norm=_ARCHS[model_type]["qk_norm"],
        num_experts=hf.get("num_experts", hf.get("num_local_experts", 0)) or 0,
        num_experts_per_tok=hf.get("num_experts_per_tok", 0) or 0,
        moe_intermediate_size=hf.get("moe_intermediate_size", 0) or 0,
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        decoder_sparse_step=hf.get("decoder_sparse_step", 1) or 1,
        mlp_only_layers=tuple(hf.get("mlp_only_layers", ()) or ()),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos,
    )
    if model_type == "qwen2":  # Qwen2 always has q/k/v biases; its config has no flag
      kw["attention_bias"] = True
    if hf.get("mlp_bias"):
      raise ValueError("mlp_bias=True is not supported")
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, **overrides) -> "ModelConfig":
    """From ``<path>/config.json`` of a local HF model directory."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
      raise FileNotFoundError(f"no config.json in {path!r}")
    with open(file) as f:
      return cls.from_hf(json.load(f), **overrides)

  def to_hf(self) -> dict[str, Any]:
    """A transformers ``config.json`` dict (written in the 4.x layout, which 5.x reads)."""
    out: dict[str, Any] = {
        "architectures": [_HF_CLASS[self.model_type]],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "intermediate_size": self.intermediate_size,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "tie_word_embeddings": self.tie_word_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "hidden_act": "silu",
        "torch_dtype": self.param_dtype,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": (list(self.eos_token_ids) if len(self.eos_token_ids) > 1
                         else (self.eos_token_ids[0] if self.eos_token_ids else None)),
    }
    if self.model_type != "qwen2":
      out["attention_bias"] = self.attention_bias
    if self.rope_llama3 is not None:
      f, lo, hi, orig = self.rope_llama3
      out["rope_scaling"] = {"rope_type": "llama3", "factor": f, "low_freq_factor": lo,
                             "high_freq_factor": hi, "original_max_position_embeddings": orig}
    if self.num_experts:
      out.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                 moe_intermediate_size=self.moe_intermediate_size,
                 norm_topk_prob=self.norm_topk_prob,
                 decoder_sparse_step=self.decoder_sparse_step,
                 mlp_only_layers=list(self.mlp_only_layers))
    return out
