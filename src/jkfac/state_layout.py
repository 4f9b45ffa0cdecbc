# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The factors and inverses of the optimizer state split over a mesh's devices.

With `scale_by_kfac(..., mesh=mesh, shard_state=True)` each device keeps 1/D
of every factor and inverse (ZeRO's optimizer-state sharding, Rajbhandari et
al. 2020): an array is split along one axis over all the mesh's devices. A
`jax.Array` splits only evenly, and a dense layer's input factor has
`in + 1` rows, so that axis is padded with zeros to a multiple of D (the
axis whose padding is smallest; scalars stay replicated). The state's arrays
thus have padded shapes; the transform reads the logical arrays back
(`load`: gathered, then the padding cut off) where it needs them whole, to
factorise at a refresh and to precondition at each update.
"""

from __future__ import annotations

import fractions
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jkfac import sharding

Array = jax.Array
Shape = tuple[int, ...]


def split_axis(shape: Shape, devices: int) -> Optional[int]:
  """The axis to split an array of `shape` along: the one padded least.

  Padding an axis of `n` entries to a multiple of D multiplies the array's
  size by `ceil(n / D) D / n`; the axis with the smallest such factor is
  split (1 where some axis divides).

  Args:
    shape: the array's logical shape.
    devices: the number of devices D.

  Returns:
    The axis (the first of those tied), or None for a scalar or D = 1.
  """
  if not shape or devices == 1:
    return None
  return min(range(len(shape)),
             key=lambda axis: fractions.Fraction(_rounded_up(shape[axis], devices),
                                                 max(shape[axis], 1)))


def _rounded_up(n: int, devices: int) -> int:
  return -(-n // devices) * devices


def padded_shape(shape: Shape, devices: int) -> Shape:
  """`shape` with its split axis rounded up to a multiple of `devices`.

  Args:
    shape: the array's logical shape.
    devices: the number of devices D.

  Returns:
    The shape the state stores.
  """
  axis = split_axis(shape, devices)
  if axis is None:
    return tuple(shape)
  return tuple(_rounded_up(n, devices) if i == axis else n for i, n in enumerate(shape))


def spec(shape: Shape, mesh: jax.sharding.Mesh) -> P:
  """The `PartitionSpec` of a stored array of logical `shape` over all of `mesh`'s axes.

  Args:
    shape: the array's logical shape.
    mesh: the mesh.

  Returns:
    The split axis over all the mesh's axes, the others replicated.
  """
  axis = split_axis(shape, mesh.devices.size)
  if axis is None:
    return P()
  return P(*[tuple(mesh.axis_names) if i == axis else None for i in range(len(shape))])


def _place(x: Array, mesh: jax.sharding.Mesh, partition: P) -> Array:
  """`x` constrained to `partition` over `mesh` (a reshard under Explicit axes)."""
  if sharding.replicated() is not None:
    return jax.sharding.reshard(x, partition)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, partition))


def padded(x: Array, shape: Shape) -> Array:
  """A logical array zero-padded at the end of its axes to a stored `shape`.

  Args:
    x: the logical array.
    shape: the stored shape (`padded_shape`), at least `x`'s along every axis.

  Returns:
    `x` in `shape` (itself where the shapes are equal).
  """
  if tuple(x.shape) == tuple(shape):
    return x
  return jnp.pad(x, [(0, t - n) for n, t in zip(x.shape, shape)])


def store(tree: Any, mesh: Optional[jax.sharding.Mesh]) -> Any:
  """Logical arrays as the state holds them: padded and split over `mesh`.

  Args:
    tree: a pytree of logical arrays (factors or inverses).
    mesh: the mesh; None: `tree` unchanged (a state not split).

  Returns:
    The same pytree of padded arrays, each split over the mesh's devices.
  """
  if mesh is None:
    return tree
  devices = mesh.devices.size

  def one(x: Array) -> Array:
    return _place(padded(x, padded_shape(x.shape, devices)), mesh, spec(x.shape, mesh))

  return jax.tree.map(one, tree)


def keep(tree: Any, shapes: Any, mesh: Optional[jax.sharding.Mesh]) -> Any:
  """Stored arrays computed from stored ones, kept split over `mesh`.

  Args:
    tree: a pytree of stored arrays (a moving average of stored factors).
    shapes: the matching pytree of logical shapes (anything with `.shape`).
    mesh: the mesh; None: `tree` unchanged.

  Returns:
    `tree`, each array constrained to its split.
  """
  if mesh is None:
    return tree
  return jax.tree.map(lambda x, s: _place(x, mesh, spec(s.shape, mesh)), tree, shapes)


def load(tree: Any, shapes: Any) -> Any:
  """The logical arrays of stored ones: gathered and cut to `shapes`.

  Args:
    tree: a pytree of stored arrays (padded and split, or not).
    shapes: the matching pytree of logical shapes (anything with `.shape`).

  Returns:
    The logical arrays, whole on every device (unchanged where not padded).
  """
  def one(x: Array, like: Any) -> Array:
    whole = sharding.gathered(x)
    if tuple(x.shape) == tuple(like.shape):
      return whole
    return whole[tuple(slice(0, n) for n in like.shape)]

  return jax.tree.map(one, tree, shapes)


def zeros(shapes: Any, mesh: Optional[jax.sharding.Mesh]) -> Any:
  """Stored all-zero arrays for logical `shapes`, made on the host and placed.

  Args:
    shapes: a pytree of `jax.ShapeDtypeStruct` (logical shapes).
    mesh: the mesh; None: whole arrays on the default device (a state not split).

  Returns:
    Padded zero arrays, each split over the mesh's devices.
  """
  if mesh is None:
    return jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype)), shapes)
  devices = mesh.devices.size
  return jax.tree.map(
      lambda s: jax.device_put(np.zeros(padded_shape(s.shape, devices), s.dtype),
                               NamedSharding(mesh, spec(s.shape, mesh))), shapes)


def bytes_per_device(tree: Any) -> int:
  """The bytes of `tree`'s arrays on its most loaded device.

  Args:
    tree: a pytree of `jax.Array` (an optimizer state).

  Returns:
    The largest over this process's devices of the bytes each holds (a
    replicated array counts whole on every device).
  """
  held: dict[Any, int] = {}
  for x in jax.tree.leaves(tree):
    shard = math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
    for device in x.sharding.addressable_devices:
      held[device] = held.get(device, 0) + shard
  return max(held.values(), default=0)
