"""``python -m atod_jax.main --config configs/quickstart.py --workdir runs/quick``

Parses the config (``--config.<field>=value`` overrides) and hands off to
:func:`atod_jax.train.train`. A bad config fails here in one line (exit 2): a missing
config file, a field that does not exist (with the nearest that does), a value of the
wrong type, and every check of :func:`atod_jax.train.validate`.
"""
import difflib
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from atod_jax.cache import use_compilation_cache
from atod_jax.train import ConfigError, TrainingDiverged, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "a get_config() file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, logs and results go")
flags.mark_flags_as_required(["config", "workdir"])
_SUGGESTION = re.compile(r'Did you mean "(\w+)" instead of "(\w+)"')


def _config_file(argv) -> str | None:
  """The ``--config`` file named on the command line (without a ``:param`` suffix)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1].split(":")[0]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":")[0]
  return None


def _no_such_file(path: str) -> str:
  folder = os.path.dirname(path) or "."
  near = difflib.get_close_matches(
      os.path.basename(path),
      sorted(f for f in os.listdir(folder) if f.endswith(".py")) if os.path.isdir(folder) else [],
      n=1)
  hint = f"; did you mean {os.path.join(os.path.dirname(path), near[0])}?" if near else ""
  return f"--config: no such file {path!r}{hint}"


def _unknown_field(error: Exception, argv) -> str:
  """One line for an override of a field the config does not have, naming the nearest."""
  text = str(error)
  found = _SUGGESTION.search(text)
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0]
    keys = path.split(".")
    bad = found.group(2) if found else None
    if bad in keys or (not found and keys[-1] in text):
      at = keys.index(bad) if bad in keys else len(keys) - 1
      hint = ""
      if found:
        hint = "; did you mean config." + ".".join(keys[:at] + [found.group(1)]) + "?"
      return (f"config.{path}: no such field{hint} (every field and its default: "
              "atod_jax/train/defaults.py)")
  return text.strip().splitlines()[0]


def _parse(argv):
  """absl's flag parsing with every failure as one ``error:`` line and exit 2."""
  path = _config_file(argv)
  if path is not None and not os.path.isfile(path):
    _fail(_no_such_file(path))
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e))
  except (AttributeError, KeyError) as e:  # an override of a field that does not exist
    _fail(_unknown_field(e, argv))
  except (TypeError, ValueError) as e:  # e.g. a field set below one that is not a section
    overrides = " ".join(a.split("=", 1)[0] for a in argv if a.startswith("--config."))
    _fail(f"{overrides}: does not fit the config ({str(e).strip().splitlines()[0]})")


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


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
  app.run(main, flags_parser=_parse)
