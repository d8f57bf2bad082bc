"""A random tiny Qwen3 in an HF directory, with a small BPE tokenizer and a ChatML chat
template as Qwen's: it stands in for Qwen3-0.6B in the paper-scale configs' tests."""
import json
import os

from flax import nnx

from atod_jax.models import DecoderLM, ModelConfig, save_pretrained
from atod_jax.models.tokenizer import train_text_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_qwen3_dir(root) -> tuple[str, int]:
  """Writes ``<root>/tok`` (tokenizer) and ``<root>/tiny-qwen3`` (model and tokenizer);
  returns the model directory and the vocabulary size."""
  tok_dir = os.path.join(root, "tok")
  tok = train_text_tokenizer(["<search>who wrote it</search> <answer>Paris</answer>"] * 4,
                             300, tok_dir)
  with open(os.path.join(tok_dir, "tokenizer_config.json")) as f:
    tok_config = json.load(f)
  tok_config["chat_template"] = CHATML  # the windowed prompts go through it
  with open(os.path.join(tok_dir, "tokenizer_config.json"), "w") as f:
    json.dump(tok_config, f)
  cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=16, intermediate_size=64, model_type="qwen3",
                    qk_norm=True, dtype="float32", param_dtype="float32")
  hf = os.path.join(root, "tiny-qwen3")
  save_pretrained(DecoderLM(cfg, nnx.Rngs(0)), hf, tokenizer_dir=tok_dir)
  return hf, tok.vocab_size
