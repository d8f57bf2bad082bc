"""Sampling and training throughput of the NNX decoder on the reference workload W.

W: Qwen3 shape, hidden 256, 4 layers, 8 query / 2 KV heads, head_dim 32, FFN 768,
vocab 8192, untied, f32 (~7.2M params); batch 64, prompt 64, 128 new tokens, KV cache.

Prints, in one run: an f32 matmul ceiling (the higher of two measurements, before and
after the sampling rows); new tokens/s and achieved GFLOP/s of sampled (temperature
1.0) and greedy decoding; the same workload through transformers `generate` (PyTorch,
dynamic cache, top_k=0) when torch is installed (each sampling row the best of
interleaved runs, so that a slow spell of a shared machine hits all rows alike); a
training step (token log-probs + AdamW update); and the per-turn cost of a 20-turn
continuation next to re-prefilling the history each turn.

    python experiments/bench_models.py            # all rows
    python experiments/bench_models.py --no-torch # skip the transformers rows
    python experiments/bench_models.py --dtype bfloat16   # accelerator default
    python experiments/bench_models.py --smollm2  # a real model: SmolLM2-135M-Instruct

``--smollm2`` (the `pretrained` extra): sampled decoding (T=1.0, no top-k / top-p) of
the real SmolLM2-135M-Instruct at batch 1, 16 and 64 (prompt 64, 64 new tokens), f32,
against transformers `generate` on the same dequantized weights (its own GGUF loader)
and against llama.cpp (`llama-cpp-python`) on the original Q4_1 file: the tool a CPU
user would pick for it. llama-cpp-python's API samples one sequence at a time, so its
batch rows are the sequences one after another.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from atod_jax import sampling as smp
from atod_jax.models import DecoderLM, ModelConfig

W = ModelConfig(model_type="qwen3", vocab_size=8192, hidden_size=256, num_layers=4,
                num_heads=8, num_kv_heads=2, head_dim=32, intermediate_size=768,
                qk_norm=True, tie_word_embeddings=False, dtype="float32")


def forward_flops_per_token(cfg: ModelConfig, context: float) -> float:
  """Matmul FLOPs of one token's forward pass attending to ``context`` tokens."""
  h, n, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  per_layer = 2 * h * (n + 2 * k) * d + 2 * n * d * h + 2 * 3 * h * cfg.intermediate_size
  per_layer += 2 * 2 * n * d * context  # scores and weighted values
  return cfg.num_layers * per_layer + 2 * h * cfg.vocab_size


def timed(fn, repeats=3):
  fn()  # compile + warm-up
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def interleaved(fns: dict, repeats: int) -> dict:
  """Best seconds of each ``fn`` (returning its own seconds), the runs interleaved so
  that a slow spell of this shared machine hits every row alike."""
  for fn in fns.values():
    fn()  # compile + warm-up
  best = dict.fromkeys(fns, float("inf"))
  for _ in range(repeats):
    for name, fn in fns.items():
      best[name] = min(best[name], fn())
  return best


def matmul_ceiling(dtype, n=2048):
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  return 2 * n**3 / timed(lambda: f(a).block_until_ready(), 10) / 1e9


