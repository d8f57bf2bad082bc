"""Every random draw of a run, in one place.

A key is ``key(seed, stream, step)`` = ``fold_in(fold_in(PRNGKey(seed), stream), step)``:
the run's seed, what the draw is for (a :class:`Stream`) and the step (or batch) it
belongs to. Each use has its own stream, so no key ever feeds two draws, and any draw can
be recomputed from the three numbers alone: that is what makes a run killed and resumed
from its checkpoint continue exactly as an uninterrupted one.

The seeds: ``config.seed`` for the run's own draws (the student's initialisation and
warm start, training tasks and sampling, mini-batch shuffles), ``teacher.build.seed`` for
everything that builds a teacher (so one built teacher serves runs of every seed), and
``eval.seed`` for evaluation (every model and method meets the same episodes).
"""
from __future__ import annotations

import enum

import jax
import numpy as np


class Stream(enum.IntEnum):
  """What a draw is for. Values are part of a run's identity: append, never reorder."""

  # the run (seed = config.seed)
  STUDENT_INIT = 0  # the student's random parameters
  TASKS = 1  # step s: which training tasks
  POLICY = 2  # step s: the student's sampling during the rollout
  SHUFFLE = 3  # step s: the mini-batch permutation of the update
  SFT_DEMOS = 4  # the expert episodes of the sft method (tasks and expert noise)
  SFT_PICK = 5  # step s: which of them the sft method trains on
  WARM_DEMOS = 6  # the student warm start's expert episodes
  WARM_PICK = 7  # warm-start step i: its batch
  WARM_SHUFFLE = 8  # warm-start step i: its mini-batch permutation
  # building a teacher (seed = teacher.build.seed)
  TEACHER_INIT = 9
  TEACHER_DEMOS = 10
  TEACHER_PICK = 11
  TEACHER_SHUFFLE = 12
  TEACHER_RL_TASKS = 13  # the teacher's GRPO phase, step i: its tasks
  TEACHER_RL_POLICY = 14  # ... its sampling
  TEACHER_RL_SHUFFLE = 15  # ... its mini-batch permutation
  # evaluation (seed = eval.seed)
  EVAL_TASKS = 16  # the held-out tasks (step 0)
  EVAL_POLICY = 17  # batch b of the evaluation: the sampling


def key(seed: int, stream: Stream, step: int = 0) -> jax.Array:
  """The PRNG key of draw ``(seed, stream, step)``."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), int(stream)), step)


def numpy_rng(k: jax.Array) -> np.random.Generator:
  """A numpy generator seeded by a PRNG key (host-side draws, e.g. task ids of a real
  environment, from the same ``(seed, stream, step)`` scheme)."""
  return np.random.default_rng(np.asarray(jax.random.key_data(k)).ravel().tolist())
