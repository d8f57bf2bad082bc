"""An ahead-of-time memory and cost plan of a run on an accelerator it does not have.

:func:`plan` builds the run's state and batches as ``jax.ShapeDtypeStruct`` (no weight is
read or made: the model shapes come from a ``config.json``, a GGUF file or
:data:`MODELS`, the published sizes of Qwen3), shards them over a mesh of a TPU
topology's devices and compiles the jitted functions a training step calls, with the
real TPU compiler (``libtpu``: ``pip install "jax[tpu]"``; it runs on a CPU-only machine):

* ``rollout/prefill``: :func:`~atod_jax.sampling.generate.append` of a turn's prompt into
  a fresh KV cache (the windowed layout) or of the first prompt (the context layout);
* ``rollout/decode``: :func:`~atod_jax.sampling.generate.decode` of a turn's answer;
* ``rollout/append``: the context layout's observation append;
* ``score/teacher``, ``score/student``: :func:`~atod_jax.train.steps.score` of the
  update's batch by the teacher (and by the student when pi_old is recomputed);
* ``update``: :func:`~atod_jax.train.steps.atod_update` (the advantages, then every
  mini- and micro-batch of the surrogate).

Per function it reports the per-chip bytes XLA allocates (arguments, temporaries,
outputs, less the donated buffers it reuses) plus what stays resident on the chip
while that function runs (the student's train state and the teacher's parameters when
they are not among its arguments), against the chip's HBM; and per step the FLOPs the
implementation does (counted from the shapes: the compiler's cost analysis counts a
loop body once, and the decoder scans its layers) with a lower bound on the time: each
call at the chip's peak bf16 rate or its HBM bandwidth, whichever is slower.

The shapes are the worst case: every episode plays ``env.max_turns`` turns and every
sequence fills its slots. :func:`search` tries meshes and micro-batch counts until one
fits; ``python -m atod_jax.scaling`` is the command line.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from atod_jax.models import checkpoint as model_io
from atod_jax.models.config import ModelConfig
from atod_jax.models.decoder import KVCache
from atod_jax.models.sharding import leaf_shardings, make_mesh
from atod_jax.rollout.host import TextRollout
from atod_jax.rollout.trajectory import Trajectory
from atod_jax.sampling.generate import SamplingParams, jit_append, jit_decode
from atod_jax.train import methods, steps
from atod_jax.train.steps import init_state, make_optimizer
from atod_jax.train.streams import Stream, key as stream_key

GiB = 1 << 30


class PlanError(RuntimeError):
  """The plan cannot be made (no TPU compiler, an unknown target or model)."""


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip: the HBM a program may use, peak dense bf16 FLOP/s and HBM
  bandwidth (Google Cloud's published figures per chip).

  ``hbm_bytes`` is not the published capacity but the largest buffer
  the TPU compiler accepts on one device of the topology: the runtime keeps the rest
  (v5e 15.75 of 16 GiB, v6e 31.25 of 32; the same as the ``bytes_limit`` that
  ``memory_stats()`` reports on those chips, to within 60 KB). Measured with libtpu by
  bisection; ``tests/train/test_plan.py`` checks each figure against the compiler. The
  compile-only v4 device is given 15.25 GiB, half the published 32: a plan for v4 is held
  to that."""

  name: str
  hbm_bytes: int
  peak_flops: float
  hbm_bandwidth: float


CHIPS = {
    "v4": Chip("TPU v4", 16_372_942_336, 275e12, 1228e9),
    "v5e": Chip("TPU v5e", 16_909_281_280, 197e12, 819e9),
    "v5p": Chip("TPU v5p", 102_803_369_984, 459e12, 2765e9),
    "v6e": Chip("TPU v6e", 33_550_178_304, 918e12, 1640e9),
}

# The published config.json shapes of the paper's models (Qwen/Qwen3-*): the plan needs
# no weights. Qwen3-30B-A3B: 128 experts, 8 active, in every layer.
_QWEN3 = dict(model_type="qwen3", vocab_size=151936, head_dim=128, rms_norm_eps=1e-6,
              rope_theta=1_000_000.0, max_position_embeddings=40960, bos_token_id=151643,
              eos_token_id=151645)
