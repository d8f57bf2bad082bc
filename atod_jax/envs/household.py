"""An ALFWorld-like household task family that runs entirely on device (jit / vmap).

A task is a room with receptacles (cabinets and drawers that open and close, a fridge,
a microwave, a sink, counters, shelves, ...) and objects lying in them. The goal is one
of ALFWorld's household task types:

* ``pick``:  put a {obj} in/on a {recep}
* ``clean``: put a clean {obj} in/on a {recep}     (clean it with the sinkbasin)
* ``heat``:  put a hot {obj} in/on a {recep}       (heat it with the microwave)
* ``cool``:  put a cool {obj} in/on a {recep}      (cool it with the fridge)
* ``pick2``: put two {obj}s in/on a {recep}

Actions are ALFWorld's text commands over a word-level vocabulary (:data:`VOCAB`):
``go to cabinet 2``, ``open fridge 1``, ``close drawer 1``, ``take mug 1 from
countertop 1``, ``put mug 1 in/on cabinet 2``, ``clean mug 1 with sinkbasin 1``,
``heat``, ``cool``, ``examine cabinet 1``, ``look``, ``inventory``. The reward is sparse:
1 on the step that completes the goal, else 0. An action that cannot be parsed or
does nothing gets "Nothing happens." and ``invalid = True`` (the trainer decides the
penalty). Everything is a pure function of arrays:

    params = HouseholdParams.preset("medium")
    state = reset(params, key, split="train")            # jit / vmap over keys
    state, out = step(params, state, action_tokens)      # action_tokens [ACTION_LEN] int32
    obs = observe(params, state, out.event)              # [OBS_LEN] int32 word ids

Train and held-out tasks are disjoint by construction: every (task type, object type,
receptacle type) goal combination belongs to exactly one split (about 1 in 5 is held
out), as ALFWorld's "unseen" split holds out combinations.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from atod_jax.envs.base import DeviceStep

# ---------------------------------------------------------------------- vocabulary
RECEPTACLES = ("cabinet", "drawer", "fridge", "microwave", "sinkbasin", "countertop",
               "shelf", "diningtable", "stoveburner", "garbagecan")
OPENABLE = ("cabinet", "drawer", "fridge", "microwave")
OBJECTS = ("mug", "apple", "bowl", "plate", "knife", "spoon", "egg", "potato", "cup",
           "tomato", "bread", "lettuce")
TASK_TYPES = ("pick", "clean", "heat", "cool", "pick2")
VERBS = ("go", "open", "close", "take", "put", "clean", "heat", "cool", "examine", "look",
         "inventory")
_WORDS = (
    "<pad>", "<unk>", "<eos>", "to", "from", "in/on", "with", ".", ",", ":",
    "you", "arrive", "at", "see", "a", "an", "and", "nothing", "happens", "the", "is",
    "open", "closed", "in", "it", "on", "pick", "up", "put", "clean", "heat", "cool",
    "using", "are", "carrying", "not", "anything", "middle", "of", "room", "looking",
    "quickly", "around", "your", "task", "hot", "two", "some", "facing", "next",
    "close", "goal", "reached",
)
NUMBERS = tuple(str(i) for i in range(1, 10))
VOCAB: tuple[str, ...] = tuple(dict.fromkeys(_WORDS + VERBS + RECEPTACLES + OBJECTS + NUMBERS))
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
PAD, UNK, EOS = WORD_ID["<pad>"], WORD_ID["<unk>"], WORD_ID["<eos>"]

R_MAX, O_MAX = 12, 10  # receptacle / object slots of every state
ACTION_LEN = 8  # longest command: "take mug 1 from countertop 1" + padding
OBS_LEN = 96

_REC_WORD = np.array([WORD_ID[w] for w in RECEPTACLES], np.int32)
_OBJ_WORD = np.array([WORD_ID[w] for w in OBJECTS], np.int32)
_NUM_WORD = np.array([WORD_ID[w] for w in NUMBERS], np.int32)
_VERB_WORD = np.array([WORD_ID[w] for w in VERBS], np.int32)
_OPENABLE = np.array([r in OPENABLE for r in RECEPTACLES])
SINK, MICROWAVE, FRIDGE = (RECEPTACLES.index(r) for r in ("sinkbasin", "microwave", "fridge"))
_APPLIANCE_OF = np.array([-1, SINK, MICROWAVE, FRIDGE, -1], np.int32)  # per task type
V_GO, V_OPEN, V_CLOSE, V_TAKE, V_PUT, V_CLEAN, V_HEAT, V_COOL, V_EXAMINE, V_LOOK, V_INV = range(11)


def _goal_combos(split: str) -> np.ndarray:
  """Goal combinations ``[n, 3]`` (task type, object type, receptacle type) of a split."""
  combos = []
  for t, task in enumerate(TASK_TYPES):
    for o in range(len(OBJECTS)):
      for r, rec in enumerate(RECEPTACLES):
        if rec in ("microwave", "stoveburner", "garbagecan", "sinkbasin"):
          continue  # goals put things away, not into appliances
        if task == "cool" and rec == "fridge":
          continue
        combos.append((t, o, r))
  combos = np.array(combos, np.int32)
  held = (combos[:, 0] * 7 + combos[:, 1] * 13 + combos[:, 2] * 29) % 5 == 0
  if split == "train":
    return combos[~held]
  if split == "heldout":
    return combos[held]
  raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")


@dataclasses.dataclass(frozen=True)
class HouseholdParams:
  """Difficulty knobs (static)."""

  num_receptacles: int = 6  # in [5, R_MAX], including sinkbasin, microwave and fridge
  num_objects: int = 4  # <= O_MAX, including the goal objects
  task_types: tuple[str, ...] = ("pick", "clean", "heat", "cool")
  max_turns: int = 30
  # objects of the goal type to put away (pick2: at least two): more is a longer task
  goal_count: int = 1
  # the demonstrations' planner: "privileged" goes straight to where the goal objects
  # lie; "searching" acts only on what the agent has seen (searches receptacles in the
  # first observation's order until a goal object is seen): every move it makes is a
  # function of the episode so far, so a clone can imitate it
  expert: str = "privileged"
  # task types the planner mishandles: it skips their treatment (puts the object away
  # unwashed / cold / warm), which the reward does not accept; a teacher cloned from it is
  # good on the other types and fails these, the imperfect teacher of the paper's regime
  expert_skips: tuple[str, ...] = ()

  @property
  def skip_ids(self) -> tuple[int, ...]:
    return tuple(TASK_TYPES.index(t) for t in self.expert_skips)

  def __post_init__(self):
    if not 5 <= self.num_receptacles <= R_MAX:
      raise ValueError(f"num_receptacles must be in [5, {R_MAX}], got {self.num_receptacles}")
    if not 2 <= self.num_objects <= O_MAX:
      raise ValueError(f"num_objects must be in [2, {O_MAX}], got {self.num_objects}")
    bad = set(self.task_types) - set(TASK_TYPES)
    if bad or not self.task_types:
      raise ValueError(f"task_types must be a non-empty subset of {TASK_TYPES}, got {bad}")
    if self.max_turns < 1:
      raise ValueError("max_turns must be >= 1")
    if not 1 <= self.goal_count <= min(self.num_objects, len(NUMBERS)):
      raise ValueError(f"goal_count must be in [1, num_objects={self.num_objects}], got "
                       f"{self.goal_count}")
    if "pick2" in self.task_types and self.num_objects < 2:
      raise ValueError("pick2 needs num_objects >= 2")
    if self.expert not in ("privileged", "searching"):
      raise ValueError(f"expert must be 'privileged' or 'searching', got {self.expert!r}")
    bad = set(self.expert_skips) - ({"clean", "heat", "cool"} & set(self.task_types))
    if bad:
      raise ValueError(f"expert_skips must name treated task types of this family "
                       f"(clean, heat, cool among {self.task_types}), got {sorted(bad)}")

  @classmethod
  def preset(cls, name: str) -> "HouseholdParams":
    presets = {
        "easy": cls(5, 2, ("pick",), 15),
        "medium": cls(6, 4, ("pick", "clean", "heat", "cool"), 30),
        "hard": cls(10, 8, TASK_TYPES, 50),
        # three objects to clean / heat / cool and put away: the expert needs 18-20 (p10-p90)
        # (19-23 with the searching planner, whose demonstrations a clone can imitate:
        # the privileged one's go straight to objects the agent has not seen)
        "long": cls(8, 6, ("clean", "heat", "cool"), 30, goal_count=3, expert="searching"),
        # the paper's regime: an imperfect teacher the reward exposes (its planner never
        # cools: a quarter of the tasks are beyond it), searched rooms of 8 receptacles
        "regime": cls(8, 4, ("pick", "clean", "heat", "cool"), 30, expert="searching",
                      expert_skips=("cool",)),
    }
    if name not in presets:
      raise ValueError(f"preset must be one of {tuple(presets)}, got {name!r}")
    return presets[name]


class State(NamedTuple):
  rec_type: jax.Array  # [R_MAX] int32 receptacle type, -1 for an unused slot
  rec_num: jax.Array  # [R_MAX] int32 instance number (1-based)
  rec_open: jax.Array  # [R_MAX] bool
  obj_type: jax.Array  # [O_MAX] int32, -1 unused
  obj_num: jax.Array  # [O_MAX] int32
  obj_loc: jax.Array  # [O_MAX] int32 receptacle slot, -1 held by the agent
  obj_clean: jax.Array  # [O_MAX] bool
  obj_hot: jax.Array
  obj_cool: jax.Array
  agent_loc: jax.Array  # int32 receptacle slot, -1 in the middle of the room
  holding: jax.Array  # int32 object slot, -1 empty-handed
  goal: jax.Array  # [3] int32 (task type, object type, receptacle type)
  turn: jax.Array  # int32
  done: jax.Array  # bool
  won: jax.Array  # bool
  rec_seen: jax.Array  # [R_MAX] bool: receptacles whose inside the agent has seen


class StepOut(NamedTuple):
  event: jax.Array  # [4] int32 (kind, verb, object slot, receptacle slot) for observe()
  reward: jax.Array  # float32
  done: jax.Array  # bool
  won: jax.Array  # bool
  invalid: jax.Array  # bool: the action did nothing / could not be parsed


# event kinds
E_NOTHING, E_ARRIVE, E_OPEN, E_CLOSE, E_TAKE, E_PUT, E_APPLY, E_LOOK, E_INV, E_START = range(10)


def _numbered(types: jax.Array, count: int) -> jax.Array:
  """1-based instance numbers per type: the k-th slot of a type gets k."""
  same = (types[:, None] == types[None, :]) & (jnp.arange(count)[None, :] < jnp.arange(count)[:, None])
  return (jnp.sum(same, axis=1) + 1).astype(jnp.int32)


def start_receptacles(rec_type: jax.Array, goal_rec_type: jax.Array) -> jax.Array:
  """Where objects can start (a bool mask over ``rec_type``): present receptacles that
  are neither an appliance nor of the goal's type."""
  return ((rec_type >= 0) & (rec_type != SINK) & (rec_type != MICROWAVE)
          & (rec_type != FRIDGE) & (rec_type != goal_rec_type))


