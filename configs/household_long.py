"""The long-horizon household preset: three objects to clean / heat / cool and put away
(the searching planner, which acts only on what the agent has seen, needs 19-23 turns,
p10-p90 over 512 tasks; the other presets' 4-9), 30 turns allowed.
Otherwise the quickstart, with more cloning for both models: a 3-layer teacher built by
600 steps of behaviour cloning (300 left it at 0.25 held-out success, 600 at 0.56, one
build seed each; its selection success was still rising), a 2-layer student warm-started
by 400 steps on 2,048 expert episodes (0.15 held-out success: 200 steps on 256 left it at
0.01; seed 0), ATOD over
100 steps of 8 tasks x 8 rollouts. Made to test whether T-DUR's
turn weights matter once episodes are long, against a teacher that is good but not
perfect:

    python experiments/compare_methods.py --config configs/household_long.py \\
        --workdir runs/long --methods atod,atod_uniform --seeds 0,1,2,3,4

What it measured, on 4 seeds: experiments/RESULTS.md ("T-DUR on long episodes").
"""
from atod_jax.train import defaults as d


def get_config():
  c = d.base("atod")
  c.env = d.household_env("long", obs_len=24)

  # teacher: the quickstart's, cloned longer
  c.teacher = d.built_teacher(d.tiny_model(128, 3, 2, 384), demo_episodes=2048,
                              sft_steps=600, select_every=100)
  # student: warm-started on more demonstrations
  c.student = d.warm_started_student(d.tiny_model(64, 2, 2, 192), demo_episodes=2048,
                                     steps=400)

  # the run
  c.objective.anneal_steps = 50
  c.train.steps = 100
  c.eval.select_split = "train"
  return c
