"""The one-line config errors every validator raises (:mod:`atod_jax.train.config`,
:func:`atod_jax.train.methods.validate_objective`)."""
from __future__ import annotations


class ConfigError(ValueError):
  """A bad config value; the message is one line naming the field."""


def need(ok: bool, field: str, message: str) -> None:
  """Raises :class:`ConfigError` ``config.<field>: <message>`` unless ``ok``."""
  if not ok:
    raise ConfigError(f"config.{field}: {message}")


def get(config, field: str):
  """``config.a.b`` for ``field = "a.b"``."""
  value = config
  for part in field.split("."):
    value = value[part]
  return value


def choice(config, field: str, allowed) -> None:
  value = get(config, field)
  need(value in allowed, field, f"got {value!r}; allowed: {', '.join(map(str, allowed))}")


def number(config, field: str, *, low: float = 0.0, strict: bool = True) -> None:
  """A number ``> low`` (``strict``) or ``>= low``."""
  value = get(config, field)
  ok = isinstance(value, (int, float)) and (value > low if strict else value >= low)
  need(ok, field, f"must be {'>' if strict else '>='} {low:g}, got {value!r}")