def reset(params: HouseholdParams, key: jax.Array, split: str = "train") -> State:
  """Generates a task from ``key`` (deterministic), from the goals of ``split``."""
  combos = _goal_combos(split)
  allowed = np.isin(combos[:, 0], [TASK_TYPES.index(t) for t in params.task_types])
  combos = jnp.asarray(combos[allowed])
  k_goal, k_rec, k_obj, k_loc = jax.random.split(key, 4)
  goal = combos[jax.random.randint(k_goal, (), 0, combos.shape[0])]
  nr, no = params.num_receptacles, params.num_objects

  # receptacles: the three appliances, one of the goal type, one where things start
  # (neither an appliance nor of the goal type), then random others
  k_rec, k_start = jax.random.split(k_rec)
  rest = jax.random.choice(k_rec, len(RECEPTACLES), (R_MAX,), replace=True)
  start_ok = start_receptacles(jnp.arange(len(RECEPTACLES)), goal[2])
  start = jax.random.categorical(k_start, jnp.where(start_ok, 0.0, -jnp.inf))
  fixed = jnp.array([SINK, MICROWAVE, FRIDGE], jnp.int32)
  rec_type = jnp.concatenate([fixed, goal[2:3], start[None], rest[: R_MAX - 5]]).astype(jnp.int32)
  appliance = (rec_type == SINK) | (rec_type == MICROWAVE) | (rec_type == FRIDGE)
  extra = jnp.arange(R_MAX) >= 5
  # at most one of each appliance: replace extra appliance draws by a cabinet
  rec_type = jnp.where(extra & appliance, RECEPTACLES.index("cabinet"), rec_type)
  rec_type = jnp.where(jnp.arange(R_MAX) < nr, rec_type, -1)
  rec_num = _numbered(rec_type, R_MAX)

  # objects: goal objects first (goal_count of them, two at least for pick2), then
  # random others
  others = jax.random.choice(k_obj, len(OBJECTS), (O_MAX,), replace=True)
  obj_type = jnp.where(jnp.arange(O_MAX) < _need(params, goal), goal[1], others)
  obj_type = jnp.where(jnp.arange(O_MAX) < no, obj_type, -1).astype(jnp.int32)
  obj_num = _numbered(obj_type, O_MAX)
  ok = start_receptacles(rec_type, goal[2])  # never empty: slot 4
  logits = jnp.where(ok, 0.0, -jnp.inf)
  obj_loc = jax.random.categorical(k_loc, logits, shape=(O_MAX,)).astype(jnp.int32)
  obj_loc = jnp.where(obj_type >= 0, obj_loc, -2)
  openable = jnp.asarray(_OPENABLE)[jnp.maximum(rec_type, 0)] & (rec_type >= 0)
  rec_open = ~openable  # openable receptacles start closed
  false = jnp.zeros((O_MAX,), bool)
  return State(rec_type, rec_num, rec_open, obj_type, obj_num, obj_loc, false, false, false,
               jnp.int32(-1), jnp.int32(-1), goal.astype(jnp.int32), jnp.int32(0),
               jnp.bool_(False), jnp.bool_(False), jnp.zeros((R_MAX,), bool))


