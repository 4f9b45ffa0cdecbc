# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Dense layers: `dot_general` of an activation and a kernel, their biases, their sums.

The matcher (`match`) finds a `dot_general` with no batch dimensions between
an activation and a view of a parameter leaf that contracts some of its axes
(`x @ w`, `jnp.dot`, `jnp.einsum`, `x @ w.T`, flax `Dense`); batch dimensions
pairing the kernel's leading axes with the activation's (`jax.vmap` over
stacked parameters: an ensemble) make a stack of layers, and so does a
product vmapped along an axis that comes from a kernel's leading axis
(`follow_members`): its first layer, whose input the stack shares. Once the
jaxpr is walked, `finish` gives every product its bias, the convolutions' too
(`jkfac.kinds.products`), and makes products summed before one bias
(`x @ Wx + h @ Wh + b`, an RNN cell) one dense layer over the concatenated
input.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

from jax.extend.core import Literal, Var

from jkfac import layers
from jkfac.kinds import products, views
from jkfac.kinds.products import Pending

NAME = "dense"
# Shape-preserving operations that mix the entries along an axis.
_MIXING = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp", "sort", "rev",
                     "dynamic_update_slice", "scatter", "scatter-add"})


class Options(NamedTuple):
  """The options a dense layer carries (`Layer.option`), read by `jkfac.blocks.dense`.

  Attributes:
    in_axes: the kernel's axes contracted with the input's features (of one
      slice of a stack).
    out_axes: the kernel's axes that are the output's features.
    bias: whether the layer has a bias.
    weight_sharing: `"reduce"` when traced with `weight_sharing="reduce"`
      (absent: `"expand"`).
    more_kernels: for products summed before one bias, the further kernels'
      options (`(("in_axes", ...), ("out_axes", ...))` each).
  """
  in_axes: tuple[int, ...]
  out_axes: tuple[int, ...]
  bias: bool
  weight_sharing: str = "expand"
  more_kernels: tuple[tuple[tuple[str, Any], ...], ...] = ()


