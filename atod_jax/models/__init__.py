"""Decoder LMs (Qwen2/2.5, Qwen3, Qwen3-MoE, Llama 3) in Flax NNX, HF interop, sharding."""
from atod_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from atod_jax.models.decoder import PARAMS_LAYOUT, DecoderLM, KVCache
from atod_jax.models.gguf import load_gguf, smollm2_path
from atod_jax.models.hf import load_pretrained, save_pretrained
from atod_jax.models.tokenizer import Tokenizer, train_text_tokenizer
from atod_jax.models.sharding import (
    DEFAULT_RULES, batch_sharding, make_mesh, shard_batch, shard_model, state_shardings)

__all__ = ["DEFAULT_RULES", "PARAMS_LAYOUT", "SUPPORTED_MODEL_TYPES", "DecoderLM", "KVCache",
           "ModelConfig", "Tokenizer", "batch_sharding", "load_gguf", "load_pretrained", "make_mesh", "save_pretrained",
           "shard_batch", "shard_model", "smollm2_path", "state_shardings", "train_text_tokenizer"]