# ---------------------------------------------------------------------- actions
def _find(types, nums, type_word, num_word, type_words):
  """Slot whose (type, number) words match, or -1."""
  t = jnp.argmax(type_words == type_word)
  t = jnp.where(jnp.any(type_words == type_word), t, -2)
  n = jnp.argmax(_NUM_WORD == num_word) + 1
  n = jnp.where(jnp.any(_NUM_WORD == num_word), n, -2)
  hit = (types == t) & (nums == n)
  return jnp.where(jnp.any(hit), jnp.argmax(hit), -1).astype(jnp.int32)


def parse_action(state: State, tokens: jax.Array) -> jax.Array:
  """``[ACTION_LEN]`` word ids -> ``[3]`` (verb, object slot, receptacle slot); verb -1
  when the words are not a command of this room."""
  tok = jnp.concatenate([tokens.astype(jnp.int32), jnp.full((8,), PAD, jnp.int32)])
  verb = jnp.where(jnp.any(_VERB_WORD == tok[0]), jnp.argmax(_VERB_WORD == tok[0]), -1)

  def rec_at(i):
    return _find(state.rec_type, state.rec_num, tok[i], tok[i + 1], _REC_WORD)

  def obj_at(i):
    return _find(state.obj_type, state.obj_num, tok[i], tok[i + 1], _OBJ_WORD)

  def ends(i):  # nothing but padding / <eos> from position i on
    rest = jnp.arange(tok.shape[0]) >= i
    return jnp.all(~rest | (tok == PAD) | (tok == EOS))

  w = WORD_ID
  go = (tok[1] == w["to"]) & ends(4)
  one_rec = ends(3)
  take = (tok[3] == w["from"]) & ends(6)
  put = (tok[3] == w["in/on"]) & ends(6)
  apply = (tok[3] == w["with"]) & ends(6)
  bare = ends(1)
  shape_ok = jnp.select(
      [verb == V_GO, (verb == V_OPEN) | (verb == V_CLOSE) | (verb == V_EXAMINE),
       verb == V_TAKE, verb == V_PUT, (verb >= V_CLEAN) & (verb <= V_COOL),
       (verb == V_LOOK) | (verb == V_INV)],
      [go, one_rec, take, put, apply, bare], False)
  rec = jnp.select([verb == V_GO, (verb == V_OPEN) | (verb == V_CLOSE) | (verb == V_EXAMINE),
                    (verb >= V_TAKE) & (verb <= V_COOL)],
                   [rec_at(2), rec_at(1), rec_at(4)], -1)
  obj = jnp.where((verb >= V_TAKE) & (verb <= V_COOL), obj_at(1), -1)
  needs_rec = (verb >= V_GO) & (verb <= V_EXAMINE)
  needs_obj = (verb >= V_TAKE) & (verb <= V_COOL)
  ok = shape_ok & (~needs_rec | (rec >= 0)) & (~needs_obj | (obj >= 0))
  return jnp.where(ok, jnp.stack([verb, obj, rec]), jnp.array([-1, -1, -1])).astype(jnp.int32)


