"""Tokenizer from a local HF directory (``tokenizers``), with the model's chat template.

The chat template is rendered the way ``transformers`` renders it: a sandboxed Jinja2
environment with ``trim_blocks`` / ``lstrip_blocks`` and the loop-controls extension, a
``tojson`` filter that keeps non-ASCII text, and the ``raise_exception`` and
``strftime_now`` globals; the special tokens of ``tokenizer_config.json`` are template
variables, and extra keyword arguments (``enable_thinking=False`` for Qwen3, tools, ...)
are passed through.
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Any, Sequence

import jinja2
import jinja2.ext  # loopcontrols: not loaded by "import jinja2"
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer


def _raise(message: str):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _token_text(value) -> str | None:
  if isinstance(value, dict):  # {"content": "<|im_end|>", ...} in older configs
    return value.get("content")
  return value


class Tokenizer:
  """Encode / decode text and render chat prompts for a model directory."""

  def __init__(self, tokenizer: _HFTokenizer, config: dict[str, Any] | None = None,
               chat_template: str | None = None,
               generation_config: dict[str, Any] | None = None):
    self._tok = tokenizer
    self.config = dict(config or {})
    self.generation_config = dict(generation_config or {})
    self.chat_template = chat_template or self.config.get("chat_template")
    if isinstance(self.chat_template, list):  # named templates: use "default"
      named = {t["name"]: t["template"] for t in self.chat_template}
      self.chat_template = named.get("default", next(iter(named.values())))
    self._compiled = None

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
    path = os.fspath(path)
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
      raise FileNotFoundError(f"no tokenizer.json in {path!r}")
    config = {}
    cfg_file = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(cfg_file):
      with open(cfg_file) as f:
        config = json.load(f)
    template = None
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
      with open(jinja_file) as f:
        template = f.read()
    generation = {}
    gen_file = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_file):
      with open(gen_file) as f:
        generation = json.load(f)
    return cls(_HFTokenizer.from_file(file), config, template, generation)

  @classmethod
  def from_gguf(cls, path: str | os.PathLike) -> "Tokenizer":
    """The tokenizer of a GGUF file: its byte-level BPE vocabulary and merges, its
    control and user-defined tokens, its special tokens and its chat template (rendered
    in the same sandbox: a file's template is untrusted input). Needs the ``gguf``
    package (``pip install "atod_jax[pretrained]"``)."""
    from atod_jax.models.gguf import tokenizer_parts
    tok, config, generation, template = tokenizer_parts(path)
    return cls(tok, config, template, generation)

  def save_pretrained(self, path: str | os.PathLike) -> None:
    """Writes ``tokenizer.json``, ``tokenizer_config.json`` (with the chat template) and
    ``generation_config.json`` (the stop tokens) to ``path``: what
    :meth:`from_pretrained` and ``transformers.AutoTokenizer`` read."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    self._tok.save(os.path.join(path, "tokenizer.json"))
    config = dict(self.config)
    if self.chat_template:
      config["chat_template"] = self.chat_template
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
      json.dump(config, f, indent=1, ensure_ascii=False)
    if self.generation_config:
      with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(self.generation_config, f, indent=1)

  # ------------------------------------------------------------------ tokens
  def _special(self, name: str) -> str | None:
    return _token_text(self.config.get(name))

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  @property
  def eos_token_id(self) -> int | None:
    eos = self._special("eos_token")
    return None if eos is None else self._tok.token_to_id(eos)

  @property
  def stop_token_ids(self) -> list[int]:
    """The tokens that end a generated answer: eos, then those of the directory's
    ``generation_config.json`` (Qwen3 lists ``<|im_end|>`` and ``<|endoftext|>``)."""
    out = [] if self.eos_token_id is None else [self.eos_token_id]
    extra = self.generation_config.get("eos_token_id")
    for i in extra if isinstance(extra, list) else [] if extra is None else [extra]:
      if int(i) not in out:
        out.append(int(i))
    return out

  @property
  def pad_token_id(self) -> int | None:
    pad = self._special("pad_token")
    return None if pad is None else self._tok.token_to_id(pad)

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self._tok.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

  # ------------------------------------------------------------------ chat
  def apply_chat_template(
      self,
      messages: Sequence[dict[str, Any]],
      *,
      add_generation_prompt: bool = False,
      tokenize: bool = False,
      tools: Sequence[dict[str, Any]] | None = None,
      **kwargs,
  ) -> str | list[int]:
    """Renders ``messages`` (``[{"role": ..., "content": ...}, ...]``) with the chat
    template; returns the text, or token ids with ``tokenize=True``."""
    if not self.chat_template:
      raise ValueError("this tokenizer has no chat_template (tokenizer_config.json or "
                       "chat_template.jinja)")
    if self._compiled is None:
      env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                          extensions=[jinja2.ext.loopcontrols])
      env.filters["tojson"] = _tojson
      env.globals["raise_exception"] = _raise
      env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
      self._compiled = env.from_string(self.chat_template)
    specials = {name: self._special(name) for name in
                ("bos_token", "eos_token", "unk_token", "pad_token")}
    text = self._compiled.render(messages=list(messages), tools=tools,
                                 add_generation_prompt=add_generation_prompt,
                                 **{**specials, **kwargs})
    return self.encode(text) if tokenize else text


def train_text_tokenizer(texts: Sequence[str], vocab_size: int, path: str) -> Tokenizer:
  """A byte-level BPE tokenizer (``tokenizers``) trained on ``texts`` and saved to
  ``path`` (``tokenizer.json`` and ``tokenizer_config.json`` with ``<eos>`` and
  ``<pad>``), for CPU-sized models on the real environments."""
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = _HFTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(list(texts), trainer)
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": "<eos>", "pad_token": "<pad>"}, f)
  return Tokenizer.from_pretrained(path)
