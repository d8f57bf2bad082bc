"""GGUF import against transformers' own GGUF loading (its own reader and torch
dequantization: independent of the gguf package we read with), on small files written
here for every architecture and quantization, and on the real SmolLM2-135M-Instruct."""
import copy
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it to load a GGUF file

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from atod_jax.models import Tokenizer  # noqa: E402
from atod_jax.models.gguf import GGUFError, config_from_gguf, load_gguf, smollm2_path  # noqa: E402
from tests.models.gguf_fixtures import tiny_model, write_gguf  # noqa: E402

CASES = [  # (architecture, quantization, hidden size: K-quant rows need multiples of 256)
    ("llama", "F32", 64), ("llama", "F16", 64), ("llama", "BF16", 64), ("llama", "Q8_0", 64),
    ("qwen2", "Q4_0", 64), ("qwen2", "Q4_1", 64), ("qwen3", "Q5_0", 64), ("qwen3", "Q5_1", 64),
    ("qwen3moe", "Q8_0", 64), ("llama", "Q4_K", 256), ("qwen3", "Q6_K", 256),
    ("qwen2", "Q2_K", 256), ("qwen2", "Q3_K", 256), ("llama", "Q5_K", 256),
]


def _write(tmp_path, arch, qtype, hidden, **kw):
  model = tiny_model(arch, hidden=hidden, inter=256 if hidden == 256 else 96)
  path = tmp_path / "m.gguf"
  write_gguf(model, str(path), arch, qtype, **kw)
  return path


def _transformers(path, dtype=torch.float32):
  return transformers.AutoModelForCausalLM.from_pretrained(
      path.parent, gguf_file=path.name, dtype=dtype).eval()


@pytest.mark.parametrize("arch,qtype,hidden", CASES, ids=[f"{a}-{q}" for a, q, _ in CASES])
def test_logits_match_transformers_gguf(arch, qtype, hidden, tmp_path):
  path = _write(tmp_path, arch, qtype, hidden)
  ref = _transformers(path)
  model = load_gguf(path, dtype="float32")
  tokens = np.random.default_rng(0).integers(0, 160, (2, 24))
  with torch.no_grad():
    want = ref(torch.tensor(tokens)).logits.numpy()
  got = np.asarray(model(jnp.asarray(tokens))[0])
  # random K-quant blocks give logits of ~100: compare relative to the largest
  scale = max(1.0, float(np.abs(want).max()))
  assert np.abs(got - want).max() <= 2e-6 * scale, (np.abs(got - want).max(), scale)


def test_sharded_load_reads_the_same_weights(tmp_path):
  from atod_jax.models import make_mesh
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 devices")
  path = _write(tmp_path, "llama", "Q8_0", 64)  # llama: Q/K rows are un-permuted per shard
  whole = load_gguf(path, dtype="float32")
  mesh = make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])
  sharded = load_gguf(path, dtype="float32", mesh=mesh)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 160, (2, 16)))
  q = sharded.layers[0].attn.q[...]
  assert len(q.sharding.device_set) == 4 and q.addressable_shards[0].data.shape != q.shape
  np.testing.assert_allclose(np.asarray(sharded(tokens)[0]), np.asarray(whole(tokens)[0]),
                             atol=1e-5)


def test_tokenizer_and_template_match_transformers(tmp_path):
  path = _write(tmp_path, "qwen3", "F32", 64)
  ours = Tokenizer.from_gguf(path)
  theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  for text in ["the rain in the east", "tea, heat; 'state' hits 3 heirs!", "<|im_start|>hi"]:
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"], text
    assert ours.decode(ours.encode(text)) == text
  messages = [{"role": "user", "content": "go to shelf 1"}]
  assert ours.apply_chat_template(messages, add_generation_prompt=True) == \
      theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  assert ours.eos_token_id == 2 and ours.stop_token_ids == [2]
  assert ours.token_to_id("<|im_end|>") == 2


