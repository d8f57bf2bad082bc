"""Scaling tools: what a run needs before it runs, and what its step costs.

* :mod:`atod_jax.scaling.plan`: the ahead-of-time memory and cost plan of a run on a TPU
  topology, compiled by the real TPU compiler (``libtpu``) on any machine;
  ``python -m atod_jax.scaling --config ... --target v5e:2x4 --student ... --teacher ...``.
* :mod:`atod_jax.scaling.measure`: the same jitted functions run for real on the
  devices present, each call's time beside the plan's bound.

Both build the trainer's own calls through public names (``steps.jit_atod_update``,
``steps.jit_score``, ``sampling.generate.jit_append`` / ``jit_decode``,
``loop.train_state_shardings``), so what they plan is what the trainer runs.
"""
