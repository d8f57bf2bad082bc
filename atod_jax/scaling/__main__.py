"""``python -m atod_jax.scaling --config configs/alfworld_qwen3.py --target v5e:2x4 \\
    --student qwen3-0.6b --teacher qwen3-4b [--search]``

The ahead-of-time memory and cost plan of a run (:mod:`atod_jax.scaling.plan`) on a TPU
topology, compiled here with the real TPU compiler (``pip install "jax[tpu]"``; no TPU
needed). ``--student`` / ``--teacher``: a name of ``atod_jax.scaling.plan.MODELS``, an HF
directory or a GGUF file (default: the config's ``student.path`` / ``teacher.path``).
Without ``--search`` it plans the config's mesh and ``optim.microbatches``; with it, it
tries the meshes with every chip on the model axes and 1, 2 and 4 times the micro-batch
count until one fits. Exits 1 when nothing fits, 2 when no
plan can be made.
"""
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

if not os.environ.get("JAX_PLATFORMS"):  # the plan runs on this CPU; libtpu need not
  jax.config.update("jax_platforms", "cpu")  # look for a TPU here, even on a TPU host

_CONFIG = _TARGET = _STUDENT = _TEACHER = _SEARCH = None


def _define_flags():
  """The flags (defined when run as a command: importing this module defines none, so it
  sits beside atod_jax.main's --config)."""
  global _CONFIG, _TARGET, _STUDENT, _TEACHER, _SEARCH
  _CONFIG = config_flags.DEFINE_config_file("config", None, "a get_config() file")
  _TARGET = flags.DEFINE_multi_string("target", ["v5e:2x4"], "TPU topologies, e.g. v5e:2x4, "
                                      "v6e:2x4, v5p:2x2x1 (repeat the flag for several)")
  _STUDENT = flags.DEFINE_string("student", None, "model name, HF directory or GGUF file")
  _TEACHER = flags.DEFINE_string("teacher", None, "model name, HF directory or GGUF file")
  _SEARCH = flags.DEFINE_bool("search", False,
                              "try meshes and micro-batch counts until one fits")
  flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from atod_jax.scaling import plan as planner
  config = _CONFIG.value
  student = _STUDENT.value or config.student.get("path", "")
  teacher = _TEACHER.value or config.teacher.get("path", "")
  if not student or not teacher:
    print("error: name the models: --student / --teacher (a name of "
          f"{sorted(planner.MODELS)}, an HF directory or a GGUF file)", file=sys.stderr)
    sys.exit(2)
  say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
  plans, ok = [], True
  try:
    for target in _TARGET.value:
      if _SEARCH.value:
        found, tried = planner.search(config, target, student=student, teacher=teacher, say=say)
        best = found or min(tried, key=lambda p: p.peak, default=None)
        if best is None:
          print(f"{target}: no setting compiled", flush=True)
          ok = False
          continue
        ok &= found is not None
      else:
        best = planner.plan(config, target, student=student, teacher=teacher, say=say)
        ok &= best.fits
      plans.append(best)
      print(best.table() + "\n", flush=True)
  except planner.PlanError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if len(plans) > 1:
    print(planner.overview(plans))
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
