# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Placements under `jax.set_mesh` with Explicit ("sharding in types") axes.

Under a mesh whose axes are Explicit (`jax.make_mesh`'s default since JAX
0.9), an array's sharding is part of its type, and JAX refuses a
contraction over a sharded axis unless told how to shard its output. The
statistics are such contractions: `x^T x` over the batch's rows. They are
all summed into replicated factors (`out_sharding=P()`: each device
contracts its own rows, then one all-reduce), as they would be with Auto
axes. Gradients of sharded parameters (FSDP, tensor-parallel layers) are
gathered for their products with the replicated inverses (`gathered`) and
the updates placed as the parameters are (`like`). Outside such a mesh
nothing changes.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

Array = jax.Array


def context_mesh() -> Any:
  """The abstract mesh set by `jax.set_mesh` (hashable; empty outside one).

  Returns:
    `jax.sharding.get_abstract_mesh()`.
  """
  return jax.sharding.get_abstract_mesh()


def replicated() -> Optional[P]:
  """`P()` under a mesh with Explicit axes, else None (let JAX choose).

  Returns:
    The `out_sharding` for a sum over the batch.
  """
  mesh = context_mesh()
  explicit = any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ()))
  return P() if explicit else None


def gathered(x: Array) -> Array:
  """`x` replicated under a mesh with Explicit axes (else unchanged).

  Args:
    x: an array, possibly sharded (a gradient of FSDP parameters).

  Returns:
    `x`, whole on every device.
  """
  return x if replicated() is None else jax.sharding.reshard(x, P())


def like(x: Array, reference: Array) -> Array:
  """`x` sharded as `reference` under a mesh with Explicit axes (else unchanged).

  Args:
    x: an array of `reference`'s shape.
    reference: an array whose sharding `x` takes.

  Returns:
    `x`, resharded.
  """
  if replicated() is None:
    return x
  return jax.sharding.reshard(x, jax.typeof(reference).sharding.spec)


def row_products(a: Array, b: Array) -> Array:
  """`a^T b`, summing over the rows (axis 0) of `a` and `b`, replicated.

  Args:
    a: shape `(rows, m)`.
    b: shape `(rows, n)`.

  Returns:
    Shape `(m, n)`.
  """
  return jnp.matmul(a.T, b, out_sharding=replicated())


def vdot(a: Array, b: Array) -> Array:
  """`Σ a b` over every axis (`jnp.vdot` of real arrays), replicated.

  Args:
    a: an array.
    b: an array of the same shape.

  Returns:
    A scalar.
  """
  return jnp.sum(a * b)


def einsum(subscripts: str, *operands: Array) -> Array:
  """`jnp.einsum`, its result replicated under a mesh with Explicit axes.

  Args:
    subscripts: the einsum's subscripts.
    *operands: its operands.

  Returns:
    The einsum.
  """
  return jnp.einsum(subscripts, *operands, out_sharding=replicated())