def _done_objects(state: State) -> jax.Array:
  """``[O_MAX]`` bool: objects that already count towards the goal (right type, right
  state, in a receptacle of the goal type)."""
  task, otype, rtype = state.goal[0], state.goal[1], state.goal[2]
  placed_rec = jnp.where(state.obj_loc >= 0, state.rec_type[jnp.maximum(state.obj_loc, 0)], -1)
  cond = jnp.select([task == 1, task == 2, task == 3],
                    [state.obj_clean, state.obj_hot, state.obj_cool], jnp.ones_like(state.obj_clean))
  return (state.obj_type == otype) & (placed_rec == rtype) & cond


def _need(params: HouseholdParams, goal: jax.Array) -> jax.Array:
  """How many objects the goal asks for."""
  pick2 = goal[0] == TASK_TYPES.index("pick2")
  return jnp.where(pick2, max(2, params.goal_count), params.goal_count)


def goal_satisfied(params: HouseholdParams, state: State) -> jax.Array:
  return jnp.sum(_done_objects(state)) >= _need(params, state.goal)


def step(params: HouseholdParams, state: State, action: jax.Array) -> tuple[State, StepOut]:
  """Applies ``action`` (``[ACTION_LEN]`` word ids, see :func:`encode_action`)."""
  verb, obj, rec = parse_action(state, action)
  here = state.agent_loc
  at_rec = (rec >= 0) & (rec == here)
  rec_i = jnp.maximum(rec, 0)
  obj_i = jnp.maximum(obj, 0)
  openable = jnp.asarray(_OPENABLE)[jnp.maximum(state.rec_type[rec_i], 0)]
  accessible = state.rec_open[rec_i]
  holding_obj = (obj >= 0) & (state.holding == obj)
  rtype = state.rec_type[rec_i]

  go_ok = (verb == V_GO) & (rec >= 0)
  open_ok = (verb == V_OPEN) & at_rec & openable & ~state.rec_open[rec_i]
  close_ok = (verb == V_CLOSE) & at_rec & openable & state.rec_open[rec_i]
  take_ok = ((verb == V_TAKE) & at_rec & accessible & (state.holding < 0)
             & (state.obj_loc[obj_i] == rec))
  put_ok = (verb == V_PUT) & at_rec & accessible & holding_obj
  appliance = jnp.asarray(_APPLIANCE_OF)[jnp.clip(verb - V_CLEAN + 1, 0, 4)]
  apply_ok = ((verb >= V_CLEAN) & (verb <= V_COOL) & at_rec & holding_obj
              & (rtype == appliance))
  examine_ok = (verb == V_EXAMINE) & at_rec
  look_ok = verb == V_LOOK
  inv_ok = verb == V_INV
  live = ~state.done
  valid = live & (go_ok | open_ok | close_ok | take_ok | put_ok | apply_ok | examine_ok
                  | look_ok | inv_ok)

  def upd(cond, new, old):
    return jnp.where(valid & cond, new, old)

  rec_mask = jnp.arange(R_MAX) == rec
  obj_mask = jnp.arange(O_MAX) == obj
  new = state._replace(
      agent_loc=upd(go_ok, rec, state.agent_loc),
      rec_open=jnp.where(valid & open_ok & rec_mask, True,
                         jnp.where(valid & close_ok & rec_mask, False, state.rec_open)),
      holding=upd(take_ok, obj, upd(put_ok, -1, state.holding)),
      obj_loc=jnp.where(valid & take_ok & obj_mask, -1,
                        jnp.where(valid & put_ok & obj_mask, rec, state.obj_loc)),
      obj_clean=state.obj_clean | (valid & apply_ok & (verb == V_CLEAN) & obj_mask),
      obj_hot=state.obj_hot | (valid & apply_ok & (verb == V_HEAT) & obj_mask),
      obj_cool=state.obj_cool | (valid & apply_ok & (verb == V_COOL) & obj_mask),
      turn=state.turn + live.astype(jnp.int32),
      # arriving at an open receptacle or opening one shows what is inside
      rec_seen=state.rec_seen | (rec_mask & valid & ((go_ok & state.rec_open[rec_i]) | open_ok)),
  )
  won = live & goal_satisfied(params, new)
  done = state.done | won | (new.turn >= params.max_turns)
  new = new._replace(done=done, won=state.won | won)
  kind = jnp.select([~valid, go_ok, open_ok, close_ok, take_ok, put_ok, apply_ok,
                     examine_ok | look_ok, inv_ok],
                    [E_NOTHING, E_ARRIVE, E_OPEN, E_CLOSE, E_TAKE, E_PUT, E_APPLY, E_LOOK, E_INV],
                    E_NOTHING)
  event = jnp.stack([kind, verb, obj, rec]).astype(jnp.int32)
  return new, StepOut(event, won.astype(jnp.float32), done, new.won, live & ~valid)


