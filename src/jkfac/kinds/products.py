# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Products of an activation and a kernel, awaiting their biases: dense and conv layers.

The dense and convolution matchers (`jkfac.kinds.dense`, `jkfac.kinds.conv`)
record each product they find as a `Pending`. Once the jaxpr is walked, its
bias is looked for among its consumers (`find_bias`) and its use recorded in
the plan (`complete`), in graph order (`jkfac.kinds.dense.finish`).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

from jax.extend.core import Jaxpr, Literal, Var

from jkfac.kinds import views
from jkfac.layers import Use


class Pending(NamedTuple):
  """A dense or convolution match awaiting its bias.

  Attributes:
    match: the match.
    x: its input.
    out: its product.
    x_axes: the input's feature axes.
    out_axes: the product's feature axes.
    x_stack: the axes of a vmapped stack in the input (None: an input the
      stack shares).
    out_stack: the axes of a vmapped stack in the product.
  """
  match: views.Match
  x: Var
  out: Var
  x_axes: tuple[int, ...]
  out_axes: tuple[int, ...]
  x_stack: Optional[tuple[int, ...]]
  out_stack: tuple[int, ...]


def complete(walker: views.WalkState, frame: views.Frame, first: Pending, total: Var,
             consumers: dict[Var, list[int]], more: Sequence[Pending] = ()) -> None:
  """Gives a product (or products summed) its bias, and records its use in the plan.

  Args:
    walker: the walk.
    frame: the jaxpr's walk; the bias addition's output joins `frame.biased`.
    first: the product (the first of several summed).
    total: the product, or the sum of the products.
    consumers: each variable's consuming equations (`views.consumers`).
    more: the further products summed before one bias (a dense layer over
      their concatenated inputs), whose matches are merged into `first`'s.
  """
  match, x, _, x_axes, _, x_stack, _ = first
  bias, out, out_axes, out_stack = find_bias(walker, frame, total, first.out_axes,
                                             first.out_stack, consumers, match.sliced_by)
  if bias is not None:
    frame.biased.add(out)
  match.leaves = (match.leaves[0], bias) + tuple(p.match.leaves[0] for p in more)
  x_shape = tuple(x.aval.shape)
  if more:
    x_shape = x_shape[:-1] + (sum(p.x.aval.shape[-1] for p in (first, *more)),)
  out_shape = tuple(out.aval.shape)
  if out_stack:  # the use as the block sees it: the stack's axes first
    sizes = tuple(out_shape[a] for a in out_stack)
    if x_stack is None:
      x_shape, x_axes = sizes + x_shape, tuple(a + len(sizes) for a in x_axes)
    else:
      x_shape, x_axes = _stack_first(x_shape, x_stack, x_axes)
    out_shape, out_axes = _stack_first(out_shape, out_stack, out_axes)
  match.use = Use(walker.new_id(), x_axes=x_axes, out_axes=out_axes, x_shape=x_shape,
                  out_shape=out_shape, stack=len(out_stack))
  plan = frame.plan
  plan.perturb[out] = match.use.id
  plan.capture[match.use.id] = tuple(p.x for p in (first, *more))
  if more:
    plan.concatenate.add(match.use.id)
  if out_stack:
    plan.stack_layout[match.use.id] = (x_stack, out_stack, sizes)


def find_bias(walker: views.WalkState, frame: views.Frame, out: Var,
              out_axes: tuple[int, ...], out_stack: tuple[int, ...],
              consumers: dict[Var, list[int]], sliced_by: tuple[int, ...]
              ) -> tuple[Optional[int], Var, tuple[int, ...], tuple[int, ...]]:
  """The bias added to a product, if any.

  The product may be transposed first (a model written for one example and
  vmapped over the batch computes `W x`, then moves the batch axis first).
  The bias of a vmapped stack (`out_stack`, the stack's axes) is stacked
  alike.

  Args:
    walker: the walk.
    frame: the jaxpr's walk.
    out: the product (or the sum of products).
    out_axes: its feature axes.
    out_stack: the axes of a vmapped stack in it.
    consumers: each variable's consuming equations (`views.consumers`).
    sliced_by: the scans and vmaps that slice the kernel.

  Returns:
    (the bias's leaf, the sum, the sum's feature and stack axes). Without a
    bias: None, and the product with its own axes.
  """
  jaxpr, origin = frame.jaxpr, frame.origin
  product = (None, out, out_axes, out_stack)
  out = _through_reshapes(jaxpr, out, consumers)
  users = consumers.get(out, [])
  if (len(users) == 1 and out not in jaxpr.outvars
      and jaxpr.eqns[users[0]].primitive.name == "transpose"):
    moved = jaxpr.eqns[users[0]]
    perm = tuple(moved.params["permutation"])
    out = moved.outvars[0]
    out_axes, out_stack = (tuple(perm.index(a) for a in axes)
                           for axes in (out_axes, out_stack))
    users = consumers.get(out, [])
  if len(users) != 1 or out in jaxpr.outvars:
    return product
  eqn = jaxpr.eqns[users[0]]
  if eqn.primitive.name != "add" or eqn.outvars[0].aval.shape != out.aval.shape:
    return product
  other = eqn.invars[1] if eqn.invars[0] is out else eqn.invars[0]
  view = None if isinstance(other, Literal) else views.as_broadcast(origin.get(other))
  if (view is None or view.leaf in walker.claimed
      or view.sliced_by != sliced_by[:len(sliced_by) - len(out_stack)]):
    return product
  # The bias's axes are the stack's and the features', but for size-1 axes
  # (a convolution bias stored as (channels, 1, 1)).
  shape = out.aval.shape
  leaf_axes = [(a, n) for a, n in zip(view.axes, walker.slice_shape(view)) if n != 1]
  if leaf_axes != [(a, shape[a]) for a in out_stack + out_axes if shape[a] != 1]:
    return product
  return view.leaf, eqn.outvars[0], out_axes, out_stack


def _through_reshapes(jaxpr: Jaxpr, var: Var, consumers: Any) -> Var:
  """`var`, or the end of a chain of reshapes that gives it back its shape.

  `jax.vmap` adds and squeezes size-1 axes around a convolution.
  """
  end, current = var, var
  while current not in jaxpr.outvars and len(consumers.get(current, [])) == 1:
    eqn = jaxpr.eqns[consumers[current][0]]
    if eqn.primitive.name not in ("reshape", "squeeze", "expand_dims"):
      break
    current = eqn.outvars[0]
    if current.aval.shape == var.aval.shape:
      end = current
  return end


def _stack_first(shape: tuple[int, ...], stack: tuple[int, ...], axes: tuple[int, ...]
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """A shape with the `stack` axes moved first, and where `axes` go."""
  order = list(stack) + [a for a in range(len(shape)) if a not in stack]
  return tuple(shape[a] for a in order), tuple(order.index(a) for a in axes)