MODELS = {
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, intermediate_size=3072, tie_word_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3, hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, intermediate_size=6144, tie_word_embeddings=True),
    "qwen3-4b": dict(_QWEN3, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=9728, tie_word_embeddings=True),
    "qwen3-30b-a3b": dict(_QWEN3, model_type="qwen3_moe", hidden_size=2048,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                          tie_word_embeddings=False),
}


def model_config(name_or_path: str, overrides: dict | None = None) -> ModelConfig:
  """A model's shape: a name of :data:`MODELS`, an HF directory (its ``config.json``) or a
  GGUF file; ``overrides`` as a config's ``student.model`` / ``teacher.model``
  (``dtype``, ``param_dtype``, ``remat``)."""
  over = {"dtype": "bfloat16", **(overrides or {})}
  if name_or_path.lower() in MODELS:
    return ModelConfig.from_hf(MODELS[name_or_path.lower()], **over)
  path = os.path.expanduser(name_or_path)
  if os.path.isdir(path):
    return model_io.config_of("hf", path, over)
  if os.path.isfile(path) and path.endswith(".gguf"):
    return model_io.config_of("gguf", path, over)
  raise PlanError(f"unknown model {name_or_path!r}: a name of {sorted(MODELS)}, an HF "
                  "directory with a config.json, or a .gguf file")


def has_tpu_compiler() -> bool:
  """Whether ``libtpu`` (the TPU compiler the plan runs) is installed."""
  import importlib.util
  return importlib.util.find_spec("libtpu") is not None


def topology(target: str):
  """``(chip, devices)`` of a TPU topology such as ``v5e:2x4`` or ``v5p:2x2x1``."""
  kind = target.split(":")[0].lower()
  if kind not in CHIPS or ":" not in target:
    raise PlanError(f"unknown target {target!r}: <chip>:<topology> with a chip of "
                    f"{sorted(CHIPS)}, e.g. v5e:2x4, v6e:2x4, v5p:2x2x1")
  # several processes may compile at once (pytest-xdist, a sweep): libtpu's lock file is
  # for processes that own a TPU, which none here does
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies
    desc = topologies.get_topology_desc(target, platform="tpu")
  except Exception as e:  # noqa: BLE001  (no libtpu, or a topology it does not know)
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    if not has_tpu_compiler():
      raise PlanError(f"cannot describe the TPU topology {target!r} ({first}): the plan "
                      f"compiles with libtpu: pip install \"jax[tpu]=={jax.__version__}\"") \
          from None
    raise PlanError(f"libtpu does not know the topology {target!r}: {first}") from None
  return CHIPS[kind], list(desc.devices)


# ------------------------------------------------------------------ abstract arrays
def _bytes_per_chip(tree, memory_kind: str | None = None) -> int:
  """Bytes one chip holds of a tree of sharded ``ShapeDtypeStruct`` (the largest shard)
  in its HBM (``memory_kind`` None) or in its host's memory (``"pinned_host"``)."""
  total = 0
  for x in jax.tree.leaves(tree):
    kind = getattr(x.sharding, "memory_kind", None)
    if (kind == "pinned_host") != (memory_kind == "pinned_host"):
      continue
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
  return total


def _batch_spec(shape: Sequence[int], mesh) -> NamedSharding:
  """``shard_batch``'s placement: the leading axis over (data, fsdp) when they divide it."""
  size = mesh.shape["data"] * mesh.shape["fsdp"]
  if shape and shape[0] % size == 0:
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (len(shape) - 1))))
  return NamedSharding(mesh, P())


