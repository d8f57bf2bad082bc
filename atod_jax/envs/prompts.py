"""Agent prompts in the style the ATOD paper used (verl-agent), and action extraction.

The model answers each turn with ``<think>...</think><action>...</action>``. The prompt
holds the task, a window of the last ``k`` (observation, action) pairs, the current
observation and, where the environment has them, the admissible commands.
"""
from __future__ import annotations

import re
from typing import NamedTuple, Sequence

SYSTEM = ("You are an expert agent operating in a household environment. You act by "
          "issuing one text command per turn.")

INSTRUCTIONS = (
    "Now it's your turn to take an action. You should first reason step-by-step about the "
    "current situation. This reasoning process MUST be enclosed within <think> </think> "
    "tags. Once you've finished your reasoning, you should choose an admissible action for "
    "the current step and present it within <action> </action> tags.")

# Search-QA's instructions (see ``atod_jax.envs.registry`` for every environment's).
SEARCH_INSTRUCTIONS = (
    "Now it's your turn. You should first reason step-by-step inside <think> </think>. "
    "Then either search with <search> query </search> (the top passages come back inside "
    "<information> </information>) or give the final answer with <answer> answer </answer>.")


_ACTION = re.compile(r"<action>(.*?)</action>", re.IGNORECASE | re.DOTALL)
_THINK = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)
MAX_ACTION_CHARS = 200


def render_prompt(
    task: str,
    observation: str,
    history: Sequence[tuple[str, str]] = (),
    admissible: Sequence[str] | None = None,
    *,
    window: int = 2,
    system: str = SYSTEM,
    instructions: str = INSTRUCTIONS,
) -> list[dict[str, str]]:
  """Chat messages for one turn.

  Args:
    task: the task text.
    observation: the current observation.
    history: all earlier ``(observation, action)`` pairs of the episode, oldest first;
      only the last ``window`` appear in the prompt.
    admissible: the admissible commands, if the environment lists them.
    window: history turns shown (the paper's "short history window").
    system, instructions: the system prompt and the closing format instructions
      (``atod_jax.envs.registry`` has them per environment).
  """
  step = len(history)
  lines = [f"Your task is to: {task}" + ("" if task.rstrip().endswith((".", "?", "!")) else ".")]
  if step:
    shown = history[-window:] if window > 0 else []
    lines.append(f"Prior to this step, you have already taken {step} step(s). Below are the "
                 f"most recent {len(shown)} observations and the corresponding actions you took:")
    first = step - len(shown) + 1
    for i, (obs, act) in enumerate(shown):
      lines.append(f"[Observation {first + i}: '{obs}', Action {first + i}: '{act}']")
  lines.append(f"You are now at step {step + 1} and your current observation is: {observation}")
  if admissible is not None:
    lines.append("Your admissible actions of the current situation are: ["
                 + ", ".join(f"'{a}'" for a in admissible) + "].")
  lines.append(instructions)
  return [{"role": "system", "content": system}, {"role": "user", "content": "\n".join(lines)}]


class ParsedAction(NamedTuple):
  action: str  # the command ("" when malformed)
  ok: bool  # well-formed
  reason: str  # why not, for the observation and the metrics


def extract_action(text: str | bytes | None, *, require_think: bool = True) -> ParsedAction:
  """The command inside exactly one ``<action>...</action>``; never raises.

  Malformed outputs (empty, no action tag, several action tags, an empty or over-long
  action, missing ``<think>`` when required, bytes that are not UTF-8) give
  ``ok = False`` with the reason; the caller applies its penalty.
  """
  if text is None:
    return ParsedAction("", False, "no output")
  if isinstance(text, (bytes, bytearray)):
    text = bytes(text).decode("utf-8", errors="replace")
  if not text.strip():
    return ParsedAction("", False, "empty output")
  found = _ACTION.findall(text)
  if not found:
    return ParsedAction("", False, "no <action>...</action> tag")
  if len(found) > 1:
    return ParsedAction("", False, f"{len(found)} <action> tags, expected one")
  action = " ".join(found[0].split()).lower()
  if not action:
    return ParsedAction("", False, "empty action")
  if len(action) > MAX_ACTION_CHARS:
    return ParsedAction("", False, f"action longer than {MAX_ACTION_CHARS} characters")
  if require_think and not _THINK.search(text):
    return ParsedAction(action, False, "no <think>...</think> before the action")
  return ParsedAction(action, True, "")


def invalid_format_note(reason: str) -> str:
  return (f"Invalid response ({reason}). Answer with <think>your reasoning</think> "
          "<action>one admissible action</action>.")
