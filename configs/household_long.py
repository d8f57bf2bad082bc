"""The long-horizon household preset: three objects to clean / heat / cool and put away
(the searching planner, which acts only on what the agent has seen, needs 19-23 turns,
p10-p90 over 512 tasks; the other presets' 4-9), 30 turns allowed.
Otherwise the quickstart: a 3-layer teacher built by behaviour cloning, a 2-layer student
warm-started on 64 expert episodes, ATOD over 100 steps of 8 tasks x 8 rollouts. Made to
test whether T-DUR's turn weights matter once episodes are long:

    python experiments/compare_methods.py --config configs/household_long.py \\
        --workdir runs/long --methods atod,atod_uniform --seeds 0,1,2,3,4
"""
from atod_jax.train import defaults as d


def get_config():
  c = d.quickstart()
  c.env = d.household_env("long", obs_len=24)
  return c
