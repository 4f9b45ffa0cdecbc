# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Which axis of each argument is the batch's: `batch_axes`, `batch_argnums`.

The estimator slices the batch for `stats_fraction`, `curvature_fraction`
and the per-example passes. By default every argument leaf whose leading
size is the batch size is sliced along axis 0; `batch_axes` (vmap-style, a
prefix pytree per argument) says otherwise.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from jkfac import tracing

Array = jax.Array


def check(batch_axes: Any, args: Sequence[Any]) -> Any:
  """`batch_axes` as one vmap-style entry per argument (None: the default rule)."""
  if batch_axes is None:
    return None
  if isinstance(batch_axes, int) or not isinstance(batch_axes, (tuple, list)):
    batch_axes = (batch_axes,) * len(args)
  batch_axes = tuple(batch_axes)
  if len(batch_axes) != len(args):
    raise ValueError(
        f"batch_axes has {len(batch_axes)} entries, but the loss function has "
        f"{len(args)} argument(s) after params. Give one entry per argument (an axis, "
        "None for an unbatched one, or a pytree of them), as jax.vmap's in_axes.")
  try:
    broadcast(batch_axes, tuple(args))
  except ValueError as e:
    raise ValueError(f"batch_axes {batch_axes} is not a prefix of the arguments' "
                     f"structure: {e}") from e
  return batch_axes


def broadcast(batch_axes: tuple[Any, ...], args: Any) -> list[Optional[int]]:
  """Per leaf of `args`, its axis from the prefix pytree `batch_axes`."""
  unbatched = object()
  spec = jax.tree.map(lambda a: unbatched if a is None else a, batch_axes,
                      is_leaf=lambda a: a is None)
  full = jax.tree.map(lambda axis, sub: jax.tree.map(lambda _: axis, sub), spec, tuple(args))
  return [None if a is unbatched else a
          for a in jax.tree.leaves(full, is_leaf=lambda a: a is unbatched)]


def sliced(flat_args: list[Array], axes: Sequence[Optional[int]], size: int) -> list[Array]:
  """The first `size` examples of every batched argument leaf."""
  return [a if axis is None else jax.lax.slice_in_dim(a, 0, size, axis=axis)
          for a, axis in zip(flat_args, axes)]


def leaf_axes(batch_axes: Any, flat_args: list[Any], args_tree: Any, n: int
              ) -> list[Optional[int]]:
  """Per argument leaf, its batch axis (None: not batched).

  Args:
    batch_axes: what `check` returned (None: the default rule).
    flat_args: the arguments' leaves.
    args_tree: their structure.
    n: the batch size.

  Returns:
    The `batch_axes` given at set-up, or by default axis 0 of every leaf
    whose leading size is the batch size `n`.
  """
  if batch_axes is None:
    return [0 if jnp.ndim(a) >= 1 and jnp.shape(a)[0] == n else None for a in flat_args]
  args = jax.tree.unflatten(args_tree, flat_args)
  axes = broadcast(batch_axes, args)
  for a, axis in zip(flat_args, axes):
    if axis is not None and not (-jnp.ndim(a) <= axis < jnp.ndim(a)
                                 and jnp.shape(a)[axis] == n):
      raise ValueError(
          f"batch_axes: an argument of shape {jnp.shape(a)} is said to be batched along "
          f"axis {axis}, but the batch has {n} examples (the losses' predictions' "
          "leading size). Give each batched argument's example axis, None for the "
          "others.")
  return [None if axis is None else axis % jnp.ndim(a) for a, axis in zip(flat_args, axes)]


def batch_size(program: tracing.Program, what: str) -> int:
  """The batch size: the leading size of every loss's prediction.

  Args:
    program: the traced program.
    what: the option or block that needs it, for the error message.

  Returns:
    The size.
  """
  sizes = {loss.prediction_shape[0] for loss in program.losses}
  if len(sizes) != 1:
    raise ValueError(f"{what} needs one batch size, but the losses' predictions have "
                     f"leading dimensions {sorted(sizes)}. Give every loss one "
                     "prediction per example of the batch (the same leading size).")
  return sizes.pop()
