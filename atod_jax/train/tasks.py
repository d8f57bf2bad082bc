"""Where a run's episodes come from: the on-device household family or a real
environment driven from the host. Both give the trainer the same four things:

* ``train_batch(graphdef, params, step, sampling)``: ``tasks_per_step`` tasks x
  ``group_size`` episodes of the student, as a :class:`Trajectory` (plus metrics);
* ``expert_demos(seed, episodes, noise)``: expert episodes in the same layout;
* ``evaluate(graphdef, params, episodes=, temperature=, seed=)``: held-out metrics;
* ``max_turns``; and ``close()``.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from atod_jax.envs.household import HouseholdParams
from atod_jax.models.sharding import shard_batch, state_shardings
from atod_jax.models.tokenizer import Tokenizer
from atod_jax.rollout.device import HouseholdRollout
from atod_jax.rollout.host import (TextCodec, TextRollout, episode_text, host_rollout,
                                   train_text_tokenizer)
from atod_jax.rollout.trajectory import Trajectory, summarize
from atod_jax.sampling.generate import SamplingParams
from atod_jax.train import agents

# env.kind -> (module, EnvPool factory) of the real environments
TEXT_ENVS = {
    "alfworld": ("atod_jax.envs.textgames", "alfworld_env"),
    "webshop": ("atod_jax.envs.webshop", "webshop_env"),
    "searchqa": ("atod_jax.envs.searchqa", "searchqa_env"),
    "textworld": ("atod_jax.envs.textgames", "textworld_env"),
    "scienceworld": ("atod_jax.envs.scienceworld", "scienceworld_env"),
}


class HouseholdTasks:
  """The on-device household family: the whole rollout is one jitted call."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    self.spec = HouseholdRollout(HouseholdParams.preset(config.env.preset), config.env.obs_len)
    self.max_turns = self.spec.max_turns
    self.name = f"household-{config.env.preset}"

  def train_batch(self, graphdef, params, step: int, sampling: SamplingParams) -> Trajectory:
    r, seed = self.config.rollout, self.config.seed
    keys, groups = agents.task_keys(seed, agents.TASKS, step, r.tasks_per_step, r.group_size)
    keys, groups = shard_batch((keys, groups), self.mesh)
    roll = agents.rollout_fn(graphdef, self.spec, "train", sampling)
    return roll(params, keys, agents.draw(seed, agents.POLICY, step), groups)

  def expert_demos(self, seed: int, episodes: int, noise: float = 0.0) -> Trajectory:
    return agents.expert_demos(self.spec, seed, episodes, noise)

  def evaluate(self, graphdef, params, *, episodes: int, temperature: float, seed: int):
    return agents.evaluate(graphdef, params, self.spec, episodes=episodes,
                           temperature=temperature, seed=seed)

  def close(self):
    pass


def _factory(env_config):
  module, name = TEXT_ENVS[env_config.kind]
  fn = getattr(importlib.import_module(module), name)
  return functools.partial(fn, max_turns=env_config.max_turns, **env_config.options.to_dict())