def bench_sampling(model, cfg, batch, prompt_len, new, repeats=5):
  prompt = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len)))
  slots = smp.bucket(prompt_len + new)
  cache = smp.init_cache(model, batch, slots)
  logits, cache = smp.append(model, cache, prompt)
  jax.block_until_ready(logits)
  fns = {}
  for name, params in (("sample T=1.0", smp.SamplingParams(1.0)),
                       ("greedy", smp.SamplingParams(0.0))):
    def run(params=params):
      t0 = time.perf_counter()
      smp.generate(model, prompt, jax.random.key(1), new, params, slots=slots).tokens.block_until_ready()
      return time.perf_counter() - t0

    def decode_only(params=params):
      c = jax.tree.map(jnp.copy, cache)  # decode donates its cache
      jax.block_until_ready(c)
      t0 = time.perf_counter()
      smp.decode(model, c, logits, jax.random.key(1), new, params).tokens.block_until_ready()
      return time.perf_counter() - t0

    fns[name], fns[name + ", decode only"] = run, decode_only
  best = interleaved(fns, repeats)
  lm_head = 2 * cfg.hidden_size * cfg.vocab_size  # prefill projects the last token only
  decode_flops = batch * new * forward_flops_per_token(cfg, prompt_len + new / 2)
  flops = batch * (prompt_len * forward_flops_per_token(cfg, prompt_len / 2)
                   - (prompt_len - 1) * lm_head) + decode_flops
  rows = {}
  for name, sec in best.items():
    f = decode_flops if name.endswith("decode only") else flops
    rows[name] = (batch * new / sec, f / sec / 1e9, sec)
  return dict(sorted(rows.items()))


def bench_transformers(cfg, batch, prompt_len, new, repeats=3):
  try:
    import torch
    import transformers
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count())
  hf_cfg = transformers.Qwen3Config(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, tie_word_embeddings=False)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
  model = transformers.Qwen3ForCausalLM(hf_cfg).eval().to(device=device, dtype=dtype)
  prompt = torch.tensor(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len)),
                        device=device)
  mask = torch.ones_like(prompt)
  fns = {}
  for name, kw in (("sample T=1.0", dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)),
                   ("greedy", dict(do_sample=False))):
    def run(kw=kw, n=new):
      t0 = time.perf_counter()
      with torch.no_grad():
        model.generate(prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                       pad_token_id=0, **kw)
      if device == "cuda":
        torch.cuda.synchronize()
      return time.perf_counter() - t0
    fns[name] = run
  return {name: (batch * new / sec, sec) for name, sec in interleaved(fns, repeats).items()}


def bench_train(cfg, batch, length):
  model = DecoderLM(cfg, nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, length)))
  mask = jnp.asarray(rng.random((batch, length)) < 0.5, jnp.float32)
  adv = jnp.asarray(rng.normal(size=(batch, length)), jnp.float32)

  @nnx.jit
  def step(model, opt, tokens, mask, adv):
    def loss(m):
      lp = smp.token_logprobs(m, tokens, chunk_size=256)
      return -jnp.sum(lp * adv * mask) / jnp.sum(mask)
    value, grads = nnx.value_and_grad(loss)(model)
    opt.update(model, grads)
    return value

  sec = timed(lambda: step(model, opt, tokens, mask, adv).block_until_ready())
  flops = 3 * batch * length * forward_flops_per_token(cfg, length / 2)
  return batch * length / sec, flops / sec / 1e9, sec


def bench_turns(model, cfg, batch, turns=20, obs=32, act=16, prompt_len=64):
  """Per-turn seconds: KV-cache continuation vs re-prefilling the whole history."""
  rng = np.random.default_rng(0)
  prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, prompt_len)))
  observations = [jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, obs))) for _ in range(turns)]
  slots = smp.bucket(prompt_len + turns * (obs + act))
  params = smp.SamplingParams(1.0)

  def continuation():
    times = []
    cache = smp.init_cache(model, batch, slots)
    logits, cache = smp.append(model, cache, prompt)
    for i in range(turns):
      t0 = time.perf_counter()
      if i:
        logits, cache = smp.append(model, cache, observations[i])
      out = smp.decode(model, cache, logits, jax.random.key(i), act, params)
      cache, logits = out.cache, out.last_logits
      out.tokens.block_until_ready()
      times.append(time.perf_counter() - t0)
    return times

  def reprefill():
    times, history = [], prompt
    for i in range(turns):
      t0 = time.perf_counter()
      if i:
        history = jnp.concatenate([history, observations[i]], axis=1)
      n = history.shape[1]
      width = smp.bucket(n, sizes=(128, 256, 512, 1024))  # left-pad: few compiled shapes
      padded = jnp.pad(history, ((0, 0), (width - n, 0)))
      valid = jnp.arange(width)[None, :] >= width - n
      out = smp.generate(model, padded, jax.random.key(i), act, params,
                         prompt_valid=jnp.broadcast_to(valid, padded.shape),
                         slots=smp.bucket(width + act, sizes=(256, 512, 1024, 2048)))
      out.tokens.block_until_ready()
      history = jnp.concatenate([history, out.tokens], axis=1)
      times.append(time.perf_counter() - t0)
    return times

  continuation()  # compile
  reprefill()
  return continuation(), reprefill()


