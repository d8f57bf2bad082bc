"""``python -m atod_jax.main --config configs/quickstart.py --workdir runs/quick``

Parses the config (``--config.<field>=value`` overrides) and hands off to
:func:`atod_jax.train.train`. A bad config fails here in one line.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from atod_jax.cache import use_compilation_cache
from atod_jax.train import ConfigError, TrainingDiverged, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "a get_config() file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, logs and results go")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  use_compilation_cache()
  try:
    result = train(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, TrainingDiverged) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2 if isinstance(e, ConfigError) else 3)
  if result.get("interrupted"):
    sys.exit(130)


if __name__ == "__main__":
  app.run(main)
