"""Test set-up: 8 host devices for the sharding tests (before jax is imported)."""
import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (must follow the XLA_FLAGS set-up)

import atod_jax  # noqa: E402,F401  (chooses the CPU where libtpu is installed but no TPU)

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("ATOD_JAX_TEST_CACHE", os.path.expanduser("~/.cache/atod_jax/jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# Parity tests compare f32 math with numpy / PyTorch at 1e-4..1e-6: on GPUs the default
# f32 matmul precision is TF32, which is a speed setting, not what is being tested.
jax.config.update("jax_default_matmul_precision", "highest")
