"""Independent numpy references for the objectives, written with plain loops.

They follow the formulas in shared/docs/atod-method.md directly and share no code with
atod_jax.objectives.
"""
import math

import numpy as np


def group_advantages(rewards, group_ids, estimator, valid=None, eps=1e-6):
  b = len(rewards)
  valid = np.ones(b, bool) if valid is None else np.asarray(valid, bool)
  out = np.zeros(b, np.float64)
  if estimator == "reinforce":
    base = np.mean([rewards[i] for i in range(b) if valid[i]]) if valid.any() else 0.0
    for i in range(b):
      out[i] = rewards[i] - base if valid[i] else 0.0
    return out
  for i in range(b):
    if not valid[i]:
      continue
    members = [rewards[j] for j in range(b) if valid[j] and group_ids[j] == group_ids[i]]
    n = len(members)
    if n < 2:
      continue
    mean = sum(members) / n
    if estimator == "drgrpo":
      out[i] = rewards[i] - mean
    elif estimator == "rloo":
      out[i] = rewards[i] - (sum(members) - rewards[i]) / (n - 1)
    else:
      std = math.sqrt(sum((x - mean) ** 2 for x in members) / (n - 1))
      out[i] = (rewards[i] - mean) / (std + eps)
  return out


def _minmax(values):
  lo, hi = min(values), max(values)
  if hi - lo < 1e-8:
    return [0.5] * len(values)
  return [(v - lo) / (hi - lo) for v in values]


def _combine(d, h, mode):
  return {
      "soft_or": 1 - (1 - d) * (1 - h), "token": 1 - (1 - d) * (1 - h),
      "disagreement": d, "uncertainty": h, "product": d * h, "uniform": 1.0,
  }[mode]


def turn_stats(student, teacher, turn_ids, mask):
  """Returns, per row, a dict turn -> (d, h, n)."""
  rows = []
  for i in range(student.shape[0]):
    acc = {}
    for t in range(student.shape[1]):
      k = int(turn_ids[i, t])
      if mask[i, t] and k >= 0:
        d, h, n = acc.get(k, (0.0, 0.0, 0))
        acc[k] = (d + abs(student[i, t] - teacher[i, t]), h - student[i, t], n + 1)
    rows.append({k: (d / n, h / n, n) for k, (d, h, n) in acc.items()})
  return rows


def tdur_weights(student, teacher, turn_ids, mask, mode):
  b, length = student.shape
  out = np.zeros((b, length))
  for i in range(b):
    gen = [t for t in range(length) if mask[i, t] and turn_ids[i, t] >= 0]
    if not gen:
      continue
    if mode == "token":
      dn = _minmax([abs(student[i, t] - teacher[i, t]) for t in gen])
      hn = _minmax([-student[i, t] for t in gen])
      for j, t in enumerate(gen):
        out[i, t] = _combine(dn[j], hn[j], mode)
      continue
    stats = turn_stats(student[i:i + 1], teacher[i:i + 1], turn_ids[i:i + 1], mask[i:i + 1])[0]
    turns = sorted(stats)
    dn = dict(zip(turns, _minmax([stats[k][0] for k in turns])))
    hn = dict(zip(turns, _minmax([stats[k][1] for k in turns])))
    for t in gen:
      k = int(turn_ids[i, t])
      out[i, t] = _combine(dn[k], hn[k], mode)
  return out


def aggregate(values, mask, mode):
  b = values.shape[0]
  if mode == "token_mean":
    n = mask.sum()
    return (values * mask).sum() / n if n else 0.0
  rows = []
  for i in range(b):
    n = mask[i].sum()
    if n == 0:
      continue
    s = (values[i] * mask[i]).sum()
    rows.append(s / n if mode == "seq_mean_token_mean" else s)
  return float(np.mean(rows)) if rows else 0.0


