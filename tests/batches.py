"""Random padded multi-turn batches for the objective tests."""
import numpy as np


def random_batch(seed: int, batch: int, length: int, num_groups: int = 5):
  """A batch laid out like real rollouts, with the awkward cases forced in.

  Each row: a prompt (not generated), then turns of generated tokens separated by
  observation tokens, then padding. Row 0 is fully masked, row 1 has a single turn,
  row 2 has only one-token turns. Padding positions hold -inf / garbage log-probs that
  must never leak into a result. Groups are shuffled (not contiguous); group 0 has
  all-equal rewards.
  """
  rng = np.random.default_rng(seed)
  turn_ids = np.full((batch, length), -1, np.int32)
  for i in range(batch):
    if i == 0:
      continue
    pos = int(rng.integers(1, 5))
    max_turns = 1 if i == 1 else int(rng.integers(1, 8))
    for k in range(max_turns):
      g = 1 if i == 2 else int(rng.integers(1, 6))
      if pos >= length:
        break
      turn_ids[i, pos:pos + g] = k
      pos += g + int(rng.integers(0, 4))
  mask = (turn_ids >= 0).astype(np.float32)
  # Some generated tokens masked out inside a turn (e.g. truncated text), rarely.
  behaviour = -rng.exponential(1.5, (batch, length)).astype(np.float32)
  teacher = behaviour + rng.normal(0, 0.7, (batch, length)).astype(np.float32)
  teacher = np.minimum(teacher, 0.0)
  logp = behaviour + rng.normal(0, 0.3, (batch, length)).astype(np.float32)
  behaviour[mask == 0] = -np.inf
  teacher[mask == 0] = np.nan
  logp[mask == 0] = 123.0
  group_ids = rng.permutation(np.arange(batch) % num_groups).astype(np.int32)
  rewards = rng.integers(0, 2, batch).astype(np.float32) * rng.choice([1.0, 0.5], batch)
  rewards[group_ids == 0] = 1.0
  return dict(turn_ids=turn_ids, mask=mask, behaviour_logp=behaviour,
              teacher_logp=teacher, logp=logp, rewards=rewards.astype(np.float32),
              group_ids=group_ids, num_groups=num_groups)
