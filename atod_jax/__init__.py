"""atod_jax: Annealed Turn-aware On-policy Distillation for multi-turn LM agents."""
__version__ = "0.1.0"


def _skip_absent_tpu() -> None:
  """With ``libtpu`` installed (the ``plan`` and ``test`` extras) JAX tries the TPU
  backend at start-up and, on a machine without one, prints libtpu's errors before it
  falls back to the CPU. Where no TPU chip and no NVIDIA GPU is visible and the user
  chose no platform (``JAX_PLATFORMS``), the CPU is chosen here instead: the same
  backend JAX would have ended on, without the noise. Anything else is left to JAX."""
  import importlib.util
  import os
  if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
    return
  import jax
  try:
    from jax._src import hardware_utils as hw  # JAX's own probe (PCI ids), not public
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized() or jax.config.jax_platforms:
      return
    if hw.num_available_tpu_chips_and_device_id()[0] or hw.has_visible_nvidia_gpu():
      return
  except (ImportError, AttributeError):  # another JAX: leave it to JAX
    return
  jax.config.update("jax_platforms", "cpu")


_skip_absent_tpu()
