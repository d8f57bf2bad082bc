#!/usr/bin/env bash
# Numerical checks and benchmarks on an accelerator machine (GPU/TPU), without installing:
#   bash experiments/accelerator_check.sh [OUTDIR]
# Writes the test log and the benchmark tables to OUTDIR (default: runs/accelerator).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/accelerator}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee "$out/env.txt"
# the 8-host-device sharding tests need CPU devices; everything else runs on the accelerator
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_objectives.py tests/models/test_sampling.py \
  tests/models/test_hf_parity.py tests/models/test_decoder.py -k "not sharded" 2>&1 | tail -25 | tee "$out/tests.txt"
timeout 120 python3 experiments/bench_objectives.py 2>&1 | tee "$out/bench_objectives.txt"
timeout 200 python3 experiments/bench_models.py --dtype bfloat16 2>&1 | tee "$out/bench_models_bf16.txt"