# ---------------------------------------------------------------------- text
def action_tokens(state: State, verb, obj, rec) -> jax.Array:
  """Word ids ``[ACTION_LEN]`` of the command (verb, object slot, receptacle slot)."""
  w = WORD_ID
  verb = jnp.asarray(verb, jnp.int32)
  ow = jnp.asarray(_OBJ_WORD)[jnp.maximum(state.obj_type[jnp.maximum(obj, 0)], 0)]
  on = jnp.asarray(_NUM_WORD)[jnp.clip(state.obj_num[jnp.maximum(obj, 0)] - 1, 0, 8)]
  rw = jnp.asarray(_REC_WORD)[jnp.maximum(state.rec_type[jnp.maximum(rec, 0)], 0)]
  rn = jnp.asarray(_NUM_WORD)[jnp.clip(state.rec_num[jnp.maximum(rec, 0)] - 1, 0, 8)]
  vw = jnp.asarray(_VERB_WORD)[jnp.clip(verb, 0, len(VERBS) - 1)]
  p = PAD
  prep = jnp.select([verb == V_TAKE, verb == V_PUT], [w["from"], w["in/on"]], w["with"])
  rows = jnp.stack([
      jnp.stack([vw, w["to"], rw, rn, p, p, p, p]),  # go
      jnp.stack([vw, rw, rn, p, p, p, p, p]),  # open / close / examine
      jnp.stack([vw, ow, on, prep, rw, rn, p, p]),  # take / put / clean / heat / cool
      jnp.stack([vw, p, p, p, p, p, p, p]),  # look / inventory
  ])
  form = jnp.select([verb == V_GO, (verb == V_OPEN) | (verb == V_CLOSE) | (verb == V_EXAMINE),
                     (verb >= V_TAKE) & (verb <= V_COOL)], [0, 1, 2], 3)
  return rows[form].astype(jnp.int32)