def bench_smollm2(batches=(1, 16, 64), prompt_len=64, new=64, repeats=3):
  from atod_jax.models.gguf import load_gguf, smollm2_path
  path = smollm2_path()
  model = load_gguf(path, dtype="float32")
  cfg = model.cfg
  rng = np.random.default_rng(0)
  prompts = {b: rng.integers(100, cfg.vocab_size, (b, prompt_len)) for b in batches}
  eos = cfg.eos_token_ids[0]
  fns = {}
  for b in batches:
    def ours(b=b):
      t0 = time.perf_counter()
      smp.generate(model, jnp.asarray(prompts[b]), jax.random.key(1), new,
                   smp.SamplingParams(1.0)).tokens.block_until_ready()
      return time.perf_counter() - t0
    fns[("atod_jax", b)] = ours
  try:
    import torch
    import transformers
    torch.set_num_threads(os.cpu_count())
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    for b in batches:
      def theirs(b=b):
        x = torch.tensor(prompts[b])
        t0 = time.perf_counter()
        with torch.no_grad():
          hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                      min_new_tokens=new, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                      pad_token_id=eos)
        return time.perf_counter() - t0
      fns[("transformers", b)] = theirs
  except ImportError:
    pass
  try:
    from llama_cpp import Llama
    llm = Llama(model_path=path, n_ctx=512, n_threads=os.cpu_count(), n_batch=512,
                seed=1, verbose=False)
    for b in batches:
      def llama(b=b):
        t0 = time.perf_counter()
        made = 0
        for row in prompts[b]:
          out = llm.create_completion(row.tolist(), max_tokens=new, temperature=1.0, top_k=0,
                                      top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                      logit_bias={eos: -1e9})
          made += out["usage"]["completion_tokens"]
        # (rarely one token more than asked: llama.cpp's count; the rate uses b * new)
        assert abs(made - b * new) <= b, made
        return time.perf_counter() - t0
      fns[("llama.cpp Q4_1", b)] = llama
  except ImportError:
    pass
  return cfg, interleaved(fns, repeats)


