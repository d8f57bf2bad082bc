"""Prompt rendering: task, history window, admissible commands, format instructions."""
from atod_jax.envs.prompts import INSTRUCTIONS, extract_action, render_prompt


def test_prompt_first_turn_and_window():
  msgs = render_prompt("put a mug in/on cabinet", "You are in the middle of a room.",
                       admissible=["go to cabinet 1", "look"])
  assert [m["role"] for m in msgs] == ["system", "user"]
  text = msgs[1]["content"]
  assert text.startswith("Your task is to: put a mug in/on cabinet.")
  assert "Prior to this step" not in text
  assert "step 1 and your current observation is: You are in the middle of a room." in text
  question = render_prompt("Who wrote it?", "Question: Who wrote it?")[1]["content"]
  assert question.startswith("Your task is to: Who wrote it?\n")
  assert "['go to cabinet 1', 'look']" in text and text.endswith(INSTRUCTIONS)

  history = [(f"obs {i}", f"act {i}") for i in range(1, 6)]
  text = render_prompt("t", "obs 6", history, window=2)[1]["content"]
  assert "already taken 5 step(s)" in text and "most recent 2 observations" in text
  assert "[Observation 4: 'obs 4', Action 4: 'act 4']" in text
  assert "[Observation 5: 'obs 5', Action 5: 'act 5']" in text
  assert "obs 3" not in text and "admissible actions of the current situation" not in text
  assert "You are now at step 6" in text


def test_extract_action_normalises_whitespace_and_case():
  parsed = extract_action("<think>the mug\nis here</think>\n<ACTION>  Take  Mug 1\nfrom desk 1 </ACTION>")
  assert parsed.ok and parsed.action == "take mug 1 from desk 1"
  assert extract_action("<action>look</action>", require_think=False).ok
