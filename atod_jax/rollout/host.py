"""The multi-turn rollout for Python environments: the host drives the turns.

Per turn the policy decodes a response for every live episode from its KV cache (one
jitted call), the host turns each response into a command, the environment (usually an
:class:`~atod_jax.envs.pool.EnvPool`) steps, and the answers are appended to the cache
(one jitted call). The cache keeps the whole episode, so a turn costs the new tokens,
not the history. The result is a :class:`~atod_jax.rollout.trajectory.Trajectory` in
the same layout as the on-device rollout (prompt, then per turn ``M`` response and
``O`` observation slots), so scoring, advantages and the update are shared.

Two layouts (:class:`TextRollout` ``layout``), the two of
:mod:`~atod_jax.rollout.trajectory`:

* ``"context"``: one growing context. The prompt is ``"Task: {task}\\n"`` then the first
  observation, cut to ``P`` tokens (the task keeps at most half); a response is the
  command then ``<eos>``; each answer is ``"\\n{observation}"`` cut to its first ``O``
  tokens. The cache keeps the whole episode, so a turn costs the new tokens only.
* ``"window"``: the paper's verl-agent prompts. Each turn the prompt is rendered afresh
  (:func:`~atod_jax.envs.prompts.render_prompt`: the task, the last ``history``
  observation/action pairs, the current observation, the admissible commands, the format
  instructions; through the tokenizer's chat template when it has one) into ``P``
  tokens, and the response is ``<think>...</think><action>command</action>`` (Search-QA:
  ``<think>...</think><search>...</search>`` or ``<answer>...</answer>``) then
  ``<eos>``. A turn costs ``P + M`` tokens whatever the episode's length.

A response without ``<eos>`` (or another stop token of the model's
``generation_config.json``) in its ``M`` tokens (or, windowed, without its
``<think>`` block or action tag) is malformed: the environment gets an empty command and
the turn counts as invalid. Expert demonstrations go through the same codec (windowed,
with an empty ``<think></think>``: the expert has no reasoning to show), so a clone
learns exactly the layout the policy acts in.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import zlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from atod_jax.envs import registry
from atod_jax.envs.agent import invalid_turns, turn_rewards
from atod_jax.envs.prompts import extract_action, render_prompt
from atod_jax.models.decoder import KVCache
from atod_jax.models.sharding import RowSplit, batch_sharding
from atod_jax.models.tokenizer import Tokenizer
from atod_jax.rollout.trajectory import (Trajectory, assemble, assemble_windowed, cache_slots,
                                         layout_length)
from atod_jax.sampling.generate import SamplingParams, append, decode, init_cache


LAYOUTS = ("context", "window")


@dataclasses.dataclass(frozen=True)
class TextRollout:
  """Static shape of a host rollout: turns ``K``, prompt ``P``, response ``M`` and
  observation ``O`` token slots; the layout, and (windowed) the history pairs shown."""

  max_turns: int
  prompt_len: int = 128
  response_len: int = 16
  obs_len: int = 48
  layout: str = "context"
  history: int = 2

  def __post_init__(self):
    if self.layout not in LAYOUTS:
      raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")

  @property
  def windowed(self) -> bool:
    return self.layout == "window"

  @property
  def length(self) -> int:
    """Token slots of a row (windowed: of one turn's segment)."""
    if self.windowed:
      return self.prompt_len + self.response_len
    return layout_length(self.prompt_len, self.max_turns, self.response_len, self.obs_len)

  @property
  def cache_slots(self) -> int:
    return cache_slots(self.length)


_THOUGHT = re.compile(r"\s*<think>.*?</think>(.*)", re.DOTALL)


def _expert_answer(command: str, tag: str | None) -> str:
  """A windowed answer for an expert command: an empty ``<think>`` block, then the
  command in its tag (as is where it carries its own, as Search-QA's)."""
  return "<think></think>" + (command if tag is None else f"<{tag}>{command}</{tag}>")


class TextCodec:
  """Episode text <-> the token slots of a :class:`TextRollout` (see the module doc);
  ``env_kind`` (its registry entry) picks the windowed prompts' wording and action tag."""

  def __init__(self, tokenizer: Tokenizer, spec: TextRollout, env_kind: str = "household"):
    self.tokenizer, self.spec = tokenizer, spec
    self.eos = tokenizer.eos_token_id
    if self.eos is None:
      raise ValueError("the tokenizer has no eos token (tokenizer_config.json eos_token)")
    self.stops = tokenizer.stop_token_ids  # eos first: what the expert's answers end with
    self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
    fmt = registry.get(env_kind).agent
    self.system, self.instructions, self.action_tag = fmt.system, fmt.instructions, fmt.action_tag

  def prompt(self, task: str, observation: str) -> list[int]:
    """Context layout: the task (at most half the slots) then the head of the first
    observation."""
    head = self.tokenizer.encode(f"Task: {task}\n")[:self.spec.prompt_len // 2]
    return head + self.tokenizer.encode(observation)[:self.spec.prompt_len - len(head)]

  def prompt_text(self, task: str, observation: str, history: Sequence[tuple[str, str]] = (),
                  admissible: Sequence[str] | None = None, window: int | None = None) -> str:
    """Window layout: one turn's prompt as text (the chat template's, when the tokenizer
    has one, with the generation prompt; else the messages' lines)."""
    messages = render_prompt(task, observation, history, admissible,
                             window=self.spec.history if window is None else window,
                             system=self.system, instructions=self.instructions)
    if self.tokenizer.chat_template:
      return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return "".join(m["content"] + "\n" for m in messages)

  def turn_prompt(self, task: str, observation: str, history: Sequence[tuple[str, str]] = (),
                  admissible: Sequence[str] | None = None) -> list[int]:
    """Window layout: one turn's prompt in at most ``P`` tokens. Too long: fewer history
    pairs, then the list of admissible commands dropped, then its head (a quarter) and
    tail kept, the tail holding the observation's end and the instructions."""
    p = self.spec.prompt_len
    for lists in ((admissible, None) if admissible is not None else (None,)):
      for window in range(self.spec.history, -1, -1):
        ids = self.tokenizer.encode(self.prompt_text(task, observation, history, lists, window))
        if len(ids) <= p:
          return ids
    return ids[:p // 4] + ids[len(ids) - (p - p // 4):]

  def response(self, command: str) -> tuple[list[int], bool]:
    """The command's tokens then ``<eos>``, cut to ``M``; and whether it fitted."""
    if self.spec.windowed:
      ids = self.tokenizer.encode(_expert_answer(command, self.action_tag))
    else:
      ids = self.tokenizer.encode(" " + command)
    fits = len(ids) <= self.spec.response_len - 1
    return ids[:self.spec.response_len - 1] + [self.eos], fits

  def observation(self, text: str) -> list[int]:
    return self.tokenizer.encode("\n" + text)[:self.spec.obs_len]

  def command(self, ids: Sequence[int]) -> str | None:
    """The command of a response (``None``: malformed)."""
    ids = list(map(int, ids))
    end = next((n for n, i in enumerate(ids) if i in self.stops), None)
    if end is None:
      return None
    known = [i for i in ids[:end] if i < self.tokenizer.vocab_size]
    text = self.tokenizer.decode(known, skip_special_tokens=True).strip()
    if not self.spec.windowed:
      return text
    after = _THOUGHT.fullmatch(text)
    if after is None:
      return None
    rest = after.group(1).strip()
    if self.action_tag is None:
      return rest or None
    parsed = extract_action(rest, require_think=False)
    return parsed.action if parsed.ok else None


def episode_text(spec: TextRollout, env_kind: str, episode: dict) -> str:
  """An expert episode (:func:`~atod_jax.data.demos.collect_expert_episodes`) as the text
  a policy with a plain tokenizer (no chat template) reads and writes: the training text
  of :func:`~atod_jax.models.tokenizer.train_text_tokenizer`."""
  acts, obs = episode["actions"], episode["observations"]
  if not spec.windowed:
    return (f"Task: {episode['task']}\n" + "\n".join(obs) + "\n"
            + "\n".join(" " + a for a in acts))
  fmt = registry.get(env_kind).agent
  system, instructions, tag = fmt.system, fmt.instructions, fmt.action_tag
  parts = []
  for k, act in enumerate(acts):
    messages = render_prompt(episode["task"], obs[k], list(zip(obs[:k], acts[:k])),
                             window=spec.history, system=system, instructions=instructions)
    parts.extend(m["content"] for m in messages)
    parts.append(_expert_answer(act, tag))
  return "\n".join(parts)


def _right(rows: list[list[int]], width: int, pad: int):
  """Token lists -> ``[B, width]`` right-aligned (padding on the left) and valid."""
  out = np.full((len(rows), width), pad, np.int32)
  valid = np.zeros((len(rows), width), bool)
  for i, r in enumerate(rows):
    if r:
      out[i, width - len(r):] = r
      valid[i, width - len(r):] = True
  return out, valid


def anchor_key(observation: str) -> int:
  """The anchor-state key of a text observation (GiGPO): a 31-bit CRC of its lower-case
  words, so observations that differ only in case or spacing share it."""
  return zlib.crc32(" ".join(observation.lower().split()).encode()) & 0x7FFFFFFF


def _empty_cache(model, rows: RowSplit, slots: int):
  """A fresh cache of the batch's rows, placed as the batch is (multi-process: made on
  the devices in its shards, never whole on a host)."""
  if not rows.multi:
    cache = init_cache(model, rows.size, slots)
    return cache._replace(keys=rows.put(cache.keys), values=rows.put(cache.values),
                          valid=rows.put(cache.valid), next_position=rows.put(cache.next_position))
  shapes = jax.eval_shape(lambda: KVCache.init(model.cfg, rows.size, slots))
  out = jax.tree.map(lambda x: batch_sharding(rows.mesh, x.ndim) if x.ndim
                     else NamedSharding(rows.mesh, P()), shapes)
  return jax.jit(lambda: KVCache.init(model.cfg, rows.size, slots), out_shardings=out)()


@dataclasses.dataclass
class _Episodes:
  """What a host rollout keeps per episode while it plays: the token buffers of the
  trajectory (``[K, B, ...]``), the per-turn rewards and anchors, the counters, and
  each episode's task, current observation and history."""

  spec: TextRollout
  pad: int
  tasks: list
  current: list
  infos: list
  aborted: np.ndarray
  done: np.ndarray

  def __post_init__(self):
    s, b, kk = self.spec, len(self.tasks), self.spec.max_turns
    self.history: list[list[tuple[str, str]]] = [[] for _ in range(b)]
    width = (kk, b, s.prompt_len) if s.windowed else (b, s.prompt_len)
    self.prompt, self.prompt_valid = np.full(width, self.pad, np.int32), np.zeros(width, bool)
    self.obs = np.full((kk, b, s.obs_len), self.pad, np.int32)
    self.obs_valid = np.zeros((kk, b, s.obs_len), bool)
    self.resp = np.full((kk, b, s.response_len), self.pad, np.int32)
    self.resp_valid = np.zeros((kk, b, s.response_len), bool)
    self.imitate = np.zeros((kk, b, s.response_len), bool)
    self.resp_logp = np.zeros((kk, b, s.response_len), np.float32)
    self.rewards = np.zeros((kk, b), np.float32)
    self.anchors = np.full((kk, b), -1, np.int32)
    self.turns, self.invalid = np.zeros(b, np.int32), np.zeros(b, np.int32)
    self.format_errors = np.zeros(b, np.int32)  # turns whose answer held no command

  @property
  def size(self) -> int:
    return len(self.tasks)

  def record(self, k: int, live, malformed, actions, batch, invalid_penalty: float) -> None:
    """The environment's answer to turn ``k``: rewards (with the invalid-turn
    penalty), counters, aborts, infos, history and the next observations."""
    b = self.size
    self.turns += live
    flagged = np.array([bool(x.get("invalid", False)) for x in batch.infos] or [False] * b)
    bad = invalid_turns(live, malformed, flagged)
    self.invalid += bad.astype(np.int32)
    self.format_errors += (live & malformed).astype(np.int32)
    self.rewards[k] = turn_rewards(np.asarray(batch.rewards, np.float32), live, bad,
                                   invalid_penalty)
    if batch.aborted is not None:
      self.aborted |= batch.aborted & live
    for i in np.flatnonzero(live):
      if batch.infos and batch.infos[i]:
        self.infos[i].update(batch.infos[i])
      self.history[i].append((self.current[i], actions[i]))
      self.current[i] = batch.observations[i]

  def trajectory(self, wons, group_ids, padding) -> Trajectory:
    """The finished episodes as a :class:`Trajectory` (this process's rows); each
    info gets ``won``, ``turns``, ``format_errors`` (and ``padding`` on a padding row)."""
    self.aborted |= padding
    won = wons.copy() & ~self.aborted
    for i in range(self.size):
      self.infos[i].update(format_errors=int(self.format_errors[i]), won=bool(won[i]),
                           turns=int(self.turns[i]))
      if padding[i]:
        self.infos[i]["padding"] = True
    fields = dict(rewards=self.rewards.sum(axis=0), won=won, num_turns=self.turns,
                  invalid=self.invalid, group_ids=group_ids, row_valid=~self.aborted,
                  turn_rewards=self.rewards, anchors=self.anchors)
    if self.spec.windowed:
      return assemble_windowed(self.prompt, self.prompt_valid, self.resp, self.resp_valid,
                               self.imitate, self.resp_logp, **fields)
    return assemble(self.prompt, self.prompt_valid, self.resp, self.resp_valid, self.imitate,
                    self.resp_logp, self.obs, self.obs_valid, **fields)


def _expert_turn(ep: _Episodes, k: int, live, batch, codec: TextCodec, rng,
                 expert_noise: float) -> list:
  """Turn ``k`` of the environment's expert for every live episode (with
  ``expert_noise``, a share of random admissible commands, kept but not imitated)."""
  actions: list[str | None] = [None] * ep.size
  for i in np.flatnonzero(live):
    noisy = False
    command = batch.expert[i] if batch.expert else None
    choices = [a for a in (batch.admissible[i] if batch.admissible else []) if "<" not in a]
    if choices and (command is None or rng.random() < expert_noise):
      noisy = True  # a random command (noise, or no expert here): not imitated
      command = choices[rng.integers(len(choices))]
    command = command or ""
    ids, fits = codec.response(command)
    if not fits:  # a cut command is not the one played: never imitate it
      noisy = True
      logging.warning("expert command %r is longer than env.response_len=%d tokens: "
                      "not imitated (raise response_len)", command, ep.spec.response_len)
    ep.resp[k, i, :len(ids)] = ids
    ep.resp_valid[k, i, :len(ids)] = True
    ep.imitate[k, i, :len(ids)] = not noisy
    actions[i] = command
  return actions


class _Policy:
  """The model's side of a host rollout: its KV cache over the batch's rows, one
  decode per turn, the appends of the answers (context layout) or a fresh cache per
  turn's prompt (window layout)."""

  def __init__(self, model, codec: TextCodec, rows: RowSplit, key, sampling: SamplingParams):
    self.model, self.codec, self.rows, self.key, self.sampling = model, codec, rows, key, sampling
    b = len(rows.local)
    self.stop = rows.put(np.tile(np.asarray(codec.stops, np.int32), (b, 1)))
    self.logits = self.cache = None

  def prefill(self, tokens, valid) -> None:
    """A fresh cache holding ``tokens``."""
    cache = _empty_cache(self.model, self.rows, self.codec.spec.cache_slots)
    self.logits, self.cache = append(self.model, cache,
                                     *self.rows.put((jnp.asarray(tokens), jnp.asarray(valid))))

  def extend(self, tokens, valid) -> None:
    self.logits, self.cache = append(self.model, self.cache, *self.rows.put((tokens, valid)))

  def turn(self, ep: _Episodes, k: int, live) -> tuple[list, np.ndarray]:
    """Turn ``k``'s answers of every live episode: their commands and which were
    malformed (no command in them)."""
    spec, m = ep.spec, ep.spec.response_len
    if spec.windowed:
      self.prefill(ep.prompt[k], ep.prompt_valid[k])
    out = decode(self.model, self.cache, self.logits, jax.random.fold_in(self.key, k), m,
                 self.sampling, stop_tokens=self.stop,
                 max_new=self.rows.put(np.where(live, m, 0).astype(np.int32)), pad_id=ep.pad)
    self.cache, self.logits = out.cache, out.last_logits
    toks, valid, logp = self.rows.get((out.tokens, out.valid, out.logprobs))
    ep.resp[k], ep.resp_valid[k], ep.imitate[k], ep.resp_logp[k] = toks, valid, valid, logp
    actions: list[str | None] = [None] * ep.size
    malformed = np.zeros(ep.size, bool)
    for i in np.flatnonzero(live):
      command = self.codec.command(toks[i][valid[i]])
      malformed[i] = command is None
      actions[i] = command or ""
    return actions, malformed


def _play_turn(ep: _Episodes, k: int, live, batch, env, codec: TextCodec, rows: RowSplit,
               policy: _Policy | None, rng, expert_noise: float, invalid_penalty: float):
  """Turn ``k`` of every live episode: its prompt (windowed), the policy's answers (or
  the expert's), the environment's step and what it returned; the context layout's
  answers appended to the cache. Returns the environment's new batch."""
  spec, b = ep.spec, ep.size
  if spec.windowed:  # this turn's own prompt
    ep.prompt[k], ep.prompt_valid[k] = _right(
        [codec.turn_prompt(ep.tasks[i], ep.current[i], ep.history[i],
                           batch.admissible[i] if batch.admissible else None)
         if live[i] else [] for i in range(b)], spec.prompt_len, ep.pad)
  if policy is None:
    actions = _expert_turn(ep, k, live, batch, codec, rng, expert_noise)
    malformed = np.zeros(b, bool)
  else:
    actions, malformed = policy.turn(ep, k, live)
  ep.anchors[k] = [anchor_key(ep.current[i]) if live[i] else -1 for i in range(b)]
  batch = env.step(actions)
  ep.record(k, live, malformed, actions, batch, invalid_penalty)
  now_done = batch.dones | ep.aborted
  going = live & ~now_done
  ep.done = ep.done | now_done
  if not spec.windowed:
    answers = [codec.observation(batch.observations[i]) if going[i] else [] for i in range(b)]
    ep.obs[k], ep.obs_valid[k] = _right(answers, spec.obs_len, ep.pad)
    if policy is not None and rows.any(~ep.done) and k + 1 < spec.max_turns:
      policy.extend(ep.obs[k], ep.obs_valid[k])
  return batch


def host_rollout(model, codec: TextCodec, env, split: str, task_ids: Sequence[int],
                 key: jax.Array, *, sampling: SamplingParams | None = SamplingParams(),
                 group_ids: Sequence[int] | None = None, expert_noise: float = 0.0,
                 mesh=None, invalid_penalty: float = 0.0,
                 pad_to: int = 1) -> tuple[Trajectory, list[dict]]:
  """Plays one episode per task id; returns the trajectory batch and each episode's
  last ``info`` (task type, score, ...).

  ``sampling=None`` plays the environment's expert instead of the model (the
  demonstrations); with ``expert_noise`` a share of its turns is a random admissible
  command, kept in the context but not imitated (noise injection, as in DART).
  Episodes the environment aborted (a worker failure) get ``row_valid`` False.
  With ``mesh``, the episodes (the KV cache and every token batch) are sharded over its
  data axes, so decoding is data-parallel. Invalid turns (:mod:`atod_jax.envs.agent`)
  earn ``-invalid_penalty``; each turn's anchor is :func:`anchor_key` of the observation
  it answered.

  In a multi-process run (``mesh`` over several processes' devices) every process plays
  the episodes of its own rows of the batch (:class:`~atod_jax.models.sharding.RowSplit`)
  in its own environment, the model's calls run on the global arrays, and the returned
  trajectory is global; the infos are this process's rows'. ``pad_to``: the batch is
  padded (with copies of the last task, their rows not valid) to a multiple of it.
  Each info holds ``won``, ``turns`` and ``format_errors``; a padding row's holds
  ``padding``.
  """
  real = len(task_ids)
  task_ids = list(task_ids) + [task_ids[-1]] * (-real % pad_to)
  if group_ids is not None:
    group_ids = list(group_ids) + [-1] * (len(task_ids) - real)
  rows = RowSplit(mesh, len(task_ids))
  padding = rows.local >= real
  task_ids = [task_ids[i] for i in rows.local]
  if group_ids is not None:
    group_ids = np.asarray(group_ids)[rows.local]
  spec = codec.spec
  batch = env.reset(split, list(task_ids))
  b = len(task_ids)
  aborted = np.zeros(b, bool) if batch.aborted is None else batch.aborted.copy()
  ep = _Episodes(spec, codec.pad, list(batch.tasks), list(batch.observations),
                 [dict(x) for x in batch.infos] if batch.infos else [{} for _ in range(b)],
                 aborted, batch.dones.copy() | aborted)
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
  policy = None if sampling is None else _Policy(model, codec, rows, key, sampling)
  if not spec.windowed:
    ep.prompt, ep.prompt_valid = _right(
        [codec.prompt(t, x) for t, x in zip(ep.tasks, ep.current)], spec.prompt_len, codec.pad)
    if policy is not None:
      policy.prefill(ep.prompt, ep.prompt_valid)
  for k in range(spec.max_turns):
    live = ~ep.done
    if not rows.any(live):  # (every process's rows: the model's calls run on all of them)
      break
    batch = _play_turn(ep, k, live, batch, env, codec, rows, policy, rng, expert_noise,
                       invalid_penalty)
  traj = ep.trajectory(batch.wons, group_ids, padding)
  if rows.multi:  # this process's rows -> the global batch
    traj = rows.put(jax.device_get(traj))
  return traj, ep.infos