def main_smollm2():
  dev = jax.devices()[0]
  before = matmul_ceiling(jnp.float32)
  batches, new = (1, 16, 64), 64
  cfg, best = bench_smollm2(batches, new=new)
  after = matmul_ceiling(jnp.float32)
  print(f"device: {dev.platform} ({dev.device_kind}), jax {jax.__version__}, {os.cpu_count()} "
        f"CPU threads; SmolLM2-135M-Instruct ({cfg.num_params() / 1e6:.1f}M params), f32")
  print(f"f32 matmul ceiling (2048^3, this run): {max(before, after):.0f} GFLOP/s (measured "
        f"{before:.0f} before and {after:.0f} after)\n")
  print(f"Sampled decoding (T=1.0), prompt 64, {new} new tokens a row, prefill included; new "
        "tokens/s (best of 3 interleaved runs):\n")
  tools = [t for t in ("atod_jax", "transformers", "llama.cpp Q4_1")
           if any(k[0] == t for k in best)]
  print("| batch | " + " | ".join(tools) + " | " +
        " | ".join(f"atod_jax / {t}" for t in tools[1:]) + " |")
  print("|---:|" + "---:|" * (2 * len(tools) - 1))
  for b in batches:
    rate = {t: b * new / best[(t, b)] for t in tools}
    print(f"| {b} | " + " | ".join(f"{rate[t]:.0f}" for t in tools) + " | " +
          " | ".join(f"{rate['atod_jax'] / rate[t]:.2f}x" for t in tools[1:]) + " |")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--prompt", type=int, default=64)
  ap.add_argument("--new", type=int, default=128)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--turn-batch", type=int, default=16,
                  help="batch of the 20-turn episode (the re-prefill baseline is costly)")
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--smollm2", action="store_true",
                  help="the SmolLM2-135M-Instruct table only (needs the pretrained extra)")
  args = ap.parse_args()
  if args.smollm2:
    return main_smollm2()
  cfg = W.replace(dtype=args.dtype)
  dev = jax.devices()[0]
  before = matmul_ceiling(jnp.dtype(args.dtype))
  model = DecoderLM(cfg, nnx.Rngs(0))
  ours = bench_sampling(model, cfg, args.batch, args.prompt, args.new)
  theirs = None if args.no_torch else bench_transformers(cfg, args.batch, args.prompt, args.new)
  after = matmul_ceiling(jnp.dtype(args.dtype))
  ceiling = max(before, after)  # the higher: this shared machine's speed drifts
  print(f"device: {dev.platform} ({dev.device_kind}), jax {jax.__version__}, "
        f"{cfg.num_params() / 1e6:.2f}M params, compute {args.dtype}")
  print(f"{args.dtype} matmul ceiling (2048^3, this run): {ceiling:.0f} GFLOP/s "
        f"(measured {before:.0f} before and {after:.0f} after the sampling rows)\n")
  print(f"Sampling, batch {args.batch}, prompt {args.prompt}, {args.new} new tokens "
        "(prefill included unless 'decode only'):\n")
  print("| mode | atod_jax tok/s | GFLOP/s | % of ceiling | transformers tok/s | ratio |")
  print("|---|---:|---:|---:|---:|---:|")
  for name, (tps, gf, _) in ours.items():
    hf = (f"{theirs[name][0]:.0f} | {tps / theirs[name][0]:.2f}x" if theirs and name in theirs
          else "n/a | n/a")
    print(f"| {name} | {tps:.0f} | {gf:.1f} | {gf / ceiling:.0%} | {hf} |")
  slow = ours["greedy, decode only"][0] / ours["sample T=1.0, decode only"][0] - 1
  print(f"\nsampling vs greedy (decode only): {slow:+.1%} time per token")

  tps, gf, sec = bench_train(cfg, args.batch, args.prompt + args.new)
  print(f"\nTraining step (token log-probs + backward + AdamW), batch {args.batch} x "
        f"{args.prompt + args.new}: {sec * 1e3:.0f} ms, {tps:.0f} tokens/s, {gf:.1f} GFLOP/s "
        f"({gf / ceiling:.0%} of ceiling)")

  cont, pre = bench_turns(model, cfg, args.turn_batch)
  print(f"\n20-turn episode, batch {args.turn_batch}: each turn appends 32 observation tokens "
        "and samples 16 (ms per turn):\n")
  print("| turn | KV-cache continuation | re-prefill history |")
  print("|---:|---:|---:|")
  for i in (0, 1, 4, 9, 14, 19):
    print(f"| {i + 1} | {cont[i] * 1e3:.1f} | {pre[i] * 1e3:.1f} |")
  print(f"\nturns 2-20: continuation {np.mean(cont[1:]) * 1e3:.1f} ms/turn "
        f"(last/second {cont[-1] / cont[1]:.2f}); re-prefill {np.mean(pre[1:]) * 1e3:.1f} "
        f"ms/turn (last/second {pre[-1] / pre[1]:.2f})")


if __name__ == "__main__":
  main()
