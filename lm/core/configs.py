"""ConfigDict helpers: the parts packages contribute to a config, overrides, and configs saved by earlier runs.

A run's config is one locked `ml_collections.ConfigDict` assembled from parts:
every package that reads fields declares them once, with their defaults, in a
`ConfigPart` (dotted key -> default) beside a `validate(config, mode)` of its
own. `compose` builds the ConfigDict and refuses a field two parts declare, so
no default is written twice; `lm.config.base_config` is the composition.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import numbers
import os
from typing import Any, Callable, Iterable, Mapping

import ml_collections

from lm.core.errors import ConfigError

Validator = Callable[[ml_collections.ConfigDict, str], None]


def require(condition: bool, message: str) -> None:
  """Raises ConfigError(message) unless `condition` holds."""
  if not condition:
    raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class ConfigPart:
  """The fields one package reads (dotted key -> default) and the function that checks their values.

  `validate(config, mode)` sees the whole config (so it can check a field
  against another part's) and raises ConfigError naming the field and the fix.
  """

  owner: str  # the module that reads these fields, named in errors and docs
  fields: Mapping[str, Any]
  validate: Validator | None = None


def compose(parts: Iterable[ConfigPart]) -> ml_collections.ConfigDict:
  """One ConfigDict with every part's fields; a key declared by two parts is a ValueError naming both."""
  config = ml_collections.ConfigDict()
  owners: dict[str, str] = {}
  for part in parts:
    for dotted, default in part.fields.items():
      if dotted in owners:
        raise ValueError(f"config field {dotted!r} is declared by both {owners[dotted]} and {part.owner}; "
                         "declare it once, in the package that reads it.")
      owners[dotted] = part.owner
      node = config
      *groups, leaf = dotted.split(".")
      for group in groups:
        if group not in node:
          node[group] = ml_collections.ConfigDict()
        node = node[group]
      node[leaf] = _fresh(default)
  return config


def _fresh(default: Any) -> Any:
  """A default as a new ConfigDict value. A placeholder (FieldReference) is copied: configs holding the same
  reference would share it, and setting the field in one config would set it in every other."""
  if isinstance(default, ml_collections.FieldReference):
    return ml_collections.FieldReference(default.get(), field_type=default.get_type())
  return default


def validate_parts(parts: Iterable[ConfigPart], config: ml_collections.ConfigDict, mode: str) -> None:
  """Checks every field's type against its part's default, then runs every part's validator in order; the
  first problem raises ConfigError."""
  parts = tuple(parts)
  for part in parts:
    check_types(part, config)
  for part in parts:
    if part.validate is not None:
      part.validate(config, mode)


def _short_repr(value: Any, limit: int = 80) -> str:
  """repr(value) on one line, shortened (for a message)."""
  text = repr(value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _kind_of(default: Any) -> tuple[str, Callable[[Any], bool]] | None:
  """(what a field holding `default` takes, in words; the test of a value), or None when any value goes."""
  if isinstance(default, ml_collections.FieldReference):  # a placeholder: None (unset) or its type
    if default.get() is not None:
      return _kind_of(default.get())
    of_type = default.get_type()
    inner = _kind_of(of_type()) if of_type in (bool, int, float, str, tuple) else None
    if inner is None:
      return None
    kind, test = inner
    return f"{kind} (or None: unset)", lambda value: value is None or test(value)
  if isinstance(default, bool):
    return "True or False", lambda value: isinstance(value, bool)
  if isinstance(default, numbers.Integral):
    return "an integer", lambda value: isinstance(value, numbers.Integral) and not isinstance(value, bool)
  if isinstance(default, numbers.Real):
    return "a number", lambda value: isinstance(value, numbers.Real) and not isinstance(value, bool)
  if isinstance(default, str):
    return "a string", lambda value: isinstance(value, str)
  if isinstance(default, (tuple, list)):
    items = [_kind_of(item) for item in default]
    if not items or None in items or len({kind for kind, _ in items}) > 1:  # no one type of item to check
      return "a tuple", lambda value: isinstance(value, (tuple, list))
    item_kind, item_test = items[0]
    return (f"a tuple of items each {item_kind}",
            lambda value: isinstance(value, (tuple, list)) and all(item_test(item) for item in value))
  return None


def check_types(part: ConfigPart, config: ml_collections.ConfigDict) -> None:
  """ConfigError naming the first field of `part` whose value is not of its default's type (an int where a
  number goes is fine; None only where the default is an unset placeholder)."""
  for dotted, default in part.fields.items():
    node: Any = config
    for key in dotted.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or key not in node:
        node = _MISSING
        break
      node = node[key]
    kind = None if node is _MISSING else _kind_of(default)
    if kind is not None and not kind[1](node):
      shown = default.get() if isinstance(default, ml_collections.FieldReference) else default
      example = f" (the default is {_short_repr(shown)})" if shown is not None else ""
      got = "" if node is None else f" ({type(node).__name__})"
      raise ConfigError(f"config.{dotted} is {_short_repr(node)}{got}, but the field takes {kind[0]}. Fix: set "
                        f"--config.{dotted} to {kind[0]}{example}.")


_MISSING = object()


def unknown_key_message(dotted: str, node: ml_collections.ConfigDict) -> str:
  known = ", ".join(sorted(node.keys()))
  return f"Unknown config key {dotted!r}. Keys at that level: {known}. Check the spelling."


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted keys ("optim.lr") on a copy of `config`; unknown keys raise ConfigError."""
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy with the same schema
  for dotted, value in overrides.items():
    parent, _, leaf = dotted.rpartition(".")
    node = config
    for part in parent.split(".") if parent else []:
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise ConfigError(unknown_key_message(dotted, node))
      node = node[part]
    if leaf not in node:
      raise ConfigError(unknown_key_message(dotted, node))
    try:
      node[leaf] = value
    except (TypeError, ValueError):  # ConfigDict refuses a value of another type (or a dict with dotted keys)
      raise ConfigError(f"config.{dotted} cannot be {_short_repr(value)} ({type(value).__name__}): the field holds "
                        f"a {type(node[leaf]).__name__} ({_short_repr(node[leaf])}). Fix: give it a value of that "
                        "type.") from None
  config.lock()
  return config


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of an experiment file; `PATH:ARG` calls get_config(ARG) (as `--config PATH:ARG` does)."""
  argument = None
  if not os.path.exists(path) and ":" in path:
    path, argument = path.rsplit(":", 1)
  if not os.path.exists(path):
    raise ConfigError(f"Config file {path!r} does not exist; pick one from experiments/.")
  spec = importlib.util.spec_from_file_location("lm_experiment_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # type: ignore[union-attr]
  return module.get_config() if argument is None else module.get_config(argument)


def to_json_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Plain JSON-serializable dict of the config (tuples become lists)."""
  return ml_collections.ConfigDict(config).to_dict()


def _as_tuples(value: Any) -> Any:
  return tuple(_as_tuples(item) for item in value) if isinstance(value, list) else value


def merge_saved(schema: ml_collections.ConfigDict, saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """`saved` (a run's recorded config, JSON) written onto `schema` (today's defaults), in place; returns it.

  Keys the schema no longer has are dropped; keys it gained keep their
  defaults; JSON lists become the tuples the schema holds.
  """

  def merge(node: ml_collections.ConfigDict, values: Mapping[str, Any]) -> None:
    for key, value in values.items():
      if key not in node:
        continue
      if isinstance(node[key], ml_collections.ConfigDict):
        if isinstance(value, Mapping):
          merge(node[key], value)
        continue
      if isinstance(node[key], tuple) and isinstance(value, list):
        value = _as_tuples(value)
      try:
        node[key] = value
      except TypeError:  # a value of another type than today's default (e.g. None for a placeholder)
        with node.ignore_type():
          node[key] = value

  merge(schema, saved)
  return schema
