"""Episodes of a Python environment (ALFWorld, WebShop, Search-QA, TextWorld,
ScienceWorld) in an :class:`~atod_jax.envs.pool.EnvPool` of worker processes, played by
:func:`~atod_jax.rollout.host.host_rollout`. The tokenizer is the student's, a model
directory's, or one trained on expert episodes and cached beside the built teacher."""
from __future__ import annotations

import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from atod_jax.envs import registry
from atod_jax.models.sharding import all_processes, host_values, place, state_shardings
from atod_jax.models.tokenizer import Tokenizer, train_text_tokenizer
from atod_jax.rollout.host import TextCodec, TextRollout, episode_text, host_rollout
from atod_jax.rollout.trajectory import Trajectory, summarize
from atod_jax.sampling.generate import SamplingParams
from atod_jax.train import steps
from atod_jax.train.streams import Stream, key as stream_key, numpy_rng


def env_fingerprint(env_config) -> dict:
  """The env settings that shape episodes (not how many workers run them), as JSON
  gives them back (tuples as lists), so a stored fingerprint compares equal."""
  return json.loads(json.dumps({k: v for k, v in env_config.to_dict().items()
                                if k not in ("workers", "step_timeout", "eval_batch")}))


def tokenizer_dir(config, workdir: str) -> str:
  """Where a built tokenizer lives: beside the built teacher it was made for."""
  base = config.teacher.get("cache_dir") or os.path.join(workdir, "teacher")
  key = hashlib.sha1(json.dumps(env_fingerprint(config.env), sort_keys=True).encode())
  return os.path.join(os.path.abspath(os.path.expanduser(base)), f"tokenizer-{key.hexdigest()[:8]}")


def _factory(env_config):
  fn = registry.resolve(registry.get(env_config.kind).factory)
  return functools.partial(fn, max_turns=env_config.max_turns, **env_config.options.to_dict())


