"""A GGUF file as an HF directory, and the command line that writes one:

    python -m atod_jax.models.convert SmolLM2-135M-Instruct.Q4_1.gguf smollm2-hf/
"""
from __future__ import annotations

import os

from atod_jax.models.gguf import config_from_gguf, load_gguf
from atod_jax.models.hf import save_pretrained
from atod_jax.models.tokenizer import Tokenizer


def convert_gguf(path: str | os.PathLike, out_dir: str | os.PathLike, *,
                 dtype: str | None = None) -> str:
  """Writes the GGUF file as an HF directory (safetensors, ``config.json``,
  ``tokenizer.json``, ``tokenizer_config.json`` with the chat template,
  ``generation_config.json``) that :func:`atod_jax.models.hf.load_pretrained`, the trainer's ``hf`` model
  source and ``transformers`` read. ``dtype``: of the written weights (default
  float32). Returns ``out_dir``."""
  model = load_gguf(path, dtype="float32")
  save_pretrained(model, out_dir, dtype=dtype)
  Tokenizer.from_gguf(path).save_pretrained(out_dir)
  return os.fspath(out_dir)


def _main(argv=None):
  import argparse
  parser = argparse.ArgumentParser(
      prog="python -m atod_jax.models.convert",
      description="Write a GGUF file as an HF directory (safetensors, config, tokenizer).")
  parser.add_argument("gguf_file")
  parser.add_argument("out_dir")
  parser.add_argument("--dtype", default=None, help="dtype of the written weights "
                      "(default float32)")
  args = parser.parse_args(argv)
  cfg = config_from_gguf(args.gguf_file)
  print(f"{args.gguf_file}: {cfg.model_type}, {cfg.num_layers} layers, hidden "
        f"{cfg.hidden_size}, {cfg.num_params() / 1e6:.1f}M parameters")
  convert_gguf(args.gguf_file, args.out_dir, dtype=args.dtype)
  print(f"wrote {args.out_dir}")


if __name__ == "__main__":
  _main()
