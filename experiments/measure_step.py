"""A text environment's training step measured on this machine's devices, function by
function, beside the plan's lower bound (atod_jax.scaling.measure): decode tokens/s,
teacher scoring and update time of, e.g., the paper's 0.6B-shaped run on a GPU.

    python experiments/measure_step.py --config configs/alfworld_qwen3.py \\
        --student qwen3-0.6b --teacher qwen3-4b          # a GPU or TPU: random weights
    python experiments/measure_step.py --config configs/textworld_tiny.py   # the CPU

``--student`` / ``--teacher``: a name of ``atod_jax.scaling.plan.MODELS``, an HF directory
or a GGUF file; by default the config's ``path``, else its ``model`` fields (the tiny
configs' models). ``--config.x=y`` overrides the config as in ``atod_jax.main``.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/textworld_tiny.py",
                                          "a text environment's config")
_STUDENT = flags.DEFINE_string("student", None, "model name, HF directory or GGUF file")
_TEACHER = flags.DEFINE_string("teacher", None, "model name, HF directory or GGUF file")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed calls of each function after the first")
_MICRO = flags.DEFINE_integer("microbatches", None, "optim.microbatches (default: the config's)")
_FSDP_ONLY = flags.DEFINE_bool("fsdp_only", False, "every device on the fsdp axis")


def _model(name, part):
  from atod_jax.models import ModelConfig
  if name:
    return name
  if part.get("path"):
    return part.path
  return ModelConfig(**part.model.to_dict())


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax

  from atod_jax.cache import use_compilation_cache
  from atod_jax.scaling import measure as ms
  from atod_jax.scaling import plan as pl
  use_compilation_cache()
  config = _CONFIG.value  # not validated: no model or data path is needed
  mesh = dict(data=1, fsdp=len(jax.devices()), tensor=1) if _FSDP_ONLY.value else {}
  try:
    result = ms.measure(config, student=_model(_STUDENT.value, config.student),
                        teacher=_model(_TEACHER.value, config.teacher),
                        microbatches=_MICRO.value, repeats=_REPEATS.value,
                        say=lambda m: print(m, file=sys.stderr, flush=True), **mesh)
  except pl.PlanError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(result.table())


if __name__ == "__main__":
  app.run(main)