class TextSource:
  """A :class:`~atod_jax.train.sources.TaskSource` over a real environment (``env.kind``)."""

  def __init__(self, config, workdir: str, mesh=None, say=print):
    from atod_jax.envs.pool import EnvPool
    self.config, self.mesh = config, mesh
    e = config.env
    self.name, self.max_turns = e.kind, e.max_turns
    self.penalty = float(e.invalid_penalty)
    self.spec = TextRollout(e.max_turns, e.prompt_len, e.response_len, e.obs_len,
                            layout=e.layout, history=e.history)
    self.pool = EnvPool(_factory(e), num_workers=e.workers, step_timeout=e.step_timeout,
                        start_timeout=max(600.0, e.step_timeout))
    self.num_train = self.pool.num_tasks(e.train_split)
    self.num_eval = self.pool.num_tasks(e.eval_split)
    self.tokenizer = self._tokenizer(tokenizer_dir(config, workdir), say)
    self.codec = TextCodec(self.tokenizer, self.spec, e.kind)

  def _tokenizer(self, path: str, say) -> Tokenizer:
    e = self.config.env
    if e.tokenizer == "student":
      student = os.path.expanduser(self.config.student.path)
      if self.config.student.init == "gguf":
        return Tokenizer.from_gguf(student)
      return Tokenizer.from_pretrained(student)
    if e.tokenizer != "build":
      return Tokenizer.from_pretrained(os.path.expanduser(e.tokenizer))
    from atod_jax.train import distributed
    fingerprint = {"env": env_fingerprint(e)}
    stamp = os.path.join(path, "fingerprint.json")
    built = False
    if os.path.exists(stamp):
      with open(stamp) as f:
        built = json.load(f) == fingerprint
    # every process has looked before process 0 can write: training the tokenizer takes no
    # collective, so a process that came later would otherwise find the new stamp, skip
    # the barrier below and leave process 0 waiting at it
    distributed.sync("tokenizer looked for")
    if built:
      return Tokenizer.from_pretrained(path)
    if distributed.is_main():  # one process trains and writes it; the others read it
      from atod_jax.data.demos import collect_expert_episodes
      n = min(e.tokenizer_episodes, self.num_train)
      say(f"tokenizer: training a {e.vocab_size}-token BPE on {n} expert episodes of "
          f"{e.kind}/{e.train_split}")
      texts = [episode_text(self.spec, e.kind, ep) for ep in
               collect_expert_episodes(self.pool, e.train_split, range(n), batch_size=16)]
      tok = train_text_tokenizer(texts, e.vocab_size, path)
      with open(stamp, "w") as f:
        json.dump(fingerprint, f)
    distributed.sync("tokenizer trained")
    return tok if distributed.is_main() else Tokenizer.from_pretrained(path)

  def _placed(self, params):
    """``params`` on the mesh (a no-op where they already are), so they meet the
    mesh-sharded episodes; teachers and clones come from anywhere."""
    return params if self.mesh is None else place(params, state_shardings(params, self.mesh))

  def _model(self, graphdef, params):
    """The model with its parameters on the mesh (:meth:`_placed`)."""
    from flax import nnx
    return nnx.merge(graphdef, self._placed(params))

  def _ids(self, key, count: int) -> list[int]:
    return numpy_rng(key).choice(self.num_train, count, replace=count > self.num_train).tolist()

  def train_batch(self, graphdef, params, task_key, policy_key, sampling: SamplingParams,
                  tasks: int, group_size: int) -> Trajectory:
    ids = np.repeat(self._ids(task_key, tasks), group_size)
    groups = np.repeat(np.arange(tasks), group_size)
    traj, _ = host_rollout(self._model(graphdef, params), self.codec, self.pool,
                           self.config.env.train_split, ids.tolist(), policy_key,
                           sampling=sampling, group_ids=groups, mesh=self.mesh,
                           invalid_penalty=self.penalty)
    return traj

  def expert_demos(self, key, episodes: int, noise: float = 0.0) -> Trajectory:
    """The expert on ``episodes`` training tasks, ``env.eval_batch`` at a time (a reset
    of hundreds of games at once would outlast ``env.step_timeout`` where making a game
    is slow, as TextWorld's first time). In a multi-process run each process plays its
    rows and every process gets all the episodes."""
    k_tasks, k_expert = jax.random.split(key)
    ids, size = self._ids(k_tasks, episodes), self.config.env.eval_batch
    mesh = self.mesh if jax.process_count() > 1 else None  # each process its own rows
    parts = [host_rollout(None, self.codec, self.pool, self.config.env.train_split,
                          ids[start:start + size], jax.random.fold_in(k_expert, start),
                          sampling=None, expert_noise=noise, invalid_penalty=self.penalty,
                          mesh=mesh, pad_to=self._shards())[0]
             for start in range(0, len(ids), size)]
    demos = jax.tree.map(lambda *x: jnp.concatenate(x), *parts)
    if mesh is not None:  # every process's rows, whole in every process (as on one)
      demos = jax.tree.map(jnp.asarray, host_values(demos))
    return demos

  def _shards(self) -> int:
    """A multi-process batch is padded to a multiple of the devices its rows split over."""
    if jax.process_count() == 1 or self.mesh is None:
      return 1
    return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

  def evaluate(self, graphdef, params, *, episodes: int, temperature: float, seed: int,
               split: str | None = None, teacher: tuple | None = None):
    """The first ``episodes`` tasks of ``split`` (default ``env.eval_split``; all of them
    if fewer), in batches of ``env.eval_batch`` (the episodes of one host rollout); adds
    ``success/<type>`` where the env has task types and ``format_error_rate``, the share
    of turns whose answer held no command (``invalid_rate`` also counts commands the
    environment does not admit); with ``teacher`` (``(graphdef, params)``), the exact KL
    between the two models on these episodes (:func:`~atod_jax.train.steps.kl_metrics`)."""
    model = self._model(graphdef, params)
    if teacher is not None:  # both on the mesh, where the episodes are
      teacher = (teacher[0], self._placed(teacher[1]))
      params = self._placed(params)
    split = split or self.config.env.eval_split
    n = min(episodes, self.num_eval if split == self.config.env.eval_split
            else self.pool.num_tasks(split))
    batch = self.config.env.eval_batch
    sums: dict[str, float] = {}
    by_type: dict[str, list[bool]] = {}
    format_errors = turns = 0
    kl = None
    for start in range(0, n, batch):
      ids = list(range(start, min(n, start + batch)))
      traj, infos = host_rollout(model, self.codec, self.pool, split, ids,
                                 stream_key(seed, Stream.EVAL_POLICY, start),
                                 sampling=SamplingParams(temperature=temperature),
                                 mesh=self.mesh, invalid_penalty=self.penalty,
                                 pad_to=self._shards())
      for k, v in jax.device_get(summarize(traj)).items():
        sums[k] = sums.get(k, 0.0) + float(v) * len(ids)
      if teacher is not None:
        kl = steps.add_sums(kl, steps.jit_turn_kl_sums(graphdef, params, *teacher, traj,
                                                       self.max_turns))
      # every process's episodes (each played its own rows)
      rows = all_processes([[i.get("task_type"), i["won"], i["turns"], i["format_errors"]]
                            for i in infos if not i.get("padding")])
      format_errors += sum(r[3] for r in rows)
      turns += sum(r[2] for r in rows)
      for task_type, won, _, _ in rows:
        if task_type is not None:
          by_type.setdefault(task_type, []).append(bool(won))
    out = {k: v / n for k, v in sums.items()}
    # answers with no command in them (invalid_rate also counts inadmissible commands)
    out["format_error_rate"] = format_errors / max(turns, 1)
    out.update({f"success/{t}": float(np.mean(w)) for t, w in sorted(by_type.items())})
    return out if kl is None else {**out, **steps.kl_metrics(kl)}

  def close(self):
    self.pool.close()