def _on(x, sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _batched(tree, mesh):
  return jax.tree.map(lambda x: _on(x, _batch_spec(x.shape, mesh)), tree)


def _params(cfg: ModelConfig, mesh, memory_kind: str | None = None):
  graphdef, shapes = model_io.abstract(cfg)
  return graphdef, jax.tree.map(_on, shapes, leaf_shardings(shapes, mesh, memory_kind=memory_kind))


def _trajectory(rows: int, spec: TextRollout) -> Trajectory:
  """The update's batch at its largest (a packed, trimmed batch is at most this)."""
  k = spec.max_turns
  tok = (rows, k, spec.length) if spec.windowed else (rows, spec.length)
  s = jax.ShapeDtypeStruct
  return Trajectory(
      tokens=s(tok, jnp.int32), valid=s(tok, jnp.bool_), gen_mask=s(tok, jnp.bool_),
      turn_ids=s(tok, jnp.int32), behaviour_logp=s(tok, jnp.float32),
      rewards=s((rows,), jnp.float32), won=s((rows,), jnp.bool_),
      num_turns=s((rows,), jnp.int32), invalid=s((rows,), jnp.int32),
      group_ids=s((rows,), jnp.int32), row_valid=s((rows,), jnp.bool_),
      turn_rewards=s((rows, k), jnp.float32), anchors=s((rows, k), jnp.int32))


# ------------------------------------------------------------------ FLOPs
def _matmul_params(cfg: ModelConfig) -> int:
  """Weights one token multiplies by in the layers (a MoE layer: its router and its
  ``num_experts_per_tok`` experts), without the embedding and the unembedding."""
  h, d = cfg.hidden_size, cfg.head_dim
  attn = h * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  total = 0
  for i in range(cfg.num_layers):
    if cfg.is_moe_layer(i):
      total += attn + cfg.num_experts_per_tok * 3 * h * cfg.moe_intermediate_size \
          + cfg.num_experts * h
    else:
      total += attn + 3 * h * cfg.intermediate_size
  return total


def forward_flops(cfg: ModelConfig, tokens: int, attended: int, logits: int) -> float:
  """FLOPs of a forward pass as this implementation computes it: ``tokens`` tokens
  through the layers, ``attended`` query-key pairs per layer in all (the attention reads
  every slot of its sequence or cache: ``T^2`` for a sequence of ``T``, masked or not)
  and ``logits`` rows of the vocabulary projection."""
  attn = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * attended
  return 2.0 * _matmul_params(cfg) * tokens + attn + 2.0 * cfg.hidden_size * cfg.vocab_size * logits


def bound_seconds(flops: float, hbm_read: float, chip: Chip, chips: int) -> float:
  """A lower bound on a call: ``chips`` chips doing ``flops`` at their peak rate, or one
  reading ``hbm_read`` bytes at full bandwidth, whichever takes longer."""
  return max(flops / (chips * chip.peak_flops), hbm_read / chip.hbm_bandwidth)


# ------------------------------------------------------------------ the plan
@dataclasses.dataclass
class Row:
  """One compiled function: per-chip bytes and per-step cost."""

  name: str
  calls: int  # per training step
  argument: int
  temp: int
  output: int
  alias: int
  resident: int  # on the chip beside its arguments (train state, teacher)
  flops: float  # per call, all chips together
  hbm_read: float  # bytes per call per chip that must stream from HBM (decode: weights + cache)
  refused: str = ""  # the compiler's out-of-memory message (then only temps are known)

  @property
  def peak(self) -> int:
    """Bytes on a chip while it runs (a refused compile: at least its temporaries and
    what is resident)."""
    return self.argument + self.temp + self.output - self.alias + self.resident

  def seconds(self, chip: Chip, chips: int) -> float:
    return bound_seconds(self.flops, self.hbm_read, chip, chips)


@dataclasses.dataclass
class Plan:
  target: str
  chip: Chip
  chips: int
  mesh: dict
  microbatches: int
  student: str
  teacher: str
  rows: list[Row]
  notes: list[str] = dataclasses.field(default_factory=list)
  optimizer: str = "adamw"

  @property
  def peak(self) -> int:
    return max(r.peak for r in self.rows)

  @property
  def fits(self) -> bool:
    return self.peak <= self.chip.hbm_bytes

  @property
  def step_flops(self) -> float:
    return sum(r.flops * r.calls for r in self.rows)

  @property
  def step_seconds(self) -> float:
    return sum(r.seconds(self.chip, self.chips) * r.calls for r in self.rows)

  def table(self) -> str:
    """A markdown table, one line per function, and the verdict."""
    gb = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    m = self.mesh
    lines = [f"{self.target} ({self.chips} x {self.chip.name}, {gb(self.chip.hbm_bytes)} GiB "
             f"of HBM usable a chip), mesh data={m['data']} fsdp={m['fsdp']} "
             f"tensor={m['tensor']}, microbatches={self.microbatches}, "
             f"optimizer {self.optimizer}; student {self.student}, teacher {self.teacher}", "",
             "| function | calls/step | arguments GiB | temps GiB | outputs GiB | donated GiB "
             "| resident GiB | peak GiB/chip | TFLOP/call | s/step (bound) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in self.rows:
      flag = "" if r.peak <= self.chip.hbm_bytes else (
          " **over** (compiler: out of HBM)" if r.refused else " **over**")
      lines.append(f"| {r.name} | {r.calls} | {gb(r.argument)} | {gb(r.temp)} | {gb(r.output)} "
                   f"| {gb(r.alias)} | {gb(r.resident)} | {gb(r.peak)}{flag} "
                   f"| {r.flops / 1e12:.2f} | {r.seconds(self.chip, self.chips) * r.calls:.1f} |")
    verdict = "fits" if self.fits else "does NOT fit"
    lines += ["", f"peak {gb(self.peak)} of {gb(self.chip.hbm_bytes)} GiB a chip: {verdict}; "
              f"{self.step_flops / 1e15:.1f} PFLOP a step, at least {self.step_seconds:.0f} s "
              "a step at the chips' peak rate (real steps are slower: decoding is latency-bound "
              "and the environment's time is not counted)."]
    lines += [f"- {n}" for n in self.notes]
    if not self.fits:
      lines.append("- " + advice(self))
    return "\n".join(lines)


def advice(plan: Plan) -> str:
  """What to change when a function does not fit."""
  worst = max(plan.rows, key=lambda r: r.peak)
  tips = []
  if worst.name.startswith(("update", "score")):
    tips.append("more optim.microbatches (smaller slices of the update's batch)")
  if worst.resident + worst.argument > plan.chip.hbm_bytes // 2:
    tips.append("more mesh.fsdp (parameters and optimizer state split over more chips)")
    if plan.optimizer == "adamw":
      tips.append("optim.optimizer='adafactor' (no parameter-sized moments)")
  if worst.name.startswith("rollout"):
    tips.append("fewer rollout rows per call (env.eval_batch, rollout.tasks_per_step) or "
                "shorter env.prompt_len / env.response_len")
  tips.append("model.remat=True and bf16 teacher parameters (teacher.model.param_dtype)")
  return f"{worst.name} needs {worst.peak / GiB:.2f} GiB a chip; try " + "; ".join(tips)


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclasses.dataclass(frozen=True)
class _OutOfMemory:
  """The TPU compiler's own refusal: it could not fit the function's temporaries."""

  temp: int
  message: str


def _compile(fn: Callable, *args, **kwargs):
  """The compiled function, or :class:`_OutOfMemory` when the compiler runs out of HBM
  (it names the temporaries' bytes: the plan reports them as the function's)."""
  # no persistent cache: a TPU executable cannot be read back without a TPU client (it
  # warns and compiles anyway), so writing one only fills the disk
  cached = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    return fn.lower(*args, **kwargs).compile()
  except jax.errors.JaxRuntimeError as e:
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text:
      raise
    found = re.search(r"temporaries \(([\d.]+)([KMGT]?)\)", text)
    temp = int(float(found.group(1)) * _UNITS[found.group(2)]) if found else 0
    return _OutOfMemory(temp, text.strip().splitlines()[0][:300])
  finally:
    jax.config.update("jax_enable_compilation_cache", cached)


def _row(name, compiled, calls, resident, flops, hbm_read=0.0) -> Row:
  if isinstance(compiled, _OutOfMemory):
    return Row(name, calls, 0, compiled.temp, 0, 0, int(resident), float(flops),
               float(hbm_read), compiled.message)
  mem = compiled.memory_analysis()
  return Row(name, calls, int(mem.argument_size_in_bytes), int(mem.temp_size_in_bytes),
             int(mem.output_size_in_bytes), int(mem.alias_size_in_bytes), int(resident),
             float(flops), float(hbm_read))


@dataclasses.dataclass
class _Step:
  """A config's step as abstract, sharded arrays (what :func:`plan` compiles)."""

  config: Any
  mesh: Any
  optim: Any
  spec: TextRollout
  s_cfg: ModelConfig
  t_cfg: ModelConfig
  rows: int  # episodes a step
  roll_rows: int  # episodes a rollout call
  tx: Any = None
  graphdef: Any = None
  s_params: Any = None
  t_graph: Any = None
  t_params: Any = None
  state: Any = None
  update: Any = None

  def __post_init__(self):
    self.tx = make_optimizer(self.optim)
    self.graphdef, self.s_params = _params(self.s_cfg, self.mesh)
    self.t_graph, self.t_params = _params(
        self.t_cfg, self.mesh, "pinned_host" if self.config.teacher.get("offload") else None)
    from atod_jax.train.loop import train_state_shardings
    abstract = jax.eval_shape(lambda p: init_state(p, self.tx), self.s_params)
    self.state = jax.tree.map(_on, abstract, train_state_shardings(self.tx, abstract, self.mesh))
    self.update = methods.make_update(self.config, self.config.method, self.graphdef,
                                      max_turns=self.spec.max_turns, optim=self.optim,
                                      tx=self.tx, mesh=self.mesh)

  @property
  def offloaded(self) -> int:
    """Bytes of the teacher one chip keeps in its host's memory (``teacher.offload``)."""
    return _bytes_per_chip(self.t_params, "pinned_host")

  @property
  def bytes(self) -> tuple[int, int, int]:
    """Per chip: the student's train state, its parameters, the teacher's parameters."""
    return (_bytes_per_chip(self.state), _bytes_per_chip(self.s_params),
            _bytes_per_chip(self.t_params))

  def batched(self, shape, dtype) -> jax.ShapeDtypeStruct:
    return _batched(jax.ShapeDtypeStruct(shape, dtype), self.mesh)


def plan(config, target: str, *, student: str, teacher: str, data: int | None = None,
         fsdp: int | None = None, tensor: int | None = None,
         microbatches: int | None = None, optimizer: str | None = None,
         say: Callable = lambda *a: None) -> Plan:
  """Compiles a training step of ``config`` (a text environment's run) for ``target``.

  ``student`` / ``teacher``: a name of :data:`MODELS`, an HF directory or a GGUF file
  (the config's ``student.model`` / ``teacher.model`` fields override its numerics);
  ``data`` / ``fsdp`` / ``tensor`` / ``microbatches`` / ``optimizer`` replace the config's
  ``mesh``, ``optim.microbatches`` and ``optim.optimizer``."""
  chip, devices = topology(target)
  step = setup_step(config, devices, student=student, teacher=teacher, data=data, fsdp=fsdp,
                tensor=tensor, microbatches=microbatches, optimizer=optimizer, where=target)
  mesh, optim, spec = step.mesh, step.optim, step.spec
  s_cfg, t_cfg = step.s_cfg, step.t_cfg
  notes = [f"teacher offloaded (teacher.offload): {step.offloaded / GiB:.2f} GiB a chip in "
           "host memory, copied to the chips layer by layer in every scoring call"
           ] if step.offloaded else []
  notes += [f"student {s_cfg.num_params() / 1e9:.2f} B parameters ({s_cfg.param_dtype}, "
           f"compute {s_cfg.dtype}, remat {s_cfg.remat}); teacher "
           f"{t_cfg.num_params() / 1e9:.2f} B ({t_cfg.param_dtype}, compute {t_cfg.dtype})",
           f"rollout: {step.roll_rows} episodes a call, {spec.max_turns} turns of a "
           f"{spec.prompt_len}-token prompt and a {spec.response_len}-token answer "
           f"({spec.layout} layout); update: {step.rows} episodes, {optim.minibatches} "
           f"mini-batches x {optim.microbatches} micro-batches asked, {optim.epochs} epoch(s)"]
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # as the trainer traces
    say(f"{target}: compiling the rollout")
    rows = [_compiled_row(c) for c in rollout_calls(step)]
    say(f"{target}: compiling the scoring and the update")
    calls, note = update_calls(step)
    rows += [_compiled_row(c) for c in calls]
  return Plan(target, chip, len(devices), dict(mesh.shape), optim.microbatches, student,
              teacher, rows, notes + [note], optim.optimizer)


def setup_step(config, devices, *, student: str | ModelConfig, teacher: str | ModelConfig,
           data=None, fsdp=None, tensor=None, microbatches=None, optimizer=None,
           where: str = "") -> "_Step":
  """A config's step as abstract arrays sharded over a mesh of ``devices`` (``where``
  names them in errors). ``student`` / ``teacher``: as :func:`plan`, or a
  :class:`ModelConfig`."""
  from atod_jax.envs import registry
  e, m = config.env, config.mesh
  if registry.get(e.kind).device is not None:
    raise PlanError(f"the plan covers the text environments' host rollout; {e.kind!r} rolls "
                    "out on the device")
  try:
    mesh = make_mesh(m.data if data is None else data, m.fsdp if fsdp is None else fsdp,
                     m.tensor if tensor is None else tensor, devices=devices)
  except ValueError as err:
    raise PlanError(f"{where}: {err}") from None
  optim = config.optim.copy_and_resolve_references()
  with optim.unlocked():
    optim.microbatches = config.optim.microbatches if microbatches is None else microbatches
    optim.optimizer = optim.get("optimizer", "adamw") if optimizer is None else optimizer
  spec = TextRollout(e.max_turns, e.prompt_len, e.response_len, e.obs_len,
                     layout=e.get("layout", "context"), history=e.get("history", 2))
  rows = config.rollout.tasks_per_step * config.rollout.group_size
  def shape(model, part):
    return model if isinstance(model, ModelConfig) else model_config(model, part.model.to_dict())
  return _Step(config, mesh, optim, spec, shape(student, config.student),
               shape(teacher, config.teacher), rows, max(rows, e.eval_batch))


@dataclasses.dataclass
class Call:
  """One jitted function of a training step with its arguments as sharded
  ``ShapeDtypeStruct`` (or static values): what :func:`plan` compiles and
  :mod:`atod_jax.scaling.measure` runs."""

  name: str
  fn: Callable
  args: tuple
  kwargs: dict
  calls: int  # per training step
  resident: int  # bytes a chip holds beside the arguments (train state, teacher)
  flops: float  # per call, all chips together
  hbm_read: float = 0.0  # bytes per call per chip that must stream from HBM
  fills: dict = dataclasses.field(default_factory=dict)  # argument index -> value to fill
  tokens: int = 0  # tokens a call generates (the decode)


def _compiled_row(c: Call) -> Row:
  return _row(c.name, _compile(c.fn, *c.args, **c.kwargs), c.calls, c.resident, c.flops,
              c.hbm_read)


def rollout_calls(step: _Step) -> list[Call]:
  """Per turn, a prefill (windowed: of a fresh cache) and a decode; the context layout's
  observation appends."""
  spec, s_cfg, n = step.spec, step.s_cfg, step.roll_rows
  state_bytes, s_bytes, t_bytes = step.bytes
  beside = state_bytes - s_bytes + t_bytes  # the optimizer's moments, the teacher
  slots, k, m_len = spec.cache_slots, spec.max_turns, spec.response_len
  cache = jax.eval_shape(lambda: KVCache.init(s_cfg, n, slots))
  cache = _batched(cache, step.mesh)._replace(
      index=_on(cache.index, NamedSharding(step.mesh, P())))
  p_len = spec.prompt_len
  out = [Call("rollout/prefill", jit_append,
              (step.graphdef, step.s_params, cache, step.batched((n, p_len), jnp.int32),
               step.batched((n, p_len), jnp.bool_)), {}, k if spec.windowed else 1, beside,
              forward_flops(s_cfg, n * p_len, n * p_len * slots, n))]
  key = jax.eval_shape(lambda: stream_key(0, Stream.POLICY, 0))
  # each of a decode call's M tokens reads the weights and the whole cache
  per_token_read = s_bytes + _bytes_per_chip((cache.keys, cache.values))
  # run for real: no stop token matches (-1) and every row may take all M tokens, the
  # worst case the plan compiles for
  out.append(Call("rollout/decode", jit_decode,
                  (step.graphdef, step.s_params, cache,
                   step.batched((n, s_cfg.vocab_size), jnp.float32), key, m_len,
                   SamplingParams(temperature=step.config.rollout.temperature),
                   step.batched((n, 2), jnp.int32), step.batched((n,), jnp.int32),
                   jax.ShapeDtypeStruct((), jnp.int32)), {}, k, beside,
                  m_len * forward_flops(s_cfg, n, n * slots, n), m_len * per_token_read,
                  fills={7: -1, 8: m_len}, tokens=n * m_len))
  if not spec.windowed and spec.obs_len:
    o = spec.obs_len
    out.append(Call("rollout/append", jit_append,
                    (step.graphdef, step.s_params, cache, step.batched((n, o), jnp.int32),
                     step.batched((n, o), jnp.bool_)), {}, k - 1, beside,
                    forward_flops(s_cfg, n * o, n * o * slots, n)))
  return out


def update_calls(step: _Step) -> tuple[list[Call], str]:
  """The teacher's (and pi_old's) scoring, the advantages and the update, on the update's
  batch sliced as the run slices it; and a note of the slicing."""
  spec, update, s_cfg, t_cfg = step.spec, step.update, step.s_cfg, step.t_cfg
  state_bytes, s_bytes, t_bytes = step.bytes
  batch = _batched(_trajectory(step.rows, spec), step.mesh)
  seqs = step.rows * (spec.max_turns if spec.windowed else 1)
  tokens, pairs = seqs * spec.length, seqs * spec.length ** 2
  chunks, walk = update.slicing(batch)
  out = []
  if update.scores_tokens:
    out.append(Call("score/teacher", steps.jit_score, (step.t_graph, step.t_params, batch),
                    dict(temperature=1.0, chunks=chunks, rows=update.rows), 1, state_bytes,
                    forward_flops(t_cfg, tokens, pairs, tokens)))
  if update.recompute:
    out.append(Call("score/student", steps.jit_score, (step.graphdef, step.s_params, batch),
                    dict(temperature=update.loss.temperature, chunks=chunks, rows=update.rows),
                    1, state_bytes - s_bytes + t_bytes,
                    forward_flops(s_cfg, tokens, pairs, tokens)))
  per_token = jax.ShapeDtypeStruct(batch.tokens.shape, jnp.float32,
                                   sharding=batch.tokens.sharding)
  distill = update.distill
  key = jax.eval_shape(lambda: stream_key(0, Stream.SHUFFLE, 0))
  passes = 4 if s_cfg.remat else 3  # forward, backward (2x), the remat's second forward
  flops = step.optim.epochs * passes * forward_flops(s_cfg, tokens, pairs, tokens)
  if distill:
    flops += step.optim.epochs * forward_flops(t_cfg, tokens, pairs, tokens)
  spec = steps.UpdateSpec(step.graphdef, step.tx, walk, update.loss, update.advantage, distill,
                          step.t_graph if distill else None)
  one = jnp.float32(1.0)
  out.append(Call("update", steps.jit_atod_update,
                  (spec, step.state, batch, key, per_token, one, one,
                   step.t_params if distill else None), {},
                  1, 0 if distill else t_bytes, flops))
  note = (f"sequences sliced as run: teacher scoring in {chunks} chunks, each "
          f"mini-batch's gradient in {walk.microbatches} slices")
  if step.offloaded and update.scores_tokens:
    note += (f"; the offloaded teacher crosses from host memory once a chunk: "
             f"{chunks * step.offloaded / GiB:,.0f} GiB a chip a step (not in the time bound: "
             "it depends on the host-to-chip bandwidth)")
  return out, note


def meshes(chips: int) -> list[tuple[int, int, int]]:
  """``(data, fsdp, tensor)`` splits of ``chips``, the least memory first: all-fsdp (every
  parameter and optimizer moment split over every chip) towards all-data, then with
  tensor parallelism."""
  out = []
  for tensor in (1, 2, 4, 8):
    if chips % tensor:
      continue
    rest = chips // tensor
    for fsdp in sorted({f for f in range(1, rest + 1) if rest % f == 0}, reverse=True):
      out.append((rest // fsdp, fsdp, tensor))
  return out


def search(config, target: str, *, student: str, teacher: str,
           microbatches: Sequence[int] | None = None, optimizer: str | None = None,
           with_tensor: bool = True, say: Callable = lambda *a: None
           ) -> tuple[Plan | None, list[Plan]]:
  """The first setting that fits, trying the meshes that put every chip on the model
  axes (``data=1``: :func:`meshes`' all-fsdp first, then with tensor parallelism; a mesh
  with data parallelism holds more on each chip), each with the config's
  ``optim.microbatches`` and then 2 and 4 times as many (or ``microbatches``), with the
  config's optimizer (or ``optimizer``); ``with_tensor=False``: the all-fsdp mesh only. Returns
  the plan that fits (None if none does) and every plan tried."""
  _, devices = topology(target)
  asked = config.optim.microbatches
  microbatches = microbatches or (asked, 2 * asked, 4 * asked)
  tried = []
  least = [m for m in meshes(len(devices)) if m[0] == 1 and (with_tensor or m[2] == 1)]
  for (data, fsdp, tensor), micro in itertools.product(least, microbatches):
    try:
      p = plan(config, target, student=student, teacher=teacher, data=data, fsdp=fsdp,
               tensor=tensor, microbatches=micro, optimizer=optimizer, say=say)
    except Exception as err:  # noqa: BLE001  (e.g. the compiler's own out-of-memory)
      say(f"{target} data={data} fsdp={fsdp} tensor={tensor} micro={micro}: "
          f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}")
      continue
    tried.append(p)
    say(f"{target} data={data} fsdp={fsdp} tensor={tensor} micro={micro}: peak "
        f"{p.peak / GiB:.2f} GiB a chip ({'fits' if p.fits else 'over'})")
    if p.fits:
      return p, tried
  return None, tried


def overview(plans: Sequence[Plan]) -> str:
  """One line per plan: a table for ``docs/``."""
  lines = ["| student | teacher | target | mesh (data, fsdp, tensor) | micro-batches "
           "| optimizer | peak GiB/chip | usable HBM GiB | fits | PFLOP/step | s/step (bound) |",
           "|---|---|---|---|---:|---|---:|---:|---|---:|---:|"]
  for p in plans:
    m = p.mesh
    lines.append(f"| {p.student} | {p.teacher} | {p.target} | {m['data']}, {m['fsdp']}, "
                 f"{m['tensor']} | {p.microbatches} | {p.optimizer} | {p.peak / GiB:.2f} "
                 f"| {p.chip.hbm_bytes / GiB:.2f} | {'yes' if p.fits else 'no'} "
                 f"| {p.step_flops / 1e15:.1f} | {p.step_seconds:.0f} |")
  return "\n".join(lines)


__all__ = ["CHIPS", "MODELS", "Call", "Chip", "Plan", "PlanError", "Row", "advice",
           "bound_seconds", "forward_flops", "has_tpu_compiler", "meshes", "model_config",
           "overview", "plan", "rollout_calls", "search", "topology", "update_calls"]
