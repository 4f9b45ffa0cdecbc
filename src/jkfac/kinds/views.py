# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The walk's shared machinery: views of parameter leaves, matches, the walk's state.

`jkfac.tracing` walks the jaxpr once; the matchers of the layer kinds
(`jkfac.kinds`) read and extend what it holds here:

- views: a parameter leaf seen through casts and transposes (`LeafView`), or
  through reshapes and broadcasts (`BroadcastView`), followed equation by
  equation (`propagate`) and into `scan` bodies (`slice_view`, `lift`);
- `Match`: a layer found (or tagged), not yet grouped into a `Layer`;
- `WalkState`: the walk's state across the nested jaxprs (the matches, the
  ids, the leaves' consumers), and `Frame`: the state of one jaxpr's walk;
- helpers on jaxprs (`consumers`, `open_jaxpr`, `inner_jaxprs`,
  `contains_primitive`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Optional, Sequence

from jax.extend.core import ClosedJaxpr, Jaxpr, Literal, Var

from jkfac import interpret
from jkfac.layers import Use

if TYPE_CHECKING:
  from jkfac.kinds.products import Pending
  from jkfac.kinds.scale_and_shift import Affine

# Identities on the values (a dtype kept, a copy, a placement: FSDP's gathered weights).
PASS_THROUGH = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision",
                          "reshard", "sharding_constraint", "mesh_cast"})


@dataclasses.dataclass(frozen=True)
class LeafView:
  """A parameter leaf, cast or transposed: leaf axis `perm[i]` is axis i here.

  Attributes:
    leaf: the leaf's index among the flattened parameters.
    perm: where each of the view's axes comes from in the leaf.
    sliced_by: the scans (by walk id, outermost first) that sliced the leaf's
      leading axes; `perm` counts the slice's axes only.
  """
  leaf: int
  perm: tuple[int, ...]
  sliced_by: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class BroadcastView:
  """A leaf reshaped or broadcast: leaf axis i is axis `axes[i]` here.

  Attributes:
    leaf: the leaf's index among the flattened parameters.
    axes: where each of the (sliced) leaf's axes is here.
    sliced_by: the scans (by walk id, outermost first) that sliced the leaf.
  """
  leaf: int
  axes: tuple[int, ...]
  sliced_by: tuple[int, ...] = ()


@dataclasses.dataclass
class Match:
  """A layer found by a kind's matcher or tagged, one use of it.

  Attributes:
    kind: the kind's name (`jkfac.kinds.KINDS`).
    leaves: its parameter leaves in the block's roles' order (kernel and
      bias, ...; None for an absent one), or the tag's parameters.
    use: where it is applied (None until its matcher completes it).
    options: the layer's options (`Layer.options`), as found.
    source: `"found"` or `"tagged"`.
    problem: why it must fall back after all, or None.
    sliced_by: the scans (and vmaps) that slice its parameters.
    member_axis: its product's axis from the kernel's leading one.
    members: that axis indexes a vmapped stack (found by a later layer).
  """
  kind: str
  leaves: tuple[Optional[int], ...]
  use: Optional[Use]
  options: tuple[tuple[str, Any], ...]
  source: str
  problem: Optional[str] = None
  sliced_by: tuple[int, ...] = ()
  member_axis: Optional[int] = None
  members: bool = False


@dataclasses.dataclass
class Frame:
  """The walk of one jaxpr: what the kinds' matchers found there, to finish.

  Attributes:
    jaxpr: the jaxpr walked.
    plan: its plan, which the matchers complete.
    origin: what each variable is a view of (a parameter leaf).
    products: the dense and convolution products awaiting their biases
      (`jkfac.kinds.products`).
    affine: the `mul`s and `add`s of a vector parameter, candidates for
      scale-and-shift layers (`jkfac.kinds.scale_and_shift`).
    biased: the outputs of the bias additions found for the products.
  """
  jaxpr: Jaxpr
  plan: interpret.Plan
  origin: dict[Var, Any]
  products: list[Pending] = dataclasses.field(default_factory=list)
  affine: list[Affine] = dataclasses.field(default_factory=list)
  biased: set[Var] = dataclasses.field(default_factory=set)


