"""Frozen dataclasses from plain config dicts: every field's type checked once, by name.

The one typed parser of the project: the run specs (:mod:`mrl_jax.train.specs`),
each task's spec and ``config.input`` (:mod:`mrl_jax.data.images`) are all parsed
here. A bool must be a bool, an int an int (not a bool, not a float), a float
finite; closed choices are ``Literal`` types checked by value; nested sections
are dataclasses; a union of sections is chosen by their ``name`` field; a field
the dataclass does not have is refused by name.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from mrl_jax.core.nesting import Nesting


class SpecError(ValueError):
  """A config value that does not fit its spec (the message names ``config.FIELD``)."""


def parse(cls: type, values: Mapping[str, Any], where: str) -> Any:
  """``cls(**values)`` with every field's type checked against ``cls``'s annotations.

  Args:
    cls: one of the frozen spec dataclasses.
    values: its fields (a ConfigDict or dict); missing ones take the defaults.
    where: the config path for messages, e.g. ``"config.optim"``.

  Raises:
    SpecError: naming ``where.FIELD``: an unknown field (or one that moved), a
      value of the wrong type, a closed choice out of its values, a bound broken.
  """
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise SpecError(f"{where} has no field {unknown[0]!r}; its fields: {sorted(names)}")
  kwargs = {k: typed_value(v, hints[k], f"{where}.{k}") for k, v in values.items()}
  return cls(**kwargs)


def typed_value(value: Any, hint: Any, where: str) -> Any:
  """``value`` checked (and, for nested specs, parsed) against the type ``hint``.

  Raises:
    SpecError: naming ``where``: a value of the wrong type or out of its choices.
  """
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin is typing.Union or origin is types.UnionType:
    if value is None and type(None) in args:
      return None
    options = [a for a in args if a is not type(None)]
    if len(options) > 1:
      return _tagged(value, options, where)
    return typed_value(value, options[0], where)
  if dataclasses.is_dataclass(hint):
    return _section(value, hint, where)
  if origin is Literal:
    if value not in args:
      raise SpecError(f"{where}={value!r}; choose one of {args}")
    return value
  if origin is dict:
    if not isinstance(value, Mapping):
      raise SpecError(f"{where}={value!r} must be a dict")
    return {typed_value(k, args[0], f"{where} key"): typed_value(v, args[1], f"{where}[{k!r}]")
            for k, v in value.items()}
  if origin is tuple:
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
      raise SpecError(f"{where}={value!r} must be a tuple")
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(typed_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
      raise SpecError(f"{where}={value!r} must have {len(args)} entries")
    pairs = enumerate(zip(value, args, strict=True))
    return tuple(typed_value(v, a, f"{where}[{i}]") for i, (v, a) in pairs)
  if hint is bool:
    if not isinstance(value, bool):
      raise SpecError(f"{where}={value!r} must be True or False")
    return value
  if hint is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise SpecError(f"{where}={value!r} must be an int")
    return value
  if hint is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      raise SpecError(f"{where} must be a finite number, got {value!r}")
    return float(value)
  if hint is str:
    if not isinstance(value, str):
      raise SpecError(f"{where}={value!r} must be a string")
    return value
  raise TypeError(f"{where}: no parser for {hint!r}")  # a spec field of an unsupported type


def _section(value: Any, cls: type, where: str) -> Any:
  """A nested spec (``config.encoder``): a sub-dict parsed field by field, or a parsed spec."""
  if isinstance(value, cls):
    return value
  if hasattr(value, "to_dict"):  # an ml_collections ConfigDict at the boundary
    value = value.to_dict()
  if not isinstance(value, Mapping):
    raise SpecError(f"{where}={value!r} must be a dict of the fields of {cls.__name__}")
  return parse(cls, value, where)


def _tagged(value: Any, options: list[type], where: str) -> Any:
  """One of several nested specs, chosen by the value of their ``name`` field (a Literal)."""
  by_name = {typing.get_args(typing.get_type_hints(c)["name"])[0]: c for c in options}
  name = value.get("name") if isinstance(value, Mapping) else getattr(value, "name", None)
  if name not in by_name:
    raise SpecError(f"{where}.name={name!r}; choose one of {tuple(by_name)}")
  return _section(value, by_name[name], where)


def as_json(spec: Any) -> Any:
  """A JSON-able copy of a spec (bundle and checkpoint metadata): dicts, lists, scalars.

  Nested specs become dicts of their fields, tuples lists, a :class:`Nesting`
  its dims and weights.
  """
  if isinstance(spec, Nesting):
    return {"dims": list(spec.dims), "weights": list(spec.weights)}
  if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
    return {f.name: as_json(getattr(spec, f.name)) for f in dataclasses.fields(spec)}
  if isinstance(spec, Mapping):
    return {str(k): as_json(v) for k, v in spec.items()}
  if isinstance(spec, (tuple, list)):
    return [as_json(v) for v in spec]
  return spec
