# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Polyak iterate averaging (K-FAC section 13).

The paper evaluates an exponentially decayed average of the iterates,

    θ̄_k = (1 - ξ_k) θ̄_{k-1} + ξ_k θ_k,    ξ_k = max(1/k, 1 - decay),

so the first iterate is taken as is, the next ones are averaged uniformly
(the 1/k phase) until `1/k` falls to `1 - decay`, and from there on the
average decays exponentially. The average is for evaluation only: training
continues from θ_k. It averages parameters, not updates, so it is not an
optax transform; call `update` after `optax.apply_updates`:

    averaging = polyak_average(0.99)
    avg_state = averaging.init(params)
    ...
    params = optax.apply_updates(params, updates)
    avg_state = averaging.update(avg_state, params)
    eval_params = averaged_params(avg_state, params)

The average is kept in float32, or in the parameters' dtype where it is wider
(float64), so that bfloat16 parameters do not lose the small `ξ_k` steps.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


class PolyakState(NamedTuple):
  """State of `polyak_average`.

  Attributes:
    count: `k`, the number of iterates averaged so far (int32 scalar).
    average: `θ̄_k`, the parameters' structure, float32 or wider.
  """
  count: Array
  average: Any


class PolyakAveraging(NamedTuple):
  """The pure functions of `polyak_average`.

  Attributes:
    init: `params -> PolyakState`, with `count = 0`.
    update: `(state, params) -> PolyakState`, averaging in one more iterate.
  """
  init: Callable[[Any], PolyakState]
  update: Callable[[PolyakState, Any], PolyakState]


def _average_dtype(x: Any) -> jnp.dtype:
  return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)


def polyak_average(decay: float = 0.99) -> PolyakAveraging:
  """Exponentially decayed average of the iterates (K-FAC section 13).

  Args:
    decay: in [0, 1); the average forgets at rate `1 - decay` per step once
      `k > 1 / (1 - decay)`. `decay = 0` keeps only the latest iterate.

  Returns:
    `PolyakAveraging(init, update)`, both pure and jit-able. `init(params)`
    holds a copy of `params` with `count = 0`; the first `update` replaces it
    with the first iterate (`ξ_1 = 1`).

  Raises:
    ValueError: if `decay` is not in [0, 1).
  """
  try:
    in_range = bool(0.0 <= decay < 1.0)
  except TypeError:  # None, a string, ...
    in_range = False
  if not in_range:
    raise ValueError(
        f"polyak_average: decay must be in [0, 1), got {decay!r}; use e.g. "
        "decay=0.99 (an average over about the last 100 iterates), or decay=0 "
        "to keep only the latest parameters.")

  def init_fn(params: Any) -> PolyakState:
    average = jax.tree.map(lambda p: jnp.asarray(p, _average_dtype(p)), params)
    return PolyakState(jnp.zeros([], jnp.int32), average)

  def update_fn(state: PolyakState, params: Any) -> PolyakState:
    count = optax.safe_int32_increment(state.count)

    def mix(average: Array, param: Any) -> Array:
      dtype = average.dtype
      xi = jnp.maximum(1 / count.astype(dtype), jnp.asarray(1 - decay, dtype))
      return (1 - xi) * average + xi * jnp.asarray(param, dtype)

    return PolyakState(count, jax.tree.map(mix, state.average, params))

  return PolyakAveraging(init_fn, update_fn)


def averaged_params(state: PolyakState, like_params: Any) -> Any:
  """The average cast back to the parameters' dtypes, for evaluation.

  Args:
    state: a `PolyakState`.
    like_params: parameters with the average's structure; only their dtypes
      are read.

  Returns:
    `θ̄_k` with each leaf in the dtype of the matching leaf of `like_params`.
  """
  return jax.tree.map(lambda a, p: a.astype(jnp.asarray(p).dtype),
                                state.average, like_params)
