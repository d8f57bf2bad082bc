"""Expert demonstrations as a TFDS dataset in array_record format (no TensorFlow needed).

Any environment whose batches carry ``expert`` commands feeds it:

    episodes = collect_expert_episodes(env, "train", range(1000))
    build_demonstrations(episodes, data_dir="runs/demos", env_name="household-medium")
    demos = load_demonstrations("runs/demos", "household-medium", split="train")
    episode = decode_episode(demos[0])  # random access (array_record data source)

One record per episode: the task text, every observation (the first one and the answer
to each action), the expert's actions, per-step rewards, whether it was won.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from atod_jax.envs.base import BatchedEnv

VERSION = "1.0.0"


def collect_expert_episodes(env: BatchedEnv, split: str, task_ids: Iterable[int], *,
                            batch_size: int = 32) -> Iterator[dict[str, Any]]:
  """Runs the environment's expert on ``task_ids``; yields one dict per episode."""
  ids = list(task_ids)
  for start in range(0, len(ids), batch_size):
    chunk = ids[start:start + batch_size]
    batch = env.reset(split, chunk)
    if batch.expert is None:
      raise ValueError(f"{type(env).__name__} has no expert")
    n = len(chunk)
    obs = [[o] for o in batch.observations]
    acts: list[list[str]] = [[] for _ in range(n)]
    rews: list[list[float]] = [[] for _ in range(n)]
    tasks = list(batch.tasks)
    done = np.zeros(n, bool)
    for _ in range(env.max_turns):
      actions = [None if d else (e or "") for e, d in zip(batch.expert, done)]
      batch = env.step(actions)
      for i in range(n):
        if not done[i]:
          acts[i].append(actions[i])
          obs[i].append(batch.observations[i])
          rews[i].append(float(batch.rewards[i]))
      done = done | batch.dones
      if done.all():
        break
    aborted = batch.aborted if batch.aborted is not None else np.zeros(n, bool)
    for i in range(n):
      if aborted[i]:
        continue  # an environment failure is not a demonstration
      yield {"task_id": int(chunk[i]), "split": split, "task": tasks[i], "observations": obs[i],
             "actions": acts[i], "rewards": np.asarray(rews[i], np.float32),
             "won": bool(batch.wons[i])}


class Demonstrations(tfds.core.GeneratorBasedBuilder):
  """Expert episodes of one environment (the builder's ``config.name``)."""

  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = []  # made per environment at run time, see build_demonstrations

  def __init__(self, *, episodes: dict[str, Sequence[dict]] | None = None, **kwargs):
    self._episodes = episodes
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Expert demonstrations for atod_jax (one record per episode).",
        features=tfds.features.FeaturesDict({
            "task_id": np.int64,
            "split": tfds.features.Text(),
            "task": tfds.features.Text(),
            "observations": tfds.features.Sequence(tfds.features.Text()),
            "actions": tfds.features.Sequence(tfds.features.Text()),
            "rewards": tfds.features.Sequence(np.float32),
            "won": np.bool_,
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if self._episodes is None:
      raise ValueError("build with build_demonstrations(...): the builder needs episodes")
    return {split: self._generate_examples(eps) for split, eps in self._episodes.items()}

  def _generate_examples(self, episodes):
    for i, ep in enumerate(episodes):
      yield i, ep


def _builder(data_dir: str, env_name: str, episodes=None) -> Demonstrations:
  config = tfds.core.BuilderConfig(name=env_name, version=VERSION)
  return Demonstrations(episodes=episodes, config=config, data_dir=os.fspath(data_dir),
                        file_format="array_record")


def build_demonstrations(episodes: Iterable[dict] | dict[str, Iterable[dict]], data_dir: str,
                         env_name: str) -> str:
  """Writes the episodes (one split "train", or ``{split: episodes}``) and returns the
  dataset directory. Episodes are grouped by their own ``split`` field when one
  iterable is given."""
  if not isinstance(episodes, dict):
    grouped: dict[str, list[dict]] = {}
    for ep in episodes:
      grouped.setdefault(ep["split"], []).append(ep)
    episodes = grouped
  episodes = {k: list(v) for k, v in episodes.items()}
  builder = _builder(data_dir, env_name, episodes)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(max_examples_per_split=None))
  return builder.data_dir


def load_demonstrations(data_dir: str, env_name: str, split: str = "train"):
  """A random-access data source over the episodes of ``split`` (no TensorFlow)."""
  return _builder(data_dir, env_name).as_data_source(split=split)


def decode_episode(record: dict[str, Any]) -> dict[str, Any]:
  """A record from :func:`load_demonstrations` with its text fields as ``str``."""
  def text(x):
    return x.decode("utf-8") if isinstance(x, bytes) else x
  out = dict(record)
  for key in ("split", "task"):
    out[key] = text(out[key])
  for key in ("observations", "actions"):
    out[key] = [text(x) for x in out[key]]
  out["rewards"] = np.asarray(out["rewards"], np.float32)
  out["task_id"], out["won"] = int(out["task_id"]), bool(out["won"])
  return out
