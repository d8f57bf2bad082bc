"""The tokenizer wrapper against transformers on a locally built tokenizer directory."""
import pytest

transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer as HFTok, models, pre_tokenizers, trainers, decoders  # noqa: E402

from atod_jax.models.tokenizer import Tokenizer  # noqa: E402

# A ChatML template exercising what real ones use: loops, conditionals, loop controls,
# tojson on non-ASCII data, raise_exception, and an extra kwarg (enable_thinking).
TEMPLATE = """{%- if tools %}<|im_start|>system
Tools: {{ tools | tojson }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + message.role) }}{% endif %}
{%- if message.role == 'system' and not loop.first %}{% continue %}{% endif %}
<|im_start|>{{ message.role }}
{{ message.content | trim }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% endif %}{% endif %}"""

TEXT = ["You are in the middle of a room. Looking quickly around you, you see a cabinet 1, "
        "a countertop 1, a fridge 1 and a microwave 1.", "Your task is to: put a clean mug "
        "in the cabinet.", "<think>the mug is probably in the fridge</think><action>go to "
        "fridge 1</action>", "Café — naïve résumé 日本語"] * 20


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok")
  bpe = HFTok(models.BPE(unk_token=None))
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  bpe.train_from_iterator(TEXT, trainer)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
  fast.chat_template = TEMPLATE
  fast.save_pretrained(path)
  return path


MESSAGES = [
    [{"role": "system", "content": "You are an agent."},
     {"role": "user", "content": TEXT[0] + " " + TEXT[1]}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": TEXT[2]},
     {"role": "system", "content": "ignored (not first)"}, {"role": "user", "content": TEXT[3]}],
]


def test_chat_template_matches_transformers(tok_dir):
  ref = transformers.AutoTokenizer.from_pretrained(tok_dir)
  ours = Tokenizer.from_pretrained(tok_dir)
  tools = [{"name": "search", "description": "Suche im Café"}]
  for messages in MESSAGES:
    for kw in (dict(add_generation_prompt=True), dict(add_generation_prompt=False),
               dict(add_generation_prompt=True, enable_thinking=False),
               dict(add_generation_prompt=True, tools=tools)):
      want = ref.apply_chat_template(messages, tokenize=False, **kw)
      assert ours.apply_chat_template(messages, **kw) == want
      want_ids = ref(want, add_special_tokens=False)["input_ids"]
      assert ours.apply_chat_template(messages, tokenize=True, **kw) == want_ids


def test_encode_decode_and_special_tokens(tok_dir):
  ref = transformers.AutoTokenizer.from_pretrained(tok_dir)
  ours = Tokenizer.from_pretrained(tok_dir)
  for text in TEXT[:4]:
    ids = ours.encode(text)
    assert ids == ref(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == text
  assert ours.eos_token_id == ref.eos_token_id == ours.token_to_id("<|im_end|>")
  assert ours.pad_token_id == ref.pad_token_id
  assert ours.vocab_size == len(ref)


def test_stop_tokens_from_generation_config(tok_dir, tmp_path):
  import json
  import shutil
  assert Tokenizer.from_pretrained(tok_dir).stop_token_ids == [
      Tokenizer.from_pretrained(tok_dir).token_to_id("<|im_end|>")]
  path = tmp_path / "with_generation_config"
  shutil.copytree(tok_dir, path)
  ours = Tokenizer.from_pretrained(path)
  end, text = ours.token_to_id("<|im_end|>"), ours.token_to_id("<|endoftext|>")
  with open(path / "generation_config.json", "w") as f:  # as Qwen3's
    json.dump({"eos_token_id": [end, text], "pad_token_id": text}, f)
  assert Tokenizer.from_pretrained(path).stop_token_ids == [end, text]
  assert transformers.GenerationConfig.from_pretrained(path).eos_token_id == [end, text]


def test_errors(tok_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    Tokenizer.from_pretrained(tmp_path)
  ours = Tokenizer.from_pretrained(tok_dir)
  import jinja2
  with pytest.raises(jinja2.TemplateError, match="bad role tool"):
    ours.apply_chat_template([{"role": "tool", "content": "x"}])