def test_convert_writes_a_directory_transformers_and_we_read(tmp_path):
  path = _write(tmp_path, "llama", "Q4_0", 64)
  out = tmp_path / "hf"
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, "-m", "atod_jax.models.convert", str(path), str(out)],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "llama, 2 layers, hidden 64" in proc.stdout
  tokens = np.random.default_rng(2).integers(0, 160, (2, 16))
  with torch.no_grad():
    want = _transformers(path)(torch.tensor(tokens)).logits.numpy()
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    got = back(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-5)
  tok = Tokenizer.from_pretrained(out)
  assert tok.encode("the heat") == Tokenizer.from_gguf(path).encode("the heat")
  assert tok.stop_token_ids == [2] and "<|im_start|>" in tok.chat_template
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert hf_tok("the heat", add_special_tokens=False)["input_ids"] == tok.encode("the heat")


def _one_line(excinfo):
  message = str(excinfo.value)
  assert "\n" not in message, message
  return message


def test_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no GGUF file"):
    load_gguf(tmp_path / "missing.gguf")
  junk = tmp_path / "junk.gguf"
  junk.write_bytes(b"not a gguf file at all" * 10)
  with pytest.raises(GGUFError, match="not a GGUF file") as e:
    load_gguf(junk)
  _one_line(e)
  good = _write(tmp_path, "llama", "Q8_0", 64)
  data = good.read_bytes()
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(data[:len(data) - 5000])
  with pytest.raises(GGUFError, match="cut.gguf: a GGUF file that is truncated or damaged") as e:
    load_gguf(cut)
  _one_line(e)
  header = tmp_path / "header.gguf"
  header.write_bytes(data[:300])  # cut inside the metadata
  with pytest.raises(GGUFError, match="header.gguf: a GGUF file that is truncated") as e:
    load_gguf(header)
  _one_line(e)

  other = tmp_path / "other.gguf"
  w = gguf.GGUFWriter(str(other), "gpt2")
  w.add_block_count(1)
  w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
  w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
  with pytest.raises(GGUFError, match="architecture 'gpt2' is not supported; supported: "
                     "llama, qwen2, qwen3, qwen3moe") as e:
    load_gguf(other)
  _one_line(e)


def test_unsupported_quantization_is_named(tmp_path, monkeypatch):
  # IQ4_NL: written as raw blocks (a 16-byte-wide row of 32 values per 18 bytes)
  path = _write(tmp_path, "llama", "F32", 64)
  iq = tmp_path / "iq.gguf"
  model = tiny_model("llama", hidden=64, inter=96)
  import tests.models.gguf_fixtures as fx
  real = fx._quantized

  def iq4(w, qtype, rng):
    if w.shape[-1] % 32 == 0 and w.shape[0] == 64 and w.ndim == 2:
      t = gguf.GGMLQuantizationType.IQ4_NL
      shape = gguf.quant_shape_to_byte_shape(w.shape, t)
      return np.zeros(shape, np.uint8), t
    return real(w, qtype, rng)
  monkeypatch.setattr(fx, "_quantized", iq4)
  write_gguf(model, str(iq), "llama", "F32")
  with pytest.raises(GGUFError, match=r"quantization IQ4_NL is not supported; supported: F32") as e:
    load_gguf(iq)
  _one_line(e)
  assert config_from_gguf(path).num_layers == 2


# ---------------------------------------------------------------- the real model
MIXED_TEXT = "\n".join([
    "def add(a: int, b: int) -> int:\n    \"\"\"Adds two numbers.\"\"\"\n    return a + b  # 42\n",
    "for (int i = 0; i < 1024; ++i) { sum += x[i] * 3.14159f; }",
    "In 2024 the price rose 12.5% to $1,234,567.89 (vs. 987654 in 2019); call +1-555-0100.",
    "naïve café, Zürich, Ελληνικά, русский, 東京タワー, 한국어, emoji 🤖🚀, é = e\u0301.",
    "I'm sure you're right, they'll go; we've seen it.  Two  spaces,\ttabs\tand\n\nnewlines.",
    "<think>The mug is on shelf 2. I should go there first.</think><action>go to shelf 2</action>",
    "You are in the middle of a room. Looking quickly around you, you see a cabinet 4, a "
    "cabinet 3, a countertop 1, a drawer 2, a fridge 1, a garbagecan 1, a microwave 1, a "
    "shelf 3, a sinkbasin 1, a stoveburner 4, and a toaster 1.\nYour task is to: put a "
    "clean mug in coffeemachine.",
    "Question: Which magazine was started first, Arthur's Magazine or First for Women?\n"
    "<search>Arthur's Magazine</search><information>Arthur's Magazine (1844-1846) was an "
    "American literary periodical published in Philadelphia.</information><answer>Arthur's "
    "Magazine</answer>",
    "JSON: {\"id\": 17, \"tags\": [\"a\", \"b\"], \"ok\": true, \"x\": -0.0005e+10}",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\nHi there.<|im_end|>",
] * 3)