def candidate_actions(state: State) -> jax.Array:
  """Every command that could name something in this room, ``[N, 3]`` (verb, obj, rec)."""
  del state
  rec = np.arange(R_MAX)
  obj = np.arange(O_MAX)
  rows = [(V_GO, -1, r) for r in rec] + [(v, -1, r) for v in (V_OPEN, V_CLOSE, V_EXAMINE)
                                         for r in rec]
  rows += [(v, o, r) for v in (V_TAKE, V_PUT, V_CLEAN, V_HEAT, V_COOL) for o in obj for r in rec]
  rows += [(V_LOOK, -1, -1), (V_INV, -1, -1)]
  return jnp.asarray(np.array(rows, np.int32))


def admissible(params: HouseholdParams, state: State) -> tuple[jax.Array, jax.Array]:
  """``(tokens [N, ACTION_LEN], ok [N])``: the commands that do something now
  (decided by running :func:`step` on each of them)."""
  cands = candidate_actions(state)
  exists = jnp.where(cands[:, 2] >= 0, state.rec_type[jnp.maximum(cands[:, 2], 0)] >= 0, True)
  exists &= jnp.where(cands[:, 1] >= 0, state.obj_type[jnp.maximum(cands[:, 1], 0)] >= 0, True)
  tokens = jax.vmap(lambda c: action_tokens(state, c[0], c[1], c[2]))(cands)
  invalid = jax.vmap(lambda t: step(params, state, t)[1].invalid)(tokens)
  return tokens, exists & ~invalid & ~state.done


def expert_action(state: State, search: bool = False, skips: tuple[int, ...] = ()) -> jax.Array:
  """A planner's next command. Privileged (``search=False``): a shortest plan to the
  goal, going straight to where the goal objects lie. Searching: the same plan over the
  goal objects the agent has seen; while it has seen none, the next receptacle in the
  first observation's order that it has not looked into (appliances and receptacles of
  the goal's type skipped: nothing starts there), opened if closed. ``skips``: task type
  ids whose treatment it leaves out (:attr:`HouseholdParams.expert_skips`): the object
  goes to the goal receptacle as it is, and is taken out and put back until the turns
  run out."""
  task, otype, rtype = state.goal[0], state.goal[1], state.goal[2]
  cand = (state.obj_type == otype) & ~_done_objects(state) & (state.obj_loc >= 0)
  if search:
    cand &= state.rec_seen[jnp.maximum(state.obj_loc, 0)]
  target_obj = jnp.argmax(cand).astype(jnp.int32)
  here = state.agent_loc
  h = jnp.maximum(state.holding, 0)
  holding_goal = (state.holding >= 0) & (state.obj_type[h] == otype)
  appliance_type = jnp.asarray(_APPLIANCE_OF)[task]
  treated = jnp.select([task == 1, task == 2, task == 3],
                       [state.obj_clean[h], state.obj_hot[h], state.obj_cool[h]], True)
  treated |= jnp.isin(task, jnp.asarray(skips, jnp.int32)) if skips else False
  appliance = jnp.argmax(state.rec_type == appliance_type).astype(jnp.int32)
  goal_rec = jnp.argmax(state.rec_type == rtype).astype(jnp.int32)
  sink = jnp.argmax(state.rec_type == SINK).astype(jnp.int32)

  def reach(rec, then_verb, then_obj):  # go there, open it if closed, then act
    return jnp.where(here != rec, jnp.array([V_GO, -1, rec]),
                     jnp.where(~state.rec_open[rec], jnp.array([V_OPEN, -1, rec]),
                               jnp.stack([then_verb, then_obj, rec])))

  treat_verb = jnp.select([task == 1, task == 2], [V_CLEAN, V_HEAT], V_COOL)
  at_appliance = jnp.where(here != appliance, jnp.array([V_GO, -1, appliance]),
                           jnp.stack([treat_verb, state.holding, appliance]))
  fetch = reach(state.obj_loc[target_obj], jnp.int32(V_TAKE), target_obj)
  if search:
    searchable = start_receptacles(state.rec_type, rtype) & ~state.rec_seen
    nxt = jnp.argmax(searchable).astype(jnp.int32)
    look_in = jnp.where(here != nxt, jnp.array([V_GO, -1, nxt]), jnp.array([V_OPEN, -1, nxt]))
    fetch = jnp.where(jnp.any(cand), fetch, look_in)
  plan = jnp.where(
      holding_goal,
      jnp.where(treated, reach(goal_rec, jnp.int32(V_PUT), state.holding), at_appliance),
      jnp.where(state.holding >= 0, reach(sink, jnp.int32(V_PUT), state.holding),  # wrong object
                fetch))
  return action_tokens(state, plan[0], plan[1], plan[2])


def _compact(parts, length: int) -> jax.Array:
  tokens = jnp.concatenate([jnp.atleast_1d(t) for t, _ in parts])
  keep = jnp.concatenate([jnp.broadcast_to(m, jnp.atleast_1d(t).shape) for t, m in parts])
  pos = jnp.cumsum(keep) - 1
  pos = jnp.where(keep & (pos < length), pos, length)
  return jnp.full((length,), PAD, jnp.int32).at[pos].set(tokens.astype(jnp.int32), mode="drop")


