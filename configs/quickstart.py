"""Quickstart: ATOD on the on-device household task family, tiny models, CPU-sized.

    python -m atod_jax.main --config configs/quickstart.py --workdir runs/quick

About 5 minutes on a 2-core CPU (the teacher's build included). It prints the student
against its teacher on held-out goal combinations and writes curves.png and results.md
(README shows what one run printed). Override any field, e.g.
``--config.method=grpo --config.train.steps=40``.

* Task: the ``easy`` household preset (pick-and-place goals, 15 turns); evaluation on
  held-out goal combinations, ``student_best`` chosen on new tasks of the training goals.
* Teacher: 3 layers, hidden 128, built on the first run by behaviour cloning on 2,048
  noise-injected expert episodes (300 steps, keeping its best parameters) and cached in
  the workdir.
* Student: 2 layers, hidden 64, warm-started by 200 steps of behaviour cloning on 64.
* ATOD: 100 steps of 8 tasks x 8 rollouts, kappa 1 -> 0.1 and rho 1 -> 2 over the first
  50 steps.

Every other field and its default: atod_jax/train/defaults.py.
"""
from atod_jax.train import defaults as d


def get_config():
  c = d.base("atod")
  c.env = d.household_env("easy", obs_len=24)

  # teacher: 2,048 demonstrations / 300 steps (512 / 150 left one build seed in three
  # near 0.05 held-out success: experiments/teacher_seeds.py)
  c.teacher = d.built_teacher(d.tiny_model(128, 3, 2, 384), demo_episodes=2048,
                              sft_steps=300)
  # student: smaller, a short warm start
  c.student = d.warm_started_student(d.tiny_model(64, 2, 2, 192), demo_episodes=64,
                                     steps=200)

  # the run
  c.rollout.update(tasks_per_step=8, group_size=8)
  c.objective.anneal_steps = 50
  c.train.steps = 100
  c.eval.select_split = "train"
  return c