@dataclasses.dataclass(eq=False)
class WalkState:
  """The walk's state across nested jaxprs, which the kinds' matchers extend.

  Attributes:
    leaf_shapes: the parameter leaves' shapes.
    claimed: the leaves owned by layer tags (no matcher takes them).
    matches: the layers found so far, in graph order.
    consumers: leaf -> the primitives that use it other than as a layer's.
    members: activations with an axis that may index a vmapped stack: var ->
      (the dense match whose kernel's leading axis it comes from, the axis).
    vmaps: the ids in `sliced_by` of vmapped stacks.
  """
  leaf_shapes: Sequence[tuple[int, ...]]
  claimed: set[int]
  matches: list[Match] = dataclasses.field(default_factory=list)
  consumers: dict[int, set[str]] = dataclasses.field(default_factory=dict)
  members: dict[Var, tuple[Match, int]] = dataclasses.field(default_factory=dict)
  vmaps: set[int] = dataclasses.field(default_factory=set)
  _next_id: int = 0

  def new_id(self) -> int:
    """A new id, for a use, a loss, a scan or a vmap.

    Returns:
      The id.
    """
    self._next_id += 1
    return self._next_id - 1

  def new_vmap(self) -> int:
    """A new id for a vmapped stack (in `vmaps`).

    Returns:
      The id.
    """
    self.vmaps.add(self._next_id)
    return self.new_id()

  def record_consumers(self, name: str, ins: list[Any], outs: list[Any]) -> None:
    """Records the primitive `name` as a consumer of the views in `ins`.

    Args:
      name: the primitive's name.
      ins: the views its operands hold (None for none).
      outs: the views its outputs hold: when it has one, it is a view op,
        and the view's consumers are recorded instead.
    """
    if any(o is not None for o in outs):
      return
    for o in ins:
      if o is not None:
        self.consumers.setdefault(o.leaf, set()).add(name)

  def slice_shape(self, view: Any) -> tuple[int, ...]:
    """The shape of one slice of the view's leaf (its shape when not sliced).

    Args:
      view: a `LeafView` or `BroadcastView`.

    Returns:
      The shape.
    """
    return tuple(self.leaf_shapes[view.leaf][len(view.sliced_by):])


def as_broadcast(view: Any) -> Optional[BroadcastView]:
  """The view as a `BroadcastView` (None stays None)."""
  if isinstance(view, LeafView):
    return BroadcastView(view.leaf, tuple(view.perm.index(i) for i in range(len(view.perm))),
                         view.sliced_by)
  return view


def propagate(eqn: Any, ins: list[Any]) -> Any:
  """Returns the view an equation's single output holds, if any.

  Args:
    eqn: the equation.
    ins: the views its operands hold (None for none).

  Returns:
    A `LeafView`, a `BroadcastView` or None.
  """
  name = eqn.primitive.name
  view = ins[0] if ins else None
  if view is None or any(o is not None for o in ins[1:]):
    return None
  if name in PASS_THROUGH:
    return view
  in_shape = tuple(eqn.invars[0].aval.shape)
  out_shape = tuple(eqn.outvars[0].aval.shape)
  if name == "transpose":
    perm = tuple(eqn.params["permutation"])
    if isinstance(view, LeafView):
      return LeafView(view.leaf, tuple(view.perm[p] for p in perm), view.sliced_by)
    return BroadcastView(view.leaf, tuple(perm.index(a) for a in view.axes), view.sliced_by)
  view = as_broadcast(view)
  if name == "broadcast_in_dim":
    dims = eqn.params["broadcast_dimensions"]
    return BroadcastView(view.leaf, tuple(dims[a] for a in view.axes), view.sliced_by)
  if name == "squeeze":
    dims = [d % len(in_shape) for d in eqn.params["dimensions"]]
    return BroadcastView(view.leaf, tuple(a - sum(d < a for d in dims) for a in view.axes),
                         view.sliced_by)
  if name == "reshape" and math.prod(in_shape) == math.prod(
      in_shape[a] for a in view.axes):  # a leaf with size-1 axes added or removed
    leaf_shape = tuple(in_shape[a] for a in view.axes)
    lead = len(out_shape) - len(leaf_shape)
    if lead >= 0 and out_shape[lead:] == leaf_shape:  # numpy's rule: the leaf trails
      return BroadcastView(view.leaf, tuple(range(lead, len(out_shape))), view.sliced_by)
    big = [i for i, d in enumerate(out_shape) if d != 1]
    if all(d != 1 for d in leaf_shape) and [out_shape[i] for i in big] == list(leaf_shape):
      return BroadcastView(view.leaf, tuple(big), view.sliced_by)
  return None


