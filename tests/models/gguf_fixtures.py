"""Small GGUF files written with the gguf package's writer from tiny random transformers
models, laid out as llama.cpp's converter lays them out (its tensor names from
``gguf.get_tensor_name_map``, Llama's Q/K rows in interleaved RoPE order, experts stacked
in one tensor per projection, 1-D tensors in F32)."""
import gguf
import numpy as np
import torch
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode

ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
        "qwen3": gguf.MODEL_ARCH.QWEN3, "qwen3moe": gguf.MODEL_ARCH.QWEN3MOE}
# K-quant blocks (256 values) hold float16 scales at these byte offsets: ggml's layout
K_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_model(arch: str, *, hidden: int = 64, inter: int = 96, vocab: int = 160, seed: int = 0):
  common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512, tie_word_embeddings=False)
  if arch == "llama":
    cfg = transformers.LlamaConfig(**common, rope_theta=10000.0)
  elif arch == "qwen2":
    cfg = transformers.Qwen2Config(**common, rope_theta=10000.0)
  elif arch == "qwen3":
    # head_dim 128: transformers' GGUF reader ignores attention.key_length for qwen3 and
    # takes the class default (128, Qwen3's)
    cfg = transformers.Qwen3Config(**{**common, "tie_word_embeddings": True}, head_dim=128,
                                   rope_theta=1e6)
  elif arch == "qwen3moe":
    # expert width 768: transformers' reader ignores expert_feed_forward_length and takes
    # the class default (768, Qwen3-30B-A3B's)
    cfg = transformers.Qwen3MoeConfig(**common, head_dim=32, num_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=768,
                                      norm_topk_prob=True, rope_theta=1e6)
  else:
    raise ValueError(arch)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.2 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.normal_(0, 0.1)
      else:
        p.normal_(0, 0.08)
  return model.eval()


def vocabulary(size: int, merges: int = 40):
  """``size`` byte-level tokens: the specials, single byte characters (those of
  "etaoinshr " first), then ``merges`` pairs of those (with their merge rules)."""
  spell = bytes_to_unicode()
  letters = [spell[b] for b in b"etaoinshr "]
  rest = [c for c in spell.values() if c not in letters]
  tokens = SPECIALS + letters + rest[:size - len(SPECIALS) - len(letters) - merges]
  rules = []
  for a in letters:
    for b in letters:
      if len(rules) < merges:
        rules.append(f"{a} {b}")
        tokens.append(a + b)
  return tokens, rules


def _quantized(w: np.ndarray, qtype: str, rng: np.random.Generator):
  """``(data, raw_dtype)`` for a 2-D or 3-D weight; K-quants (the gguf package reads but does
  not write them) are random blocks with small float16 scales."""
  t = gguf.GGMLQuantizationType[qtype]
  if qtype == "F32":
    return w.astype(np.float32), None
  if qtype == "F16":
    return w.astype(np.float16), None
  if qtype in K_SCALES:
    shape = gguf.quant_shape_to_byte_shape(w.shape, t)
    raw = rng.integers(0, 256, size=shape, dtype=np.uint8)
    blocks = raw.reshape(-1, gguf.GGML_QUANT_SIZES[t][1])
    for off in K_SCALES[qtype]:
      scale = rng.uniform(0.0002, 0.001, size=len(blocks)).astype(np.float16)
      blocks[:, off:off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return raw, t
  return gguf.quantize(w.astype(np.float32), t), t


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's converter: each head's rows from (half, i) to (i, half) order."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path: str, arch: str, qtype: str = "F32", *, seed: int = 0,
               pre: str = "qwen2", vocab=None, drop: tuple[str, ...] = ()):
  """Writes ``model`` as a GGUF file; returns the weights as dequantized by the file's
  format where the quantization is random (K-quants) -- the tests compare logits."""
  cfg = model.config
  rng = np.random.default_rng(seed)
  w = gguf.GGUFWriter(path, arch)
  n_layers = cfg.num_hidden_layers
  head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
  w.add_block_count(n_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_key_length(head_dim)
  w.add_value_length(head_dim)
  w.add_rope_dimension_count(head_dim)
  w.add_vocab_size(cfg.vocab_size)
  if arch == "qwen3moe":
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
  tokens, merges = vocab or vocabulary(cfg.vocab_size)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
  w.add_token_merges(merges)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_pad_token_id(0)
  w.add_add_bos_token(False)
  w.add_chat_template(TEMPLATE)
  names = gguf.get_tensor_name_map(ARCH[arch], n_layers)
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  experts: dict[str, np.ndarray] = {}
  for hf_name, value in state.items():
    if ".experts." in hf_name:  # transformers 5 fuses the experts: [E, 2I, H], [E, H, I]
      layer = hf_name.split(".")[2]
      if hf_name.endswith("gate_up_proj"):
        gate, up = np.split(value, 2, axis=1)
        experts[f"blk.{layer}.ffn_gate_exps.weight"] = gate
        experts[f"blk.{layer}.ffn_up_exps.weight"] = up
      else:
        experts[f"blk.{layer}.ffn_down_exps.weight"] = value
      continue
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    assert name is not None, hf_name
    if name in drop:
      continue
    if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
      value = _permute(value, cfg.num_attention_heads if ".attn_q." in name
                       else cfg.num_key_value_heads)
    if value.ndim == 1:
      w.add_tensor(name, value.astype(np.float32))
    else:
      data, raw = _quantized(value, qtype, rng)
      w.add_tensor(name, data, raw_dtype=raw)
  for name, stacked in experts.items():
    data, raw = _quantized(np.ascontiguousarray(stacked), qtype, rng)
    w.add_tensor(name, data, raw_dtype=raw)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
