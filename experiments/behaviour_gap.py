"""How far the sampler's log-probs (pi_old as recorded while decoding from the KV cache)
are from a training forward's over the finished sequence, in f32 and bf16.

    python experiments/behaviour_gap.py              # W and a Qwen3-0.6B-shaped model
    python experiments/behaviour_gap.py --models W --batch 8 --new 64

The gap enters the clipped ratio exp(log pi_theta - log pi_old) and ATOD's
log pi_T - log pi_old; ``objective.behaviour_logp = recompute`` removes it at the cost
of one more forward of the batch per step. The models are randomly initialised (the
gap depends on the arithmetic, not on what a model knows; a trained model's sharper
distributions may differ). Prints a table.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from atod_jax import sampling as smp
from atod_jax.models import DecoderLM, ModelConfig

MODELS = {
    "W": ModelConfig(model_type="qwen3", vocab_size=8192, hidden_size=256, num_layers=4,
                     num_heads=8, num_kv_heads=2, head_dim=32, intermediate_size=768,
                     qk_norm=True, tie_word_embeddings=False, dtype="float32"),
    "qwen3-0.6B": ModelConfig(model_type="qwen3", vocab_size=151936, hidden_size=1024,
                              num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                              intermediate_size=3072, qk_norm=True, tie_word_embeddings=True,
                              rope_theta=1_000_000.0, dtype="float32"),
}


def gap(cfg: ModelConfig, dtype: str, batch: int, prompt: int, new: int) -> dict:
  model = DecoderLM(cfg.replace(dtype=dtype), nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (batch, prompt), 0, cfg.vocab_size)
  t0 = time.perf_counter()
  out = smp.generate(model, tokens, jax.random.key(2), new, smp.SamplingParams(temperature=1.0))
  full = jnp.concatenate([tokens, out.tokens], axis=1)
  valid = jnp.concatenate([jnp.ones(tokens.shape, bool), out.valid], axis=1)
  forward = smp.token_logprobs(model, full, valid)[:, prompt:]
  diff = np.abs(np.asarray(forward - out.logprobs))[np.asarray(out.valid)]
  sampled = -np.asarray(out.logprobs)[np.asarray(out.valid)]
  return {"max": diff.max(), "mean": diff.mean(), "p99": np.quantile(diff, 0.99),
          "nll": sampled.mean(), "tokens": diff.size, "seconds": time.perf_counter() - t0}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", default="W,qwen3-0.6B")
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--prompt", type=int, default=32)
  ap.add_argument("--new", type=int, default=32)
  args = ap.parse_args()
  print(f"{jax.devices()[0].device_kind}: batch {args.batch}, prompt {args.prompt}, "
        f"{args.new} sampled tokens at T=1; |sampler - forward| per sampled token\n")
  print("| model | dtype | max | p99 | mean | mean -log p (sampled) | tokens | s |")
  print("|---|---|---:|---:|---:|---:|---:|---:|")
  for name in args.models.split(","):
    for dtype in ("float32", "bfloat16"):
      r = gap(MODELS[name], dtype, args.batch, args.prompt, args.new)
      print(f"| {name} | {dtype} | {r['max']:.2e} | {r['p99']:.2e} | {r['mean']:.2e} | "
            f"{r['nll']:.2f} | {r['tokens']} | {r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
  main()