def _w(*words):
  return jnp.array([WORD_ID[x] for x in words], jnp.int32)


def _rec_words(state, r):
  return jnp.stack([jnp.asarray(_REC_WORD)[jnp.maximum(state.rec_type[r], 0)],
                    jnp.asarray(_NUM_WORD)[jnp.clip(state.rec_num[r] - 1, 0, 8)]])


def _obj_words(state, o):
  return jnp.stack([jnp.asarray(_OBJ_WORD)[jnp.maximum(state.obj_type[o], 0)],
                    jnp.asarray(_NUM_WORD)[jnp.clip(state.obj_num[o] - 1, 0, 8)]])


def _listing(state, present):
  """Pieces for "a mug 1 , a apple 2" over object slots where ``present``."""
  first = present & (jnp.cumsum(present) == 1)
  parts = []
  for o in range(O_MAX):
    parts.append((_w(","), present[o] & ~first[o]))
    parts.append((jnp.concatenate([_w("a"), _obj_words(state, o)]), present[o]))
  parts.append((_w("nothing"), ~jnp.any(present)))
  return parts


def _rec_listing(state):
  present = state.rec_type >= 0
  first = present & (jnp.cumsum(present) == 1)
  parts = []
  for r in range(R_MAX):
    parts.append((_w(","), present[r] & ~first[r]))
    parts.append((jnp.concatenate([_w("a"), _rec_words(state, r)]), present[r]))
  return parts


def task_tokens(state: State, goal_count: int = 1) -> jax.Array:
  """The goal as words: "put a clean mug in/on cabinet" ("put two mug ...", "put 3 hot
  mug ..." for more than one)."""
  task, otype, rtype = state.goal[0], state.goal[1], state.goal[2]
  adjective = jnp.select([task == 1, task == 2, task == 3], [WORD_ID["clean"], WORD_ID["hot"],
                                                             WORD_ID["cool"]], PAD)
  need = jnp.where(task == 4, max(2, goal_count), goal_count)
  count = jnp.asarray(_NUM_WORD)[jnp.clip(need - 1, 0, 8)]
  parts = [(_w("put"), True), (count, need > 2), (_w("two"), need == 2), (_w("a"), need == 1),
           (adjective, task != 0), (jnp.asarray(_OBJ_WORD)[otype], True),
           (_w("in/on"), True), (jnp.asarray(_REC_WORD)[rtype], True)]
  parts = [(t, m & (t != PAD)) for t, m in parts]
  return _compact(parts, 12)


def observe(params: HouseholdParams, state: State, event: jax.Array) -> jax.Array:
  """The observation text of ``event`` (from :class:`StepOut`) as ``[OBS_LEN]`` word ids.

  ``event = initial_event()`` gives the first observation of an episode."""
  kind, verb, obj, rec = event[0], event[1], event[2], event[3]
  r = jnp.maximum(rec, 0)
  o = jnp.maximum(obj, 0)
  rw, ow = _rec_words(state, r), _obj_words(state, o)
  inside = (state.obj_loc == rec) & (rec >= 0) & (state.obj_type >= 0)
  is_open = state.rec_open[r]
  openable = jnp.asarray(_OPENABLE)[jnp.maximum(state.rec_type[r], 0)]
  shows = (kind == E_ARRIVE) | ((kind == E_LOOK) & (verb == V_EXAMINE)) | (kind == E_OPEN)
  apply_word = jnp.select([verb == V_CLEAN, verb == V_HEAT], [WORD_ID["clean"], WORD_ID["heat"]],
                          WORD_ID["cool"])
  carrying = state.holding >= 0
  hw = _obj_words(state, jnp.maximum(state.holding, 0))
  parts = [
      (_w("you", "are", "in", "the", "middle", "of", "a", "room", ".", "looking", "quickly",
          "around", "you", ",", "you", "see"), kind == E_START),
      *[(t, m & (kind == E_START)) for t, m in _rec_listing(state)],
      (_w(".", "your", "task", "is", "to", ":"), kind == E_START),
      (task_tokens(state, params.goal_count), kind == E_START),
      (_w("nothing", "happens"), kind == E_NOTHING),
      (jnp.concatenate([_w("you", "arrive", "at"), rw, _w(".")]), kind == E_ARRIVE),
      (jnp.concatenate([_w("you", "open", "the"), rw, _w(".")]), kind == E_OPEN),
      (jnp.concatenate([_w("you", "close", "the"), rw]), kind == E_CLOSE),
      (jnp.concatenate([_w("you", "pick", "up", "the"), ow, _w("from", "the"), rw]), kind == E_TAKE),
      (jnp.concatenate([_w("you", "put", "the"), ow, _w("in/on", "the"), rw]), kind == E_PUT),
      (jnp.concatenate([_w("you"), apply_word[None], _w("the"), ow, _w("using", "the"), rw]),
       kind == E_APPLY),
      (jnp.concatenate([_w("you", "are", "facing", "the"), rw]),
       (kind == E_LOOK) & (verb == V_LOOK) & (state.agent_loc >= 0)),
      (_w("you", "are", "in", "the", "middle", "of", "a", "room"),
       (kind == E_LOOK) & (verb == V_LOOK) & (state.agent_loc < 0)),
      # contents of a receptacle
      (jnp.concatenate([_w("the"), rw, _w("is", "closed")]), shows & openable & ~is_open),
      (jnp.concatenate([_w("on", "the"), rw, _w(",", "you", "see")]),
       shows & ~openable),
      (jnp.concatenate([_w("in", "it", ",", "you", "see")]), shows & openable & is_open),
      *[(t, m & shows & is_open) for t, m in _listing(state, inside)],
      (_w("you", "are", "carrying", ":", "a"), (kind == E_INV) & carrying),
      (hw, (kind == E_INV) & carrying),
      (_w("you", "are", "not", "carrying", "anything"), (kind == E_INV) & ~carrying),
      (_w("."), kind != E_START),
  ]
  return _compact(parts, OBS_LEN)