class TextTasks:
  """A real environment in an :class:`~atod_jax.envs.pool.EnvPool`, played by
  :func:`~atod_jax.rollout.host.host_rollout`; the tokenizer is the model directory's
  or one trained on expert episodes and cached (``tokenizer_dir``)."""

  def __init__(self, config, tokenizer_dir: str, say=print, mesh=None):
    from atod_jax.envs.pool import EnvPool
    self.config, self.mesh = config, mesh
    e = config.env
    self.name = e.kind
    self.max_turns = e.max_turns
    self.spec = TextRollout(e.max_turns, e.prompt_len, e.response_len, e.obs_len,
                            layout=e.get("layout", "context"), history=e.get("history", 2))
    self.pool = EnvPool(_factory(e), num_workers=e.workers, step_timeout=e.step_timeout,
                        start_timeout=max(600.0, e.step_timeout))
    self.num_train = self.pool.num_tasks(e.train_split)
    self.num_eval = self.pool.num_tasks(e.eval_split)
    self.tokenizer = self._tokenizer(tokenizer_dir, say)
    self.codec = TextCodec(self.tokenizer, self.spec, e.kind)

  def _tokenizer(self, path: str, say) -> Tokenizer:
    e = self.config.env
    if e.tokenizer == "student":
      return Tokenizer.from_pretrained(os.path.expanduser(self.config.student.path))
    if e.tokenizer != "build":
      return Tokenizer.from_pretrained(os.path.expanduser(e.tokenizer))
    fingerprint = {"env": env_fingerprint(e)}
    stamp = os.path.join(path, "fingerprint.json")
    if os.path.exists(stamp):
      with open(stamp) as f:
        if json.load(f) == fingerprint:
          return Tokenizer.from_pretrained(path)
    from atod_jax.data.demos import collect_expert_episodes
    n = min(e.tokenizer_episodes, self.num_train)
    say(f"tokenizer: training a {e.vocab_size}-token BPE on {n} expert episodes of "
        f"{e.kind}/{e.train_split}")
    texts = [episode_text(self.spec, e.kind, ep) for ep in
             collect_expert_episodes(self.pool, e.train_split, range(n), batch_size=16)]
    tok = train_text_tokenizer(texts, e.vocab_size, path)
    with open(stamp, "w") as f:
      json.dump(fingerprint, f)
    return tok

  def _model(self, graphdef, params):
    """The model with its parameters on the mesh (a no-op where they already are), so
    they meet the mesh-sharded episodes; teachers and clones come from anywhere."""
    from flax import nnx
    if self.mesh is not None:
      params = jax.device_put(params, state_shardings(params, self.mesh))
    return nnx.merge(graphdef, params)

  def _ids(self, seed: int, purpose: int, step: int, count: int) -> list[int]:
    rng = np.random.default_rng([seed, purpose, step])
    return rng.choice(self.num_train, count, replace=count > self.num_train).tolist()

  def train_batch(self, graphdef, params, step: int, sampling: SamplingParams) -> Trajectory:
    r, seed = self.config.rollout, self.config.seed
    ids = np.repeat(self._ids(seed, agents.TASKS, step, r.tasks_per_step), r.group_size)
    groups = np.repeat(np.arange(r.tasks_per_step), r.group_size)
    traj, _ = host_rollout(self._model(graphdef, params), self.codec, self.pool,
                           self.config.env.train_split, ids.tolist(),
                           agents.draw(seed, agents.POLICY, step), sampling=sampling,
                           group_ids=groups, mesh=self.mesh)
    return traj

  def expert_demos(self, seed: int, episodes: int, noise: float = 0.0) -> Trajectory:
    """The expert on ``episodes`` training tasks, ``env.eval_batch`` at a time (a reset
    of hundreds of games at once would outlast ``env.step_timeout`` where making a game
    is slow, as TextWorld's first time)."""
    ids, size = self._ids(seed, agents.DEMOS, 0, episodes), self.config.env.eval_batch
    parts = [host_rollout(None, self.codec, self.pool, self.config.env.train_split,
                          ids[start:start + size], agents.draw(seed, agents.DEMOS, 1 + start),
                          sampling=None, expert_noise=noise)[0]
             for start in range(0, len(ids), size)]
    return jax.tree.map(lambda *x: jnp.concatenate(x), *parts)

  def evaluate(self, graphdef, params, *, episodes: int, temperature: float, seed: int):
    """The first ``episodes`` tasks of the evaluation split (all of them if fewer), in
    batches of ``env.eval_batch`` (the episodes of one host rollout); adds
    ``success/<type>`` where the env has task types."""
    model = self._model(graphdef, params)
    n = min(episodes, self.num_eval)
    batch = self.config.env.eval_batch
    sums: dict[str, float] = {}
    by_type: dict[str, list[bool]] = {}
    for start in range(0, n, batch):
      ids = list(range(start, min(n, start + batch)))
      traj, infos = host_rollout(model, self.codec, self.pool, self.config.env.eval_split, ids,
                                 agents.draw(seed, agents.EVAL_POLICY, start),
                                 sampling=SamplingParams(temperature=temperature),
                                 mesh=self.mesh)
      for k, v in jax.device_get(summarize(traj)).items():
        sums[k] = sums.get(k, 0.0) + float(v) * len(ids)
      for info, w in zip(infos, np.asarray(traj.won)):
        if "task_type" in info:
          by_type.setdefault(info["task_type"], []).append(bool(w))
    out = {k: v / n for k, v in sums.items()}
    out.update({f"success/{t}": float(np.mean(w)) for t, w in sorted(by_type.items())})
    return out

  def close(self):
    self.pool.close()


def env_fingerprint(env_config) -> dict:
  """The env settings that shape episodes (not how many workers run them), as JSON
  gives them back (tuples as lists), so a stored fingerprint compares equal."""
  return json.loads(json.dumps({k: v for k, v in env_config.to_dict().items()
                                if k not in ("workers", "step_timeout", "eval_batch")}))


def tokenizer_dir(config, workdir: str) -> str:
  """Where a built tokenizer lives: beside the built teacher it was made for."""
  t = config.teacher
  base = t.cache_dir or os.path.join(workdir, "teacher")
  key = hashlib.sha1(json.dumps(env_fingerprint(config.env), sort_keys=True).encode())
  key = key.hexdigest()[:8]
  return os.path.join(os.path.abspath(os.path.expanduser(base)), f"tokenizer-{key}")


def make_tasks(config, workdir: str, mesh, say=print):
  if config.env.kind == "household":
    return HouseholdTasks(config, mesh)
  return TextTasks(config, tokenizer_dir(config, workdir), say, mesh)
