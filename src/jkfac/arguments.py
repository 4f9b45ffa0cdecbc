# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The estimator's arguments, checked: its options at set-up, each call's, the factor dtype.

Each check raises an error that names the problem and the fix.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from jkfac import trees
from jkfac.blocks import dense

MODES = ("fisher", "empirical", "exact")


def check_options(mode: str, stats_fraction: float, curvature_fraction: float,
                  weight_sharing: str, fisher_samples: Any) -> None:
  """Checks `jkfac.estimator`'s options.

  Args:
    mode: the estimation mode.
    stats_fraction: the fraction of the batch the statistics use.
    curvature_fraction: the fraction the quadratic model's products use.
    weight_sharing: `"expand"` or `"reduce"`.
    fisher_samples: targets sampled per example.

  Raises:
    ValueError: an option out of its range, with what to pass instead.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}: 'fisher' samples "
                     "targets from the model (the true Fisher, the default), "
                     "'empirical' uses the data's targets, 'exact' the expectation.")
  for name, fraction in (("stats_fraction", stats_fraction),
                         ("curvature_fraction", curvature_fraction)):
    if not 0.0 < fraction <= 1.0:
      raise ValueError(f"{name} must be in (0, 1], got {fraction}: the fraction of the "
                       "batch used, e.g. 0.125 for its first eighth, 1 for all of it.")
  if weight_sharing not in dense.WEIGHT_SHARING:
    raise ValueError(f"weight_sharing must be one of {dense.WEIGHT_SHARING}, got "
                     f"{weight_sharing!r}: 'expand' (every row an example, the "
                     "default) or 'reduce' (rows aggregated per example).")
  if not hasattr(fisher_samples, "__index__") or fisher_samples < 1:  # an int
    raise ValueError(f"fisher_samples must be a positive integer (targets sampled per "
                     f"example), got {fisher_samples!r}; use 1 (the default) or more.")


def batch_axes_of(batch_axes: Any, batch_argnums: Optional[Sequence[int]], count: int) -> Any:
  """`batch_axes`, or the axes `batch_argnums` stands for.

  Args:
    batch_axes: as given to `jkfac.estimator`.
    batch_argnums: as given to `jkfac.estimator`.
    count: the number of arguments after `params`.

  Returns:
    The batch axes (None: found from the batch's size).

  Raises:
    ValueError: both given, or an index out of range.
  """
  if batch_argnums is None:
    return batch_axes
  if batch_axes is not None:
    raise ValueError("Pass batch_axes or batch_argnums, not both.")
  numbers = (batch_argnums,) if isinstance(batch_argnums, int) else tuple(batch_argnums)
  if any(not isinstance(i, int) or not 0 <= i < count for i in numbers):
    raise ValueError(f"batch_argnums must be indices into the {count} argument(s) "
                     f"after params, got {batch_argnums!r}.")
  return tuple(0 if i in numbers else None for i in range(count))


def align(tree: Any, canonical_tree: Any, param_shapes: Sequence[tuple[tuple[int, ...], Any]],
          paths: Sequence[str], where: str, partial: bool
          ) -> tuple[trees.View, list[Optional[Any]]]:
  """Lines a pytree up with the parameters (`jkfac.trees.view`), checking shapes.

  Args:
    tree: the parameters, or a pytree shaped as them.
    canonical_tree: the parameters' structure, Variables unwrapped.
    param_shapes: the set-up's `(shape, dtype)` per parameter leaf.
    paths: each leaf's path, for the messages.
    where: the caller, for the messages.
    partial: whether parameters may be masked out (`optax.MaskedNode`).

  Returns:
    The view and the leaves per parameter leaf (None where masked).

  Raises:
    ValueError: the structure or a leaf's shape differs, or a parameter is
      masked where none may be.
  """
  tree_view, leaves = trees.view(tree, canonical_tree, where)
  if not partial and not all(tree_view.present):
    raise ValueError(
        f"{where}: parameters are masked out (optax.MaskedNode); this needs all of "
        "them. Call the estimator with the whole model's parameters; only a transform "
        "(jkfac.kfac, scale_by_kfac) may be given a part of them, by optax's "
        "multi_transform, partition or masked.")
  for leaf, (shape, _), path in zip(leaves, param_shapes, paths):
    if leaf is not None and tuple(jnp.shape(leaf)) != shape:
      raise ValueError(f"{where}: parameter {path!r} has shape "
                       f"{tuple(jnp.shape(leaf))}, the estimator expects {shape}. Pass "
                       "arrays shaped as the parameters given to jkfac.estimator, or "
                       "build a new estimator for the new shapes.")
  return tree_view, leaves


def check_call(flat_params: Sequence[Any], args: Sequence[Any], rng: Any,
               param_shapes: Sequence[tuple[tuple[int, ...], Any]], paths: Sequence[str],
               num_args: int, mode: str) -> None:
  """Checks a call `est(params, *args, rng=key)`: the set-up's dtypes and arguments, a key.

  Args:
    flat_params: the parameters' leaves.
    args: the arguments after `params`.
    rng: the key given, or None.
    param_shapes: the set-up's `(shape, dtype)` per parameter leaf.
    paths: each leaf's path, for the messages.
    num_args: the set-up's number of arguments after `params`.
    mode: the estimation mode (`"fisher"` needs a key).

  Raises:
    ValueError: another dtype or number of arguments, or no key in mode
      `"fisher"`.
    TypeError: `rng` is not a key.
  """
  for leaf, (_, dtype), path in zip(flat_params, param_shapes, paths):
    if jnp.result_type(leaf) != dtype:
      raise ValueError(
          f"est(params, ...): parameter {path!r} has dtype {jnp.result_type(leaf)}, "
          f"the estimator was built with {dtype}. Pass parameters of the set-up's dtypes, "
          "or build a new estimator (and optimizer) with the new ones: the factor dtype "
          "and the layer table follow the parameters given to jkfac.estimator.")
  if len(args) != num_args:
    raise ValueError(
        f"est(params, *args): got {len(args)} argument(s) after params, the estimator "
        f"was built with {num_args}. Pass the arguments given to jkfac.estimator "
        "(new shapes are fine), or build another estimator for another signature.")
  if mode != "fisher":
    return
  if rng is None:
    raise ValueError("mode='fisher' samples targets from the model: call "
                     "est(params, *args, rng=key) with a jax.random key.")
  dtype = getattr(rng, "dtype", None)
  if dtype is None or not (jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
                           or dtype == jnp.uint32):
    got = repr(rng) if dtype is None else f"an array of dtype {dtype}"
    raise TypeError(f"rng must be a jax.random key, got {got}. Pass "
                    "rng=jax.random.key(seed) (or jax.random.PRNGKey(seed)), a new one "
                    "each step: jax.random.fold_in(key, step).")


def resolve_factor_dtype(factor_dtype: Any, param_dtypes: Sequence[Any]) -> Any:
  """The factor dtype: the one asked for, checked, or the parameters' default.

  Args:
    factor_dtype: None, or the dtype asked for (`jnp.float32`, `jnp.float64`).
    param_dtypes: the dtypes of the inexact parameters.

  Returns:
    float32 or float64 (None: float32, or the widest parameter dtype if wider).

  Raises:
    ValueError: a dtype other than float32 or float64, or float64 without
      `jax_enable_x64`.
  """
  if factor_dtype is None:
    return jnp.result_type(jnp.float32, *param_dtypes)
  try:
    dtype = jnp.dtype(factor_dtype)
  except TypeError as e:
    raise ValueError(f"factor_dtype must be jnp.float32 or jnp.float64 (or None), got "
                     f"{factor_dtype!r}.") from e
  if dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(
        f"factor_dtype={dtype.name} is not supported: factors and their inverses in half "
        "precision lose the moving averages' small (1 - decay) increments (8 or 11 "
        "significant bits), float16 underflows the output derivatives' second moments, "
        "and a Cholesky factorisation of a damped factor needs more digits than that. "
        "Keep the parameters in half precision and leave factor_dtype=None (float32): "
        "the statistics are accumulated in float32 and the updates come back in the "
        "parameters' dtype.")
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
    raise ValueError(f"factor_dtype must be jnp.float32 or jnp.float64 (or None), got "
                     f"{dtype.name}.")
  if dtype == jnp.float64 and not jax.config.read("jax_enable_x64"):
    raise ValueError(
        "factor_dtype=float64 needs 64-bit JAX: call "
        "jax.config.update('jax_enable_x64', True) at start-up (or set "
        "JAX_ENABLE_X64=1), or use factor_dtype=jnp.float32.")
  return dtype
