"""ATOD on the real ALFWorld games, tiny models, CPU-sized.

    python -m atod_jax.main --config configs/alfworld_tiny.py --workdir runs/alfworld

Needs the `alfworld` extra and the games (../shared/data/alfworld/json_2.1.1, or
$ALFWORLD_DATA/json_2.1.1, or --config.env.options.data_dir=...). Trains on valid_train
(200 games), evaluates on valid_seen (140) with per-task-type success. The paper's
limit is 50 turns; 30 here keeps a CPU run short (--config.env.max_turns=50 for the
paper's). ALFWorld itself is slow (0.65 s to reset a new game, ~65 ms a step): most of a step's time
is the environment.
"""
from atod_jax.train import defaults as d


def get_config():
  c = d.tiny_text_run("alfworld", max_turns=30, train_split="valid_train",
                      eval_split="valid_seen", prompt_len=160, response_len=16, obs_len=40, vocab=1024,
                      options=dict(data_dir=""))
  c.eval.episodes = 140
  c.eval.report_splits = ("valid_seen", "valid_unseen")  # as papers report ALFWorld
  # the expert is not re-planned off its plan (a re-plan can take minutes), so the
  # demonstrations are clean ones
  c.teacher.build.expert_noise = 0.0
  c.student.sft.expert_noise = 0.0
  return c
