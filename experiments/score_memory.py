"""What the teacher's scoring holds on a TPU chip, by depth and by scoring chunks: the
compiled ``steps.jit_score`` of a model of :data:`atod_jax.scaling.plan.MODELS` (its
layers cut to ``--layers``) on the paper's batch (64 episodes x 50 windowed turns of
2,048 + 512 tokens), all-fsdp over a TPU topology, compiled here with libtpu.

    JAX_PLATFORMS=cpu python experiments/score_memory.py --model qwen3-30b-a3b \
        --layers 2,4,8 --chunks 40,80 [--target v5e:2x4] [--remat] [--offload]

``--chunks`` are passed as they are (the trainer moves its count to one that splits
every device's sequences evenly, :func:`atod_jax.train.steps.aligned_chunks`; a count
that does not, e.g. 160 on 8 chips, shows the layout the trainer never makes). Prints
one table row a setting: arguments (in HBM; with ``--offload``, the weights in host
memory, as ``teacher.offload`` places them) and temporaries in GiB a chip, or the
compiler's out-of-memory.
"""
import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

GiB = 2**30


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="qwen3-30b-a3b")
  parser.add_argument("--layers", default="2,4,8", help="comma-separated depths")
  parser.add_argument("--chunks", default="40", help="comma-separated scoring chunks")
  parser.add_argument("--target", default="v5e:2x4")
  parser.add_argument("--remat", action="store_true", help="the model's remat (scan) path")
  parser.add_argument("--offload", action="store_true", help="the weights in host memory")
  args = parser.parse_args()

  import jax
  from atod_jax.models.config import ModelConfig
  from atod_jax.models.sharding import make_mesh
  from atod_jax.rollout.host import TextRollout
  from atod_jax.scaling import plan as pl
  from atod_jax.train import steps

  _, devices = pl.topology(args.target)
  mesh = make_mesh(1, len(devices), 1, devices=devices)
  spec = TextRollout(50, 2048, 512, 0, layout="window", history=2)
  print(f"| model | layers | remat | offload | sequences a chunk | chunks | arguments GiB "
        f"| host arguments GiB | temps GiB | compile s |\n|---|---:|---|---|---:|---:|---:|---:"
        f"|---:|---:|", flush=True)
  for layers in (int(x) for x in args.layers.split(",")):
    cfg = ModelConfig.from_hf(dict(pl.MODELS[args.model], num_hidden_layers=layers),
                              dtype="bfloat16", param_dtype="bfloat16", remat=args.remat)
    for chunks in (int(x) for x in args.chunks.split(",")):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        graphdef, params = pl._params(cfg, mesh, "pinned_host" if args.offload else None)
        batch = pl._batched(pl._trajectory(64, spec), mesh)
        start = time.time()
        compiled = pl._compile(steps.jit_score, graphdef, params, batch, temperature=1.0,
                               chunks=chunks, rows=steps.rows_sharding(mesh))
        took = time.time() - start
      if isinstance(compiled, pl._OutOfMemory):
        args_gib = host = "-"
        temps = f"out of memory ({compiled.temp / GiB:.2f} asked)"
      else:
        mem = compiled.memory_analysis()
        args_gib = f"{mem.argument_size_in_bytes / GiB:.2f}"
        host = f"{mem.host_argument_size_in_bytes / GiB:.2f}"
        temps = f"{mem.temp_size_in_bytes / GiB:.2f}"
      print(f"| {args.model} | {layers} | {args.remat} | {args.offload} | {64 * 50 // chunks} "
            f"| {chunks} | {args_gib} | {host} | {temps} | {took:.0f} |", flush=True)


if __name__ == "__main__":
  main()
