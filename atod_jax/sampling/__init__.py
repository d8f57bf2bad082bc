"""Jitted KV-cache sampling, multi-turn continuation, and chunked token log-probs."""
from atod_jax.sampling.generate import (
    SampleOutput, SamplingParams, append, append_tokens, bucket, decode, decode_loop,
    generate, init_cache, sample_token)
from atod_jax.sampling.logprobs import token_logprobs

__all__ = ["SampleOutput", "SamplingParams", "append", "append_tokens", "bucket", "decode",
           "decode_loop", "generate", "init_cache", "sample_token", "token_logprobs"]
