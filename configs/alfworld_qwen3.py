"""ATOD on ALFWorld with a Qwen3 student and teacher from local HF directories, the
paper's hyperparameters (GPU / TPU).

    python -m atod_jax.main --config configs/alfworld_qwen3.py --workdir runs/alf_q3 \\
        --config.student.path=/models/Qwen3-0.6B --config.teacher.path=/models/teacher-4B

The paper's settings: 150 steps, 8 tasks x G = 8 rollouts, actor learning rate 1e-6,
rollout temperature 1.0, validation temperature 0.4, kappa 1 -> 0.1 and rho 1 -> 2
linearly over 80 steps, clip 0.2, no KL penalty, 50 turns; students Qwen3-0.6B / 1.7B /
4B, a GRPO-trained Qwen3-4B teacher (Qwen3-30B-A3B for the 4B student). Point
student.path at the size you train; the tokenizer is the student's.

Training uses ALFWorld's full train split (3,553 games: `alfworld-download`, then
$ALFWORLD_DATA); with only the shared data, pass --config.env.train_split=valid_train.

Prompts as the paper's (verl-agent): each turn the prompt is rendered afresh through
the student's chat template (the task, the last 2 observation/action pairs, the current
observation, the admissible commands, the format instructions; at most 2,048 tokens)
and the student answers <think>...</think><action>...</action> in at most 512 tokens
(env.layout="window"; "context" plays the episode as one growing context instead).
Memory: each layer is rematerialised in the backward pass (model.remat) and a
mini-batch's gradient is accumulated over 8 slices of 2 trajectories (optim.microbatches);
raise microbatches if a step does not fit, lower it if it does with room to spare.
The 1.7B student on v5e-8 needs --config.optim.microbatches=16.
The 4B student with the Qwen3-30B-A3B teacher on v5e-8 needs
--config.optim.optimizer=adafactor --config.optim.microbatches=32
--config.teacher.offload=True (the teacher's weights in host memory; docs/scaling.md).
"""
from atod_jax.train import defaults as d

MAX_TURNS = 50


def get_config():
  c = d.paper_run(d.text_env(
      "alfworld", max_turns=MAX_TURNS, layout="window", history=2, prompt_len=2048,
      response_len=512, obs_len=0, workers=16, step_timeout=600.0, train_split="train",
      eval_split="valid_seen", eval_batch=64, tokenizer="student", vocab=0,
      tokenizer_episodes=0, options=dict(data_dir="")))
  c.eval.report_splits = ("valid_seen", "valid_unseen")  # as papers report ALFWorld
  return c
