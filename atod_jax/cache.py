"""The persistent JAX compilation cache the entry points share (the command line, the
experiment scripts): repeat runs skip most compilation."""
from __future__ import annotations

import os

import jax


def use_compilation_cache() -> str:
  """Turns on the cache in ``$ATOD_JAX_CACHE`` (default ``~/.cache/atod_jax/jax_cache``)
  unless one is configured already; returns its directory."""
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(
        os.environ.get("ATOD_JAX_CACHE", "~/.cache/atod_jax/jax_cache")))
  return jax.config.jax_compilation_cache_dir