def clipped_loss(logp, old, adv, mask, eps_lo, eps_hi, dual, mode):
  per = np.zeros(logp.shape)
  clip = np.zeros(logp.shape)
  dual_on = np.zeros(logp.shape)
  ratio = np.ones(logp.shape)
  for idx in np.ndindex(*logp.shape):
    if not mask[idx]:
      continue
    r = math.exp(logp[idx] - old[idx])
    a = adv[idx]
    l1 = -a * r
    l2 = -a * min(max(r, 1 - eps_lo), 1 + eps_hi)
    loss = max(l1, l2)
    clip[idx] = l2 > l1
    if dual is not None and a < 0 and -a * dual < loss:
      loss = -a * dual
      dual_on[idx] = 1
    per[idx] = loss
    ratio[idx] = r
  kl = np.where(mask > 0, ratio - 1 - np.log(ratio), 0)
  metrics = {
      "clip_fraction": aggregate(clip, mask, "token_mean"),
      "dual_clip_fraction": aggregate(dual_on, mask, "token_mean"),
      "approx_kl": aggregate(kl, mask, "token_mean"),
      "ratio_mean": aggregate(ratio, mask, "token_mean"),
      "ratio_max": max([ratio[i] for i in np.ndindex(*mask.shape) if mask[i]], default=0.0),
  }
  return aggregate(per, mask, mode), metrics


def _log_softmax(z):
  z = z - z.max()
  return z - math.log(np.exp(z).sum())


def _kl(logp, logq):
  p = np.exp(logp)
  with np.errstate(invalid="ignore"):  # 0 * -inf where p is 0: taken as 0 below
    return float(np.sum(np.where(p > 0, p * (logp - logq), 0.0)))


def vocab_divergence(s_logits, t_logits, mask, kind, beta=0.5, temperature=1.0):
  b, length, _ = s_logits.shape
  out = np.zeros((b, length))
  for i in range(b):
    for t in range(length):
      if not mask[i, t]:
        continue
      ls = _log_softmax(s_logits[i, t].astype(np.float64) / temperature)
      lt = _log_softmax(t_logits[i, t].astype(np.float64) / temperature)
      if kind == "forward_kl":
        out[i, t] = _kl(lt, ls)
      elif kind == "reverse_kl":
        out[i, t] = _kl(ls, lt)
      else:
        m = beta * np.exp(lt) + (1 - beta) * np.exp(ls)
        lm = np.log(m)
        out[i, t] = beta * _kl(lt, lm) + (1 - beta) * _kl(ls, lm)
  return out


def step_advantages(turn_rewards, anchors, group_ids, num_turns, gamma, norm, valid=None,
                    eps=1e-6):
  """GiGPO's step-level advantages as verl-agent computes them: discounted returns,
  step groups keyed by (episode group, anchor) in a dict, mean / std per group (a
  singleton: mean 0, std 1)."""
  b, k = len(turn_rewards), len(turn_rewards[0])
  valid = np.ones(b, bool) if valid is None else np.asarray(valid, bool)
  returns = np.zeros((b, k))
  for i in range(b):
    running = 0.0
    for t in reversed(range(k)):
      running = turn_rewards[i][t] + gamma * running
      returns[i, t] = running
  groups = {}
  for i in range(b):
    for t in range(int(num_turns[i])):
      if valid[i] and anchors[i][t] >= 0:
        groups.setdefault((int(group_ids[i]), int(anchors[i][t])), []).append((i, t))
  out = np.zeros((b, k))
  for members in groups.values():
    values = [returns[i, t] for i, t in members]
    if len(values) == 1:
      mean, std = 0.0, 1.0
    else:
      mean = sum(values) / len(values)
      std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    for i, t in members:
      out[i, t] = returns[i, t] - mean if norm == "mean" else (returns[i, t] - mean) / (std + eps)
  return out


def adaptive_handoff(disagreements, window, decay, tol, anneal_steps, kappa0, kappa_min, rho0,
                     rho_max):
  """TIDE's trigger written out: e_0 = d_0, e_s = decay e_{s-1} + (1 - decay) d_s; the
  hand-off starts at s + 1 for the first s >= window with e_s >= (1 - tol) e_{s-window}; kappa and
  rho of each step (computed before its disagreement is known), then the linear anneal
  from the start. Returns (emas, start, [(kappa, rho) per step])."""
  emas, start, weights = [], -1, []
  for s, d in enumerate(disagreements):
    p = 0.0 if start < 0 else min(max((s - start) / max(anneal_steps, 1), 0.0), 1.0)
    weights.append((kappa0 + (kappa_min - kappa0) * p, rho0 + (rho_max - rho0) * p))
    e = d if s == 0 else decay * emas[-1] + (1 - decay) * d
    emas.append(e)
    if start < 0 and s >= window and e >= (1 - tol) * emas[s - window]:
      start = s + 1
  return emas, start, weights