@pytest.fixture(scope="module")
def smollm2():
  try:
    path = smollm2_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  ours = load_gguf(path, dtype="float32")
  theirs = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
  hf_tok = transformers.AutoTokenizer.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path))
  return path, ours, theirs, Tokenizer.from_gguf(path), hf_tok


def test_smollm2_config(smollm2):
  path, ours, *_ = smollm2
  cfg = ours.cfg
  assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
          cfg.vocab_size, cfg.tie_word_embeddings) == ("llama", 30, 576, 9, 3, 49152, True)
  assert 134e6 < cfg.num_params() < 136e6


def test_smollm2_tokenizer_matches(smollm2):
  path, _, _, tok, hf_tok = smollm2
  assert len(MIXED_TEXT) > 3000
  ids = tok.encode(MIXED_TEXT)
  assert ids == hf_tok(MIXED_TEXT, add_special_tokens=False)["input_ids"]
  assert tok.decode(ids) == MIXED_TEXT
  try:  # llama.cpp itself, the format's reference, where it is installed
    from llama_cpp import Llama
  except ImportError:
    return
  llm = Llama(model_path=path, vocab_only=True, verbose=False)
  assert llm.tokenize(MIXED_TEXT.encode(), add_bos=False, special=True) == ids


def test_smollm2_chat_template_matches(smollm2):
  *_, tok, hf_tok = smollm2
  conversations = [
      [{"role": "user", "content": "What is 2+2?"}],
      [{"role": "system", "content": "You act in a house. Answer with <action>...</action>."},
       {"role": "user", "content": "You see a shelf 1 and a desk 2."},
       {"role": "assistant", "content": "<action>go to shelf 1</action>"},
       {"role": "user", "content": "On the shelf 1, you see a mug 1."}],
  ]
  for messages in conversations:
    for gen in (True, False):
      assert tok.apply_chat_template(messages, add_generation_prompt=gen) == \
          hf_tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
  assert tok.stop_token_ids == [2] and tok.decode([2]) == "<|im_end|>"


def test_smollm2_logits_match(smollm2):
  _, ours, theirs, tok, _ = smollm2
  ids = tok.apply_chat_template(
      [{"role": "user", "content": "Name three fruits, then count to five."}],
      add_generation_prompt=True, tokenize=True)
  tokens = np.asarray([ids])
  with torch.no_grad():  # float64: transformers' f32 result is itself ~1e-4 from it
    want = copy.deepcopy(theirs).double()(torch.tensor(tokens)).logits.numpy()
  got = np.asarray(ours(jnp.asarray(tokens))[0], np.float64)
  assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()


def test_smollm2_greedy_answer_matches(smollm2):
  from atod_jax import sampling as smp
  _, ours, theirs, tok, _ = smollm2
  ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                add_generation_prompt=True, tokenize=True)
  with torch.no_grad():
    want = theirs.generate(torch.tensor([ids]), attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                           max_new_tokens=24, do_sample=False, eos_token_id=2,
                           pad_token_id=2)[0, len(ids):].numpy().tolist()
  out = smp.generate(ours, np.asarray([ids]), jax.random.key(0), 24,
                     smp.SamplingParams(temperature=0), stop_tokens=[[2]])
  got = np.asarray(out.tokens[0]).tolist()[:len(want)]
  assert got == want, (tok.decode(got), tok.decode(want))
  assert "Paris" in tok.decode(got)