def match(walker: views.WalkState, eqn: Any, ins: list[Any], frame: views.Frame) -> bool:
  """`dot_general` of an activation and a kernel view, contracting any of its axes.

  Batch dimensions pairing the kernel's leading axes with activation axes
  (a `jax.vmap` over stacked parameters: an ensemble, experts) make a
  stack of layers, one per slice.

  Args:
    walker: the walk.
    eqn: the `dot_general` equation.
    ins: the views its operands hold.
    frame: the jaxpr's walk; the product joins `frame.products`.

  Returns:
    True: the walker does nothing more with the equation.
  """
  (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
  found = None
  for side in (1, 0):
    view, other = ins[side], ins[1 - side]
    kernel_batch = tuple(rhs_b if side == 1 else lhs_b)
    if (isinstance(view, views.LeafView) and other is None and view.leaf not in walker.claimed
        and lhs_c and len(lhs_c) + len(kernel_batch) < len(view.perm)
        and tuple(view.perm[a] for a in kernel_batch) == tuple(range(len(kernel_batch)))):
      found = side, view
      break
  if found is None:
    walker.record_consumers("dot_general", ins, [None])
    return True
  side, view = found
  param_contract, param_batch = (rhs_c, rhs_b) if side == 1 else (lhs_c, lhs_b)
  x_axes, x_batch = (lhs_c, lhs_b) if side == 1 else (rhs_c, rhs_b)
  depth = len(param_batch)
  x, out = eqn.invars[1 - side], eqn.outvars[0]
  free = [a for a in range(len(view.perm)) if a not in param_contract and a not in param_batch]
  x_free = x.aval.ndim - len(x_axes) - depth
  first = depth + (x_free if side == 1 else 0)  # dot_general: batch, lhs free, rhs free
  out_axes = tuple(range(first, first + len(free)))
  options = (("in_axes", tuple(view.perm[a] - depth for a in param_contract)),
             ("out_axes", tuple(view.perm[a] - depth for a in free)))
  sliced_by = view.sliced_by
  if depth:
    sliced_by += (walker.new_vmap(),)
    member = walker.members.get(x)
    if (depth == 1 and member is not None and member[1] == x_batch[0]
        and walker.leaf_shapes[member[0].leaves[0]][len(member[0].sliced_by)]
        == out.aval.shape[0]):
      member[0].members = True  # the stack's first layer, its input shared
  found_match = views.Match(NAME, (view.leaf, None), None, options, "found", sliced_by=sliced_by)
  leading = [a for a in free if view.perm[a] == 0]
  if not depth and leading and len(free) > 1:
    found_match.member_axis = out_axes[free.index(leading[0])]
    walker.members[out] = (found_match, found_match.member_axis)
  walker.matches.append(found_match)  # completed by finish, once bias views are known
  frame.products.append(Pending(found_match, x, out, tuple(x_axes), out_axes, tuple(x_batch),
                                tuple(range(depth))))
  return True


def follow_members(walker: views.WalkState, eqn: Any) -> None:
  """Follows an axis that may index a vmapped stack through elementwise work.

  The axis comes from a product's kernel's leading axis (`match`, in
  `walker.members`); a later `dot_general` vmapped along it makes that
  product the first layer of a stack. A transpose moves it; an operation
  whose output has the shape of the followed input, the other operands
  broadcast along the axis or alike (activations, biases, residual sums,
  `jit`-wrapped functions such as `jax.nn.relu`), keeps it.

  Args:
    walker: the walk.
    eqn: an equation that no kind's matcher took.
  """
  followed = [v for v in eqn.invars if not isinstance(v, Literal) and v in walker.members]
  if not followed or len(eqn.outvars) != 1:
    return
  found, axis = walker.members[followed[0]]
  var, out = followed[0], eqn.outvars[0]
  if eqn.primitive.name == "transpose":
    walker.members[out] = (found, tuple(eqn.params["permutation"]).index(axis))
  elif out.aval.shape == var.aval.shape and eqn.primitive.name not in _MIXING and all(
      isinstance(v, Literal) or v.aval.ndim == 0
      or (v.aval.ndim == out.aval.ndim and v.aval.shape[axis] in (1, out.aval.shape[axis]))
      for v in eqn.invars):
    walker.members[out] = (found, axis)


def finish(walker: views.WalkState, frame: views.Frame) -> None:
  """Finds the dense and convolution biases and records the layers' uses, in graph order.

  Products summed before one bias (`x @ Wx + h @ Wh + b`, every RNN, GRU
  and LSTM cell) are one dense layer over the concatenated input
  `[x, h, 1]` (Martens, Ba & Johnson 2018).

  Args:
    walker: the walk.
    frame: the jaxpr's walk, its products found; the outputs of the bias
      additions join `frame.biased` (they are not scale-and-shift layers).
  """
  consumers = views.consumers(frame.jaxpr)
  for group, total in _summed_products(walker, frame, consumers):
    first, more = group[0], group[1:]
    if first.match.members:  # the first layer of a vmapped stack: its input is shared
      first = _shared_input(walker, first)
    if more:
      first.match.options += (("more_kernels", tuple(p.match.options for p in more)),)
      for other in more:
        walker.matches.remove(other.match)
    products.complete(walker, frame, first, total, consumers, more)


def _shared_input(walker: views.WalkState, pending: Pending) -> Pending:
  """The first layer of a vmapped stack, its input shared: its kernel's leading axis stacks."""
  first = pending.match
  out_axes = tuple(a for a in pending.out_axes if a != first.member_axis)
  layout = dict(first.options)
  first.options = (("in_axes", tuple(a - 1 for a in layout["in_axes"])),
                   ("out_axes", tuple(a - 1 for a in layout["out_axes"] if a)))
  first.sliced_by += (walker.new_vmap(),)
  return pending._replace(out_axes=out_axes, x_stack=None, out_stack=(first.member_axis,))


def _summed_products(walker: views.WalkState, frame: views.Frame,
                     consumers: dict[Var, list[int]]) -> list[tuple[list[Pending], Var]]:
  """The pending products, grouped where several are summed before one bias.

  A group is dense products of inputs whose one feature axis is the last,
  alike in every other axis and in their outputs, added one after another
  (`(x @ Wx + h @ Wh) + b`) and then to a bias; any other product is a
  group of its own.

  Args:
    walker: the walk.
    frame: the jaxpr's walk, its products found.
    consumers: each variable's consuming equations.

  Returns:
    (group, the sum of its products) pairs, in graph order.
  """
  jaxpr, pending = frame.jaxpr, frame.products
  by_out = {p.out: p for p in pending}
  grouped: set[Var] = set()
  groups = []
  for first in pending:
    if first.out in grouped:
      continue
    group, total = [first], first.out
    while first.match.kind == NAME and total not in jaxpr.outvars:
      users = consumers.get(total, [])
      eqn = jaxpr.eqns[users[0]] if len(users) == 1 else None
      if eqn is None or eqn.primitive.name != "add":
        break
      other = by_out.get(eqn.invars[1] if eqn.invars[0] is total else eqn.invars[0])
      if other is None or other.out in grouped or not _summable(first, other):
        break
      group.append(other)
      total = eqn.outvars[0]
    if len(group) > 1 and products.find_bias(walker, frame, total, first.out_axes, (),
                                             consumers, first.match.sliced_by)[0] is None:
      groups.extend(([p], p.out) for p in group)  # no shared bias: separate layers
    else:
      groups.append((group, total))
    grouped.update(p.out for p in group)
  return groups


def _summable(first: Pending, other: Pending) -> bool:
  """Whether two dense products can be one layer over their concatenated inputs."""
  (m, x, out, x_axes, out_axes, _, stack), (n, y, out2, y_axes, out_axes2, _, stack2) = (
      first, other)
  return (n.kind == NAME and n.sliced_by == m.sliced_by and out_axes == out_axes2
          and not (stack or stack2 or m.member_axis is not None or n.member_axis is not None)
          and out.aval.shape == out2.aval.shape
          and x_axes == (x.aval.ndim - 1,) and y_axes == (y.aval.ndim - 1,)
          and x.aval.shape[:-1] == y.aval.shape[:-1])


def with_weight_sharing(found: Sequence[layers.Layer], weight_sharing: str
                        ) -> tuple[layers.Layer, ...]:
  """The layers, the dense ones with option `weight_sharing` when it is `"reduce"`.

  Args:
    found: the layers.
    weight_sharing: `"expand"` or `"reduce"`: how dense layers treat rows
      beyond the batch (`jkfac.blocks.dense`).

  Returns:
    The layers.
  """
  if weight_sharing != "reduce":
    return tuple(found)
  return tuple(dataclasses.replace(layer, options=layer.options + (("weight_sharing", "reduce"),))
               if layer.kind == NAME else layer for layer in found)
