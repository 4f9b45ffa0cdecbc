# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Work spread over the devices of a mapped axis (`pmap`, `shard_map`).

The factor inverses are the expensive part of a K-FAC step and every device
needs all of them. Rather than each device computing all of them, each
computes a share balanced by cost (`balanced_shares`, greedy on the cubic
cost of the factorisations), and the results are gathered: one `all_gather`
of each device's results, flattened into one vector padded to the largest
share, so that the communication is the results themselves and nothing is
all-reduced.
"""

from __future__ import annotations

import heapq
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jkfac import state_layout

Array = jax.Array


def axis_size(axis_name: Any) -> int:
  """The number of devices along a mapped axis (a static int).

  Must be called inside a function mapped over `axis_name`.

  Args:
    axis_name: the mapped axis (a name, or a tuple of names).

  Returns:
    Its size, a Python int (`psum` of the constant 1, which JAX evaluates
    statically).
  """
  return jax.lax.psum(1, axis_name)


def balanced_shares(costs: Sequence[float], devices: int) -> list[list[int]]:
  """Splits work items among devices so that the largest share is small.

  Longest-processing-time first: items by decreasing cost, each to the device
  with the least work so far (within 4/3 of the optimum).

  Args:
    costs: each item's cost.
    devices: the number of devices.

  Returns:
    Per device, the indices of its items, in increasing order.
  """
  heap = [(0.0, d) for d in range(devices)]
  shares: list[list[int]] = [[] for _ in range(devices)]
  for index in sorted(range(len(costs)), key=lambda i: -costs[i]):
    load, device = heapq.heappop(heap)
    shares[device].append(index)
    heapq.heappush(heap, (load + costs[index], device))
  return [sorted(s) for s in shares]


def cubic_cost(tree: Any) -> float:
  """The cost of factorising every square matrix in `tree` (sum of n³).

  Args:
    tree: a pytree of arrays; only their shapes are read.

  Returns:
    The sum over leaves whose two last axes are square, `(..., n, n)`, of
    `n³` times the number of such matrices in the leaf; other leaves cost 0.
  """
  return float(sum(math.prod(x.shape[:-2]) * x.shape[-1] ** 3
                   for x in jax.tree.leaves(tree)
                   if x.ndim >= 2 and x.shape[-1] == x.shape[-2]))


def spread(functions: Sequence[Callable[[], Any]], costs: Sequence[float],
           axis_name: Any) -> list[Any]:
  """Evaluates each function on one device of `axis_name`; all get every result.

  Must be called inside a function mapped over `axis_name`. The functions
  take no arguments (close over their inputs) and return pytrees of arrays
  of one floating dtype.

  Args:
    functions: the work items.
    costs: their costs, for the balance.
    axis_name: the mapped axis.

  Returns:
    The results, in the order of `functions`, on every device.
  """
  devices = axis_size(axis_name)
  if devices == 1 or len(functions) <= 1:
    return [f() for f in functions]
  shapes = [jax.eval_shape(f) for f in functions]
  dtypes = {leaf.dtype for s in shapes for leaf in jax.tree.leaves(s)}
  if len(dtypes) != 1:
    raise ValueError(f"spread: the results must share one dtype, got "
                     f"{sorted(map(str, dtypes))}. Cast every function's results to one "
                     "dtype (e.g. .astype(jnp.float32)) before spreading them.")
  dtype = dtypes.pop()
  sizes = [sum(leaf.size for leaf in jax.tree.leaves(s)) for s in shapes]
  shares = balanced_shares(costs, devices)
  width = max(1, max(sum(sizes[i] for i in share) for share in shares))

  def compute(share: list[int]) -> Array:
    leaves = [x.reshape(-1) for i in share for x in jax.tree.leaves(functions[i]())]
    flat = jnp.concatenate(leaves) if leaves else jnp.zeros([0], dtype)
    return jnp.pad(flat, (0, width - flat.shape[0]))

  mine = jax.lax.switch(jax.lax.axis_index(axis_name),
                        [lambda share=share: compute(share) for share in shares])
  everyone = jax.lax.all_gather(mine, axis_name)  # (devices, width)
  results: list[Any] = [None] * len(functions)
  for device, share in enumerate(shares):
    offset = 0
    for i in share:
      leaves, tree = jax.tree.flatten(shapes[i])
      values = []
      for leaf in leaves:
        values.append(everyone[device, offset:offset + leaf.size].reshape(leaf.shape))
        offset += leaf.size
      results[i] = jax.tree.unflatten(tree, values)
  return results


def state_sharding(state: Any, mesh: jax.sharding.Mesh, min_size: int = 2**16) -> Any:
  """Shardings that split the optimizer state's large arrays over a mesh.

  Every array of at least `min_size` entries is split over all the mesh's
  devices along the axis `jkfac.state_layout.split_axis` picks, where that
  axis divides among them; the rest is replicated. The state of
  `kfac(..., mesh=mesh, shard_state=True)` is padded so that its factors and
  inverses all divide, and comes placed this way (`min_size=1`); these
  shardings are then its `out_shardings`, or orbax's restore targets. For a
  state not padded, a dense layer's input factor (`in + 1` rows) rarely
  divides and stays replicated. The updates are the same either way.

  Args:
    state: the optimizer state, or its shapes (`jax.eval_shape(tx.init, params)`).
    mesh: the device mesh; all its axes are used.
    min_size: arrays with fewer entries are replicated.

  Returns:
    A pytree of `jax.sharding.NamedSharding` with the structure of `state`.
  """
  devices = mesh.devices.size

  def sharding(x: Any) -> jax.sharding.NamedSharding:
    shape = tuple(jnp.shape(x))
    axis = state_layout.split_axis(shape, devices)
    if axis is None or math.prod(shape) < min_size or shape[axis] % devices:
      return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.sharding.NamedSharding(mesh, state_layout.spec(shape, mesh))

  return jax.tree.map(sharding, state)
