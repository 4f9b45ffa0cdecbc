# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Checks of the transforms' options and states, with errors that say the fix."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax
from typing_extensions import TypeAliasType

from jkfac.estimator import Estimator

Array = jax.Array
ScalarOrSchedule = TypeAliasType("ScalarOrSchedule", Union[float, Array, optax.Schedule])
"""A number, a scalar `jax.Array`, or an optax schedule (a function of the step count)."""


def python_number(value: Any) -> Optional[float]:
  """`value` as a float when it is a concrete number (not None, a schedule or a tracer)."""
  if value is None or callable(value) or isinstance(value, jax.core.Tracer):
    return None
  return float(value)


def check_numbers(checks: list[tuple[Any, Callable[[float], bool], str]]) -> None:
  """Raises `message.format(value)` for the first concrete `value` not `ok`."""
  for value, ok, message in checks:
    number = python_number(value)
    if number is not None and not ok(number):
      raise ValueError(message.format(value))


def initial_value(value: Any) -> Optional[float]:
  """A number, or a schedule's value at update 0, as a float (None if traced)."""
  if callable(value):
    value = value(jnp.zeros([], jnp.int32))
  return python_number(value)


def check_estimator(est: Any, where: str) -> None:
  """Raises a `TypeError` naming `jkfac.estimator` unless `est` is an `Estimator`."""
  if not isinstance(est, Estimator):
    raise TypeError(f"{where}: est must be the estimator made by jkfac.estimator, got "
                    f"{type(est).__name__}. Build it first: est = jkfac.estimator(loss_fn, "
                    f"params, *batch), then jkfac.{where}(est, ...).")


def check_state(state: Any, expected: type, where: str) -> None:
  """Raises a `TypeError` saying which state to pass unless `state` is an `expected`."""
  if not isinstance(state, expected):
    raise TypeError(f"{where}: the state is a {type(state).__name__}, not this transform's "
                    f"{expected.__name__}. Pass the state this optimizer made: "
                    "opt_state = tx.init(params), then opt_state from its previous update.")
