"""Tiny random transformers checkpoints, written with save_pretrained inside the tests."""
import torch
import transformers

TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            initializer_range=0.08)

CASES = {
    "qwen2_tied": (transformers.Qwen2Config, dict(tie_word_embeddings=True, rope_theta=10000.0)),
    "qwen3_untied_gqa": (transformers.Qwen3Config, dict(
        head_dim=32, tie_word_embeddings=False, rope_theta=1e6)),  # head_dim != hidden/heads
    "qwen3_tied_mha": (transformers.Qwen3Config, dict(
        num_key_value_heads=4, head_dim=16, tie_word_embeddings=True, rope_theta=5e5)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(
        head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=True, mlp_only_layers=[1], tie_word_embeddings=False)),
    "llama3_scaled": (transformers.LlamaConfig, dict(
        rope_theta=500000.0, tie_word_embeddings=False, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama_tied_default_rope": (transformers.LlamaConfig, dict(
        rope_theta=10000.0, tie_word_embeddings=True, num_key_value_heads=1)),
}


def make_checkpoint(case: str, path: str, seed: int = 0):
  """Saves a random tiny model of ``case`` to ``path``; returns the torch model (eval)."""
  cls, extra = CASES[case]
  cfg = cls(**{**TINY, **extra})
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
  with torch.no_grad():  # norms start at 1 and biases at 0: make them matter
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.2 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.normal_(0, 0.1)
  model.eval()
  model.save_pretrained(path)
  return model