def slice_view(view: Any, scan: int) -> Any:
  """The view one iteration of `scan` sees of a view it scans over (axis 0), or None.

  Only a leaf whose leading axis is the scanned one is sliced: the body sees
  one layer of a stack.

  Args:
    view: the view scanned over.
    scan: the scan's walk id.

  Returns:
    The sliced view, or None.
  """
  if isinstance(view, LeafView) and view.perm and view.perm[0] == 0:
    return LeafView(view.leaf, tuple(a - 1 for a in view.perm[1:]), view.sliced_by + (scan,))
  if isinstance(view, BroadcastView) and view.axes and view.axes[0] == 0:
    return BroadcastView(view.leaf, tuple(a - 1 for a in view.axes[1:]),
                         view.sliced_by + (scan,))
  return None


def lift(use: Use, length: int, stacked: bool) -> tuple[Use, int]:
  """A use inside a scan body, seen from outside: the scan's axis inserted.

  Args:
    use: the use inside the body.
    length: the scan's length.
    stacked: whether the layer's weights are scanned over (a stack).

  Returns:
    The use with an axis of `length` in its input and output shapes, and
    that axis: first for a stacked layer (one more stack axis), right after
    the batch axis (which follows the stack's axes) for shared weights.
  """
  axis = 0 if stacked else use.stack + 1
  insert = lambda shape: shape[:axis] + (length,) + shape[axis:]
  shift = lambda axes: tuple(a + (a >= axis) for a in axes)
  return dataclasses.replace(use, x_axes=shift(use.x_axes), out_axes=shift(use.out_axes),
                             x_shape=insert(use.x_shape), out_shape=insert(use.out_shape),
                             stack=use.stack + stacked), axis


def consumers(jaxpr: Jaxpr) -> dict[Var, list[int]]:
  """Each variable's consuming equations, by index.

  Args:
    jaxpr: the jaxpr.

  Returns:
    var -> the indices of the equations that use it.
  """
  users: dict[Var, list[int]] = {}
  for index, eqn in enumerate(jaxpr.eqns):
    for v in eqn.invars:
      if not isinstance(v, Literal):
        users.setdefault(v, []).append(index)
  return users


def open_jaxpr(closed: Any) -> tuple[Jaxpr, list[Any]]:
  """A jaxpr and its constants, from a closed or open jaxpr.

  Args:
    closed: a `ClosedJaxpr` or a `Jaxpr`.

  Returns:
    (the open jaxpr, its constants' values).
  """
  if isinstance(closed, ClosedJaxpr):
    return closed.jaxpr, list(closed.consts)
  return closed, []


def inner_jaxprs(eqn: Any) -> list[Jaxpr]:
  """The jaxprs among an equation's parameters (a call's, a branch's, a body's).

  Args:
    eqn: the equation.

  Returns:
    The open jaxprs.
  """
  found = []
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, (ClosedJaxpr, Jaxpr)):
        found.append(open_jaxpr(item)[0])
  return found


def contains_primitive(jaxpr: Jaxpr, name: str) -> bool:
  """Whether a jaxpr, or one nested in it, has an equation of primitive `name`.

  Args:
    jaxpr: the jaxpr.
    name: the primitive's name.

  Returns:
    Whether it does.
  """
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      return True
    if any(contains_primitive(inner, name) for inner in inner_jaxprs(eqn)):
      return True
  return False
