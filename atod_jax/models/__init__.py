"""Decoder LMs (Qwen2/2.5, Qwen3, Qwen3-MoE, Llama 3) in Flax NNX, HF interop, sharding."""
from atod_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from atod_jax.models.decoder import DecoderLM, KVCache
from atod_jax.models.sharding import (
    DEFAULT_RULES, batch_sharding, make_mesh, shard_model, state_shardings)

__all__ = ["DEFAULT_RULES", "SUPPORTED_MODEL_TYPES", "DecoderLM", "KVCache", "ModelConfig",
           "batch_sharding", "make_mesh", "shard_model", "state_shardings"]
