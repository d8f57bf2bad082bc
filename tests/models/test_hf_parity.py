"""Parity with transformers (PyTorch, CPU) on tiny random checkpoints of every family."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from atod_jax.models import ModelConfig  # noqa: E402
from atod_jax.models.hf import load_pretrained, save_pretrained  # noqa: E402
from tests.models.hf_fixtures import CASES, make_checkpoint  # noqa: E402


def _tokens(seed=0, batch=3, length=40, vocab=160):
  return np.random.default_rng(seed).integers(0, vocab, (batch, length))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
  ref = make_checkpoint(case, tmp_path / "hf")
  model = load_pretrained(tmp_path / "hf", dtype="float32")
  tokens = _tokens()
  # positions past original_max_position_embeddings exercise the llama3 rope scaling
  with torch.no_grad():
    want = ref(torch.tensor(tokens)).logits.numpy()
  got, _ = model(jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_roundtrip_loads_in_transformers(case, tmp_path):
  make_checkpoint(case, tmp_path / "hf")
  model = load_pretrained(tmp_path / "hf", dtype="float32")
  save_pretrained(model, tmp_path / "out", max_shard_bytes=200_000)  # forces shards
  assert (tmp_path / "out" / "model.safetensors.index.json").exists()
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
  tokens = _tokens(1)
  with torch.no_grad():
    want = back(torch.tensor(tokens)).logits.numpy()
  got, _ = model(jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)
  # and our own loader reads the sharded export back to the same parameters
  again = load_pretrained(tmp_path / "out", dtype="float32")
  np.testing.assert_allclose(np.asarray(again(jnp.asarray(tokens))[0]), np.asarray(got), atol=1e-6)


def test_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_pretrained(tmp_path)
  make_checkpoint("qwen3_untied_gqa", tmp_path / "hf")
  cfg = ModelConfig.from_pretrained(tmp_path / "hf")
  with pytest.raises(ValueError, match=r"tensor .model\.layers\.0\.self_attn\.[qkvo]_proj\.weight. has shape"):
    load_pretrained(tmp_path / "hf", head_dim=cfg.head_dim * 2)  # shape mismatch is named
  with pytest.raises(ValueError, match="unsupported architecture"):
    ModelConfig.from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
  (tmp_path / "hf" / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="safetensors"):
    load_pretrained(tmp_path / "hf")


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generation_matches_transformers(case, tmp_path):
  import jax

  from atod_jax import sampling as smp

  ref = make_checkpoint(case, tmp_path / "hf")
  model = load_pretrained(tmp_path / "hf", dtype="float32")
  prompt = _tokens(2, batch=2, length=9)
  with torch.no_grad():
    want = ref.generate(torch.tensor(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                        max_new_tokens=32, min_new_tokens=32, do_sample=False,
                        pad_token_id=0, eos_token_id=None)[:, 9:].numpy()
  out = smp.generate(model, prompt, jax.random.key(0), 32, smp.SamplingParams(temperature=0))
  np.testing.assert_array_equal(np.asarray(out.tokens), want)
