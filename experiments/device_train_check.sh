#!/usr/bin/env bash
# The trainer on an accelerator: the step profile, then the quickstart end to end.
#   bash experiments/device_train_check.sh        (PYTHONPATH must reach atod_jax)
set -uo pipefail
python - <<'PY'
import importlib, jax
print(jax.__version__, jax.devices())
for m in ("flax", "optax", "orbax.checkpoint", "ml_collections", "tensorboardX", "tqdm",
          "absl", "matplotlib", "safetensors", "tokenizers", "chex", "jinja2"):
  try:
    importlib.import_module(m); print("ok", m)
  except Exception as e:
    print("MISSING", m, e)
PY
python experiments/bench_train_step.py --config configs/quickstart.py 2>&1 | grep -v "^[IW]1"
start=$(date +%s)
timeout 330 python -m atod_jax.main --config configs/quickstart.py --workdir "${OUT:-/tmp}/quick" 2>&1 \
  | tr '\r' '\n' | grep -v "step/s\|s/step\|^ *$\|^[IW]1" | tail -25
echo "quickstart wall time: $(( $(date +%s) - start )) s"