def initial_event() -> jax.Array:
  return jnp.array([E_START, -1, -1, -1], jnp.int32)


def decode(tokens) -> str:
  """Word ids -> text (stops at the first padding; punctuation attached)."""
  words = []
  for t in np.asarray(tokens).tolist():
    if t == PAD:
      break
    words.append(VOCAB[t] if 0 <= t < len(VOCAB) else "<unk>")
  text = " ".join(words)
  for p in (" .", " ,", " :"):
    text = text.replace(p, p[1:])
  return text[:1].upper() + text[1:]


def encode_action(text: str) -> np.ndarray:
  """Command text -> ``[ACTION_LEN]`` word ids (unknown words -> ``<unk>``; "in" / "on"
  -> "in/on"; extra words make the action invalid, not truncated silently)."""
  words = text.lower().replace(",", " ").replace(".", " ").split()
  words = ["in/on" if w in ("in", "on") else w for w in words]
  ids = [WORD_ID.get(w, UNK) for w in words]
  if len(ids) > ACTION_LEN:
    ids = ids[:ACTION_LEN - 1] + [UNK]  # over-long: keeps it unparseable
  return np.array(ids + [PAD] * (ACTION_LEN - len(ids)), np.int32)


# ---------------------------------------------------------------------- device protocol
def _anchor(state: State) -> jax.Array:
  """A non-negative int32 hash (31 bits of FNV-1a over the words of every field but the
  turn count and the flags) of what the agent can act on: equal states at different
  turns share it."""
  fields = (state.rec_type, state.rec_num, state.rec_open, state.obj_type, state.obj_num,
            state.obj_loc, state.obj_clean, state.obj_hot, state.obj_cool, state.agent_loc,
            state.holding, state.goal)
  words = jnp.concatenate([jnp.ravel(f).astype(jnp.uint32) for f in fields])

  def mix(h, w):
    return (h ^ w) * jnp.uint32(16777619), None

  h, _ = jax.lax.scan(mix, jnp.uint32(2166136261), words)
  return jax.lax.bitcast_convert_type(h & jnp.uint32(0x7FFFFFFF), jnp.int32)


@dataclasses.dataclass(frozen=True)
class HouseholdEnv:
  """The household family behind :class:`atod_jax.envs.base.DeviceEnv` (one episode per
  call; the rollout vmaps)."""

  params: HouseholdParams = HouseholdParams()

  prompt_len = OBS_LEN
  action_len = ACTION_LEN
  vocab_size = len(VOCAB)
  pad_id, eos_id, unk_id = PAD, EOS, UNK

  @property
  def max_turns(self) -> int:
    return self.params.max_turns

  def reset(self, key, split):
    return reset(self.params, key, split)

  def first_observation(self, state):
    return observe(self.params, state, initial_event())

  def step(self, state, command):
    new, out = step(self.params, state, command)
    return new, DeviceStep(out.reward, out.invalid, out.event)

  def observe(self, state, event):
    return observe(self.params, state, event)

  def status(self, state):
    return state.done, state.won, state.turn

  def expert(self, state, key, noise):
    k_flip, k_pick = jax.random.split(key)
    cands = candidate_actions(state)
    pick = cands[jax.random.randint(k_pick, (), 0, cands.shape[0])]
    noisy = jax.random.uniform(k_flip) < noise
    command = jnp.where(noisy, action_tokens(state, pick[0], pick[1], pick[2]),
                        expert_action(state, self.params.expert == "searching",
                                      self.params.skip_ids))
    return command.astype(jnp.int32), noisy

  def anchor(self, state):
    return _anchor(state)


def device_env(env_config) -> HouseholdEnv:
  """The registry's constructor: ``env.preset`` names the difficulty."""
  return HouseholdEnv(HouseholdParams.preset(env_config.preset))
