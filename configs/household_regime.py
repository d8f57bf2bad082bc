"""The paper's regime on the household family: an imperfect teacher the reward exposes.

    python experiments/compare_methods.py --config configs/household_regime.py \\
        --workdir runs/regime --methods atod,opd,grpo,gkd,atod_fixed,atod_uniform \\
        --seeds 0,1,2,3,4

* Task: the ``regime`` preset (pick / clean / heat / cool, one object, 8 receptacles to
  search, 30 turns). Its planner searches the room and never cools: a cool task's object
  goes to its receptacle warm, which the reward does not accept. The teacher is cloned
  from that planner, so it fails the quarter of the tasks that need cooling while the
  reward (and only the reward) says so: the RL term has something to find that the
  teacher cannot show.
* Teacher: 3 layers, hidden 128, built by behaviour cloning on the flawed planner's
  episodes (shared by every method of a comparison: ``<workdir>/teacher``).
* Student: 2 layers, hidden 64, a short warm start (weak on purpose).
* Every method: the same budget (100 steps of 8 tasks x 8 rollouts), the same
  optimizer settings (the base's), the same teacher and evaluation episodes;
  ``student_best`` is chosen on new tasks of the training goals, reported on held-out
  goals.

Calibration (teacher and student success at step 0) and the comparison: see
experiments/RESULTS.md ("The paper's regime").
"""
from atod_jax.train import defaults as d


def get_config():
  c = d.base("atod")
  c.env = d.household_env("regime", obs_len=24)

  # teacher: cloned from the planner that never cools
  c.teacher = d.built_teacher(d.tiny_model(128, 3, 2, 384), demo_episodes=2048,
                              sft_steps=300, select_every=50)
  # student: smaller, a short warm start
  c.student = d.warm_started_student(d.tiny_model(64, 2, 2, 192), demo_episodes=64,
                                     steps=100)

  # the run
  c.objective.anneal_steps = 50
  c.train.steps = 100
  c.eval.select_split = "train"
  return c
