"""The paper-scale runs planned ahead of time on TPU topologies (no TPU needed: libtpu
compiles here; ``pip install "jax[tpu]"``).

    JAX_PLATFORMS=cpu python experiments/plan_memory.py [--targets v5e:2x4,v6e:2x4,v5p:2x2x1] \
        [--pairs qwen3-4b/qwen3-4b] [--microbatches 8,16,32] [--optimizer adafactor] [--fsdp-only] \
        [--offload-teacher]

For each student (Qwen3-0.6B, 1.7B, 4B) with the Qwen3-4B teacher, and the 4B student
with Qwen3-30B-A3B, on each target: the first mesh / micro-batch setting that fits
(atod_jax.scaling.plan.search), with per-chip bytes, FLOPs and a lower bound on the step
time; one table at the end (docs/scaling.md holds it). The config is
configs/alfworld_qwen3.py: the paper's batch, 8 tasks x 8 episodes of 50 turns, each a
2,048-token prompt and a 512-token answer.
"""
import argparse
import importlib.util
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = [("qwen3-0.6b", "qwen3-4b"), ("qwen3-1.7b", "qwen3-4b"), ("qwen3-4b", "qwen3-4b"),
         ("qwen3-4b", "qwen3-30b-a3b")]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--targets", default="v5e:2x4,v6e:2x4,v5p:2x2x1")
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "alfworld_qwen3.py"))
  parser.add_argument("--pairs", default="", help="student/teacher,... (default: the paper's)")
  parser.add_argument("--microbatches", default="",
                      help="micro-batch counts to try, e.g. 8,16,32 (default: the config's, x2, x4)")
  parser.add_argument("--optimizer", default="", help="adamw or adafactor (default: the config's)")
  parser.add_argument("--fsdp-only", action="store_true", help="only the all-fsdp mesh")
  parser.add_argument("--offload-teacher", action="store_true",
                      help="the teacher's weights in host memory (teacher.offload=True)")
  parser.add_argument("--out", default="", help="also write the tables (markdown) here")
  args = parser.parse_args()
  spec = importlib.util.spec_from_file_location("config", args.config)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()
  config.teacher.offload = args.offload_teacher
  from atod_jax.scaling import plan as planner
  pairs = [tuple(p.split("/")) for p in args.pairs.split(",")] if args.pairs else PAIRS
  say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
  plans, details = [], []
  for student, teacher in pairs:
    for target in args.targets.split(","):
      t0 = time.perf_counter()
      found, tried = planner.search(
          config, target, student=student, teacher=teacher, say=say,
          microbatches=[int(m) for m in args.microbatches.split(",")] if args.microbatches else None,
          optimizer=args.optimizer or None, with_tensor=not args.fsdp_only)
      best = found or min(tried, key=lambda p: p.peak, default=None)
      say(f"{student} / {teacher} on {target}: {'fits' if found else 'nothing fits'} "
          f"({time.perf_counter() - t0:.0f} s, {len(tried)} settings compiled)")
      if best is not None:
        plans.append(best)
        details.append(best.table())
        print(best.table() + "\n", flush=True)
  summary = planner.overview(plans)
  print(summary)
  if args.out:
    with open(args.out, "w") as f:
      f.write(summary + "\n\n" + "\n\n".join(details) + "\n")


if __name__ == "__main__":
  main()
