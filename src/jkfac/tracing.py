# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Trace the loss once: find the layers, the losses, and build the layer table.

`trace(loss_fn, params, args)` calls `jax.make_jaxpr` and walks the jaxpr,
following every parameter leaf through casts and transposes (a *view* of the
leaf) and every bias leaf through reshapes and broadcasts. It finds:

- manual layer tags (`register_dense`, ...), whose parameters they own first;
- dense layers: a `dot_general` with no batch dimensions between an activation
  and a view of a 2-D parameter leaf that contracts one of its axes (`x @ w`,
  `jnp.dot`, `jnp.einsum`, `x @ w.T`, flax `Dense`), and, when the product's only
  consumer is an `add` of a view of a 1-D leaf along the output axis, its bias;
- loss tags, from the loss functions of `jkfac.losses`.

It descends into `jit`, `remat`/`checkpoint` and `custom_jvp`/`custom_vjp`
calls, and into `scan` bodies: a parameter sliced along its leading axis by
the scan (scan over layers) is a stack of layers (`Layer.stack`), one closed
over by the body (the same weights every iteration: an RNN over time) a layer
whose weights are shared over the iterations, like a sequence layer's. A
`dot_general` whose batch dimensions pair a kernel's leading axes with an
activation's (`jax.vmap` over stacked parameters: an ensemble) is a stack too.
Products summed before one bias (`x @ Wx + h @ Wh + b`, an RNN cell) are one
dense layer over the concatenated input. Parameters that no layer owns are
handed to the `"diagonal"` fallback block and listed, with the operations that
use them, in the layer table.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal, Var

from jkfac import blocks, interpret, tags
from jkfac import overrides as overrides_lib
from jkfac.blocks import conv
from jkfac.layers import Layer, Loss, Param, Program, Use  # what the trace finds

# Identities on the values (a dtype kept, a copy, a placement: FSDP's gathered weights).
_PASS_THROUGH = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision",
                           "reshard", "sharding_constraint", "mesh_cast"})
_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr",
          "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr"}
_CHECKPOINTS = frozenset({"remat2", "checkpoint", "remat"})
# Shape-preserving operations that mix the entries along an axis.
_MIXING = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp", "sort", "rev",
                     "dynamic_update_slice", "scatter", "scatter-add"})


# Views of parameter leaves, tracked through the graph.
# `sliced_by`: the scans (by walk id, outermost first) that sliced the leaf's
# leading axes; axes and permutations count the slice's axes.
@dataclasses.dataclass(frozen=True)
class _LeafView:
  leaf: int
  perm: tuple[int, ...]
  sliced_by: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class _BroadcastView:
  """A leaf reshaped or broadcast: leaf axis i is axis `axes[i]` here."""
  leaf: int
  axes: tuple[int, ...]
  sliced_by: tuple[int, ...] = ()


@dataclasses.dataclass
class _Match:
  kind: str
  leaves: tuple[Optional[int], ...]  # kernel/bias or the tag's parameters
  use: Optional[Use]
  options: tuple[tuple[str, Any], ...]
  source: str
  problem: Optional[str] = None  # why it must fall back after all
  sliced_by: tuple[int, ...] = ()  # the scans (and vmaps) that slice its parameters
  member_axis: Optional[int] = None  # its product's axis from the kernel's leading one
  members: bool = False  # that axis indexes a vmapped stack (found by a later layer)


# A dense or convolution match awaiting its bias: (match, input, output,
# input feature axes, output feature axes, the axes of a vmapped stack in the
# input (None: an input the stack shares) and in the output).
_Pending = tuple[_Match, Var, Var, tuple[int, ...], tuple[int, ...],
                 Optional[tuple[int, ...]], tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class _Affine:
  """A `mul` or `add` of an activation and a broadcast vector parameter."""
  op: str
  leaf: int
  axis: int
  other: Var
  out: Var
  sliced_by: tuple[int, ...] = ()


class _Walker:
  """Walks a jaxpr tree once, building plans and collecting matches."""

  def __init__(self, leaf_shapes: Sequence[tuple[int, ...]], claimed: set[int]):
    self.leaf_shapes = leaf_shapes
    self.claimed = claimed
    self.matches: list[_Match] = []
    self.losses: list[Loss] = []
    self.consumers: dict[int, set[str]] = {}
    # Activations with an axis that may index a vmapped stack: var -> (the
    # dense match whose kernel's leading axis it comes from, the axis).
    self._members: dict[Var, tuple[_Match, int]] = {}
    self.vmaps: set[int] = set()  # the ids in `sliced_by` of vmapped stacks
    self._next_id = 0

  def _new_id(self) -> int:
    self._next_id += 1
    return self._next_id - 1

  def _new_vmap(self) -> int:
    self.vmaps.add(self._next_id)
    return self._new_id()

  def walk(self, jaxpr: Jaxpr, consts: list[Any], origins: list[Any]) -> tuple[interpret.Plan, list[Any]]:
    plan = interpret.Plan(jaxpr, list(consts))
    origin: dict[Var, Any] = {v: o for v, o in zip(jaxpr.invars, origins) if o is not None}
    pending: list[_Pending] = []
    affine: list[_Affine] = []
    for index, eqn in enumerate(jaxpr.eqns):
      ins = [None if isinstance(v, Literal) else origin.get(v) for v in eqn.invars]
      name = eqn.primitive.name
      outs: list[Any] = [None] * len(eqn.outvars)
      if name == tags.LAYER_TAG_NAME:
        self._layer_tag(eqn, ins, plan)
      elif name == tags.LOSS_TAG_NAME:
        self._loss_tag(eqn, plan)
      elif name == "dot_general":
        self._dense(index, eqn, ins, plan, pending)
      elif name == "conv_general_dilated":
        self._conv(eqn, ins, pending)
      elif name == "gather":
        self._embedding(eqn, ins, plan)
      elif name in _CALLS or name in _CHECKPOINTS:
        self._follow_members(eqn)
        outs = self._nested(index, eqn, ins, plan)
      elif name == "scan":
        outs = self._scan(index, eqn, ins, plan)
      else:
        outs = [_propagate(eqn, ins)] if len(eqn.outvars) == 1 else outs
        if any(o is not None for o in ins):
          self._record_consumers(name, ins, outs)
          if name in ("mul", "add"):
            self._affine_candidate(eqn, ins, affine)
        if not any(o is not None for o in outs) and _inner_jaxprs(eqn):
          self._check_no_tags_inside(eqn)
        self._follow_members(eqn)
      origin.update({v: o for v, o in zip(eqn.outvars, outs) if o is not None})
    biases = self._finish_layers(jaxpr, plan, origin, pending)
    self._finish_affine(jaxpr, plan, origin, [a for a in affine if a.out not in biases])
    return plan, [None if isinstance(v, Literal) else origin.get(v) for v in jaxpr.outvars]

  def _record_consumers(self, name: str, ins: list[Any], outs: list[Any]) -> None:
    if any(o is not None for o in outs):
      return  # a view op: the view's consumers are recorded instead
    for o in ins:
      if o is not None:
        self.consumers.setdefault(o.leaf, set()).add(name)

  def _follow_members(self, eqn) -> None:
    """Follows an axis that may index a vmapped stack through elementwise work.

    A transpose moves it; an operation whose output has the shape of the
    followed input, the other operands broadcast along the axis or alike
    (activations, biases, residual sums, `jit`-wrapped functions such as
    `jax.nn.relu`), keeps it.
    """
    followed = [v for v in eqn.invars if not isinstance(v, Literal) and v in self._members]
    if not followed or len(eqn.outvars) != 1:
      return
    match, axis = self._members[followed[0]]
    var, out = followed[0], eqn.outvars[0]
    if eqn.primitive.name == "transpose":
      self._members[out] = (match, tuple(eqn.params["permutation"]).index(axis))
    elif out.aval.shape == var.aval.shape and eqn.primitive.name not in _MIXING and all(
        isinstance(v, Literal) or v.aval.ndim == 0
        or (v.aval.ndim == out.aval.ndim and v.aval.shape[axis] in (1, out.aval.shape[axis]))
        for v in eqn.invars):
      self._members[out] = (match, axis)

  def _check_no_tags_inside(self, eqn, layer_tags: bool = True) -> None:
    """Refuses a loss (or a layer tag) inside control flow the walk does not enter."""
    for inner in _inner_jaxprs(eqn):
      if layer_tags and _contains_primitive(inner, tags.LAYER_TAG_NAME):
        raise ValueError(
            f"A jkfac layer tag (register_dense, register_conv or "
            f"register_scale_and_shift) is inside a `{eqn.primitive.name}` (lax.cond, "
            "lax.switch, lax.while_loop or a similar control-flow primitive): "
            "jkfac does not look inside control flow other than lax.scan, so the tagged "
            "layer would get no "
            "block of its own. Tag the layer outside it (unroll a short loop in Python, "
            "or apply the layer once to the stacked inputs after the loop), or remove "
            "the tag to leave its parameters to the diagonal fallback block.")
      if _contains_primitive(inner, tags.LOSS_TAG_NAME):
        raise ValueError(
            f"A registered loss is inside a `{eqn.primitive.name}` "
            "(lax.cond, lax.switch, lax.while_loop, lax.scan or a similar "
            "control-flow primitive). jkfac needs the loss outside control flow: "
            "compute every branch's predictions, select them with jnp.where, and "
            "call the jkfac loss function once on the result (for a loop, return the "
            "predictions from it and compute the loss after it).")

  def _nested(self, index: int, eqn, ins: list[Any], plan: interpret.Plan) -> list[Any]:
    name = eqn.primitive.name
    if name in _CHECKPOINTS:
      inner, consts, how = eqn.params["jaxpr"], [], interpret.CHECKPOINT
    else:
      closed = eqn.params.get(_CALLS[name])
      if closed is None:
        return [None] * len(eqn.outvars)
      inner, consts, how = _open(closed) + (interpret.INLINE,)
    for outer, inner_var in zip(eqn.invars, inner.invars):
      if not isinstance(outer, Literal) and outer in self._members:
        self._members[inner_var] = self._members[outer]
    inner_plan, inner_outs = self.walk(inner, consts, ins)
    if inner_plan.active:
      plan.nested[index] = (how, inner_plan)
    return inner_outs

  def _scan(self, index: int, eqn, ins: list[Any], plan: interpret.Plan) -> list[Any]:
    """A `lax.scan`: its body's layers, stacked or sharing weights over the iterations.

    A parameter scanned over along its leading axis is sliced (each
    iteration sees one layer of a stack); one closed over by the body is the
    same every iteration. The uses found inside get the scan's axis in their
    shapes: leading for a stack, after the batch axis for shared weights.
    """
    self._check_no_tags_inside(eqn, layer_tags=False)
    params = eqn.params
    body, consts = _open(params["jaxpr"])
    num_consts, num_carry = params["num_consts"], params["num_carry"]
    scan = self._new_id()
    origins = []
    for position, view in enumerate(ins):
      if view is None or position < num_consts:
        origins.append(view)
        continue
      sliced = _slice(view, scan) if position >= num_consts + num_carry else None
      if sliced is None:  # carried, or scanned over another axis
        self._record_consumers("scan", [view], [None])
      origins.append(sliced)
    first = len(self.matches)
    inner_plan, _ = self.walk(body, consts, origins)
    if not inner_plan.active:
      return [None] * len(eqn.outvars)
    for match in self.matches[first:]:
      match.use, inner_plan.scan_axis[match.use.id] = _lift(
          match.use, params["length"], scan in match.sliced_by)
    plan.nested[index] = (interpret.SCAN, inner_plan)
    return [None] * len(eqn.outvars)

  def _slice_shape(self, view: Any) -> tuple[int, ...]:
    """The shape of one slice of the view's leaf (its shape when not sliced)."""
    return tuple(self.leaf_shapes[view.leaf][len(view.sliced_by):])

  def _layer_tag(self, eqn, ins: list[Any], plan: interpret.Plan) -> None:
    kind = eqn.params["kind"]
    present = eqn.params["present"]
    operands = iter(range(2, len(eqn.invars)))
    leaves: list[Optional[int]] = []
    slicing: set[tuple[int, ...]] = set()
    for is_present in present:
      if not is_present:
        leaves.append(None)
        continue
      position = next(operands)
      view = ins[position]
      if not isinstance(view, (_LeafView, _BroadcastView)) or (
          isinstance(view, _LeafView) and view.perm != tuple(range(len(view.perm)))):
        raise ValueError(
            f"register_{kind}: parameter operand {position - 2} is not a parameter "
            "leaf of the loss function (computed from one, transposed, or not a "
            "parameter at all). Pass the parameter itself, as it appears in `params` "
            "(a cast to another dtype is fine), to the tag.")
      leaves.append(view.leaf)
      slicing.add(view.sliced_by)
    if len(slicing) > 1:
      raise ValueError(
          f"register_{kind}: its parameters are not stacked alike (inside lax.scan, "
          "some are sliced per iteration and others closed over). Scan over all of a "
          "layer's parameters, or close over all of them.")
    y, x = eqn.invars[0], eqn.invars[1]
    use = Use(self._new_id(), x_axes=(x.aval.ndim - 1,), out_axes=(y.aval.ndim - 1,),
              x_shape=tuple(x.aval.shape), out_shape=tuple(y.aval.shape))
    plan.perturb[eqn.outvars[0]] = use.id
    plan.capture[use.id] = (x,)
    self.matches.append(_Match(kind, tuple(leaves), use, eqn.params["meta"], "tagged",
                               sliced_by=slicing.pop() if slicing else ()))

  def _loss_tag(self, eqn, plan: interpret.Plan) -> None:
    mask = eqn.invars[2] if len(eqn.invars) > 2 else None
    loss = Loss(self._new_id(), eqn.params["distribution"], eqn.params["weight"],
                tuple(eqn.outvars[0].aval.shape),
                None if mask is None else len(mask.aval.shape))
    self.losses.append(loss)
    plan.losses.append((loss.id, eqn.outvars[0], eqn.invars[1], mask))

  def _dense(self, index: int, eqn, ins: list[Any], plan: interpret.Plan,
             pending: list[_Pending]) -> None:
    """`dot_general` of an activation and a kernel view, contracting any of its axes.

    Batch dimensions pairing the kernel's leading axes with activation axes
    (a `jax.vmap` over stacked parameters: an ensemble, experts) make a
    stack of layers, one per slice.
    """
    (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
    found = None
    for side in (1, 0):
      view, other = ins[side], ins[1 - side]
      kernel_batch = tuple(rhs_b if side == 1 else lhs_b)
      if (isinstance(view, _LeafView) and other is None and view.leaf not in self.claimed
          and lhs_c and len(lhs_c) + len(kernel_batch) < len(view.perm)
          and tuple(view.perm[a] for a in kernel_batch) == tuple(range(len(kernel_batch)))):
        found = side, view
        break
    if found is None:
      self._record_consumers("dot_general", ins, [None])
      return
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
      sliced_by += (self._new_vmap(),)
      member = self._members.get(x)
      if (depth == 1 and member is not None and member[1] == x_batch[0]
          and self.leaf_shapes[member[0].leaves[0]][len(member[0].sliced_by)]
          == out.aval.shape[0]):
        member[0].members = True  # the stack's first layer, its input shared
    match = _Match("dense", (view.leaf, None), None, options, "found", sliced_by=sliced_by)
    leading = [a for a in free if view.perm[a] == 0]
    if not depth and leading and len(free) > 1:
      match.member_axis = out_axes[free.index(leading[0])]
      self._members[out] = (match, match.member_axis)
    self.matches.append(match)  # completed by _finish_layers, once bias views are known
    pending.append((match, x, out, tuple(x_axes), out_axes, tuple(x_batch),
                    tuple(range(depth))))

  def _conv(self, eqn, ins: list[Any], pending: list[_Pending]) -> None:
    view, other = ins[1], ins[0]
    spec = None
    if isinstance(view, _LeafView) and other is None and view.leaf not in self.claimed:
      spec = conv.spec_from_params(eqn.params, view.perm)
    if spec is None:
      self._record_consumers("conv_general_dilated", ins, [None])
      return
    match = _Match("conv", (view.leaf, None), None, (("conv", spec),), "found",
                   sliced_by=view.sliced_by)
    self.matches.append(match)
    pending.append((match, eqn.invars[0], eqn.outvars[0], (spec.lhs_spec[1],),
                    (spec.out_spec[1],), (), ()))

  def _embedding(self, eqn, ins: list[Any], plan: interpret.Plan) -> None:
    """A row lookup `table[ids]` (`jnp.take`, indexing, flax `Embed`).

    Also the lookup of one id per example vmapped over the batch
    (`eqx.nn.Embedding`): indices `(..., 2)` start each slice at row `id`
    and feature 0, the slice a whole row, clamped, so the second index is
    always 0.
    """
    view, ids, out = ins[0], eqn.invars[1], eqn.outvars[0]
    numbers = eqn.params["dimension_numbers"]
    batching = tuple(getattr(numbers, "operand_batching_dims", ()))
    if not (isinstance(view, _LeafView) and view.perm == (0, 1) and ins[1] is None
            and view.leaf not in self.claimed and not batching
            and tuple(eqn.params["slice_sizes"]) == (1, self._slice_shape(view)[1])):
      self._record_consumers("gather", ins, [None])
      return
    rank = out.aval.ndim
    column = None
    if (tuple(numbers.collapsed_slice_dims) == (0,) and tuple(numbers.start_index_map) == (0,)
        and tuple(numbers.offset_dims) == (rank - 1,)):
      x_shape = tuple(ids.aval.shape)
    elif (tuple(numbers.collapsed_slice_dims) == () and tuple(numbers.start_index_map) == (0, 1)
          and tuple(numbers.offset_dims) == (rank - 2, rank - 1) and ids.aval.shape[-1] == 2
          and eqn.params["mode"] in (jax.lax.GatherScatterMode.CLIP,
                                     jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)):
      x_shape, column = tuple(ids.aval.shape[:-1]), 0
    else:
      self._record_consumers("gather", ins, [None])
      return
    use = Use(self._new_id(), x_axes=(len(x_shape) - 1,), out_axes=(rank - 1,),
              x_shape=x_shape, out_shape=tuple(out.aval.shape))
    plan.perturb[out] = use.id
    plan.capture[use.id] = (ids,)
    if column is not None:
      plan.capture_column[use.id] = column
    self.matches.append(_Match("embedding", (view.leaf,), use, (), "found",
                               sliced_by=view.sliced_by))

  def _finish_layers(self, jaxpr: Jaxpr, plan: interpret.Plan, origin: dict[Var, Any],
                     pending: list[_Pending]) -> set[Var]:
    """Finds dense and convolution biases and records the layers' uses.

    Products summed before one bias (`x @ Wx + h @ Wh + b`, every RNN, GRU
    and LSTM cell) are one dense layer over the concatenated input
    `[x, h, 1]` (Martens, Ba & Johnson 2018).

    Args:
      jaxpr: the jaxpr walked.
      plan: its plan, completed with the layers' uses.
      origin: what each variable is a view of (a parameter, the batch).
      pending: the products found, waiting for their biases.

    Returns:
      The outputs of the bias additions (not scale-and-shift layers).
    """
    consumers = _consumers(jaxpr)
    biased = set()
    for group, total in self._summed_products(jaxpr, consumers, origin, pending):
      match, x, out, x_axes, out_axes, x_stack, out_stack = group[0]
      if match.members:  # the first layer of a vmapped stack: its input is shared
        x_stack, out_stack = None, (match.member_axis,)
        out_axes = tuple(a for a in out_axes if a != match.member_axis)
        layout = dict(match.options)
        match.options = (("in_axes", tuple(a - 1 for a in layout["in_axes"])),
                         ("out_axes", tuple(a - 1 for a in layout["out_axes"] if a)))
        match.sliced_by += (self._new_vmap(),)
      bias, out, out_axes, out_stack = self._bias(jaxpr, total, out_axes, out_stack,
                                                  consumers, origin, match.sliced_by)
      if bias is not None:
        biased.add(out)
      match.leaves = (match.leaves[0], bias) + tuple(m.leaves[0] for m, *_ in group[1:])
      x_shape = tuple(x.aval.shape)
      if len(group) > 1:
        match.options += (("more_kernels", tuple(m.options for m, *_ in group[1:])),)
        x_shape = x_shape[:-1] + (sum(p[1].aval.shape[-1] for p in group),)
        for other, *_ in group[1:]:
          self.matches.remove(other)
      out_shape = tuple(out.aval.shape)
      if out_stack:  # the use as the block sees it: the stack's axes first
        sizes = tuple(out_shape[a] for a in out_stack)
        if x_stack is None:
          x_shape, x_axes = sizes + x_shape, tuple(a + len(sizes) for a in x_axes)
        else:
          x_shape, x_axes = _stack_first(x_shape, x_stack, x_axes)
        out_shape, out_axes = _stack_first(out_shape, out_stack, out_axes)
      match.use = Use(self._new_id(), x_axes=x_axes, out_axes=out_axes, x_shape=x_shape,
                      out_shape=out_shape, stack=len(out_stack))
      plan.perturb[out] = match.use.id
      plan.capture[match.use.id] = tuple(p[1] for p in group)
      if len(group) > 1:
        plan.concatenate.add(match.use.id)
      if out_stack:
        plan.stack_layout[match.use.id] = (x_stack, out_stack, sizes)
    return biased

  def _summed_products(self, jaxpr: Jaxpr, consumers: Any, origin: Any,
                       pending: list[_Pending]
                       ) -> list[tuple[list[_Pending], Var]]:
    """The pending products, grouped where several are summed before one bias.

    A group is dense products of inputs whose one feature axis is the last,
    alike in every other axis and in their outputs, added one after another
    (`(x @ Wx + h @ Wh) + b`) and then to a bias; any other product is a
    group of its own.

    Args:
      jaxpr: the jaxpr walked.
      consumers: each variable's consuming equations.
      origin: what each variable is a view of.
      pending: the products found.

    Returns:
      (group, the sum of its products) pairs, in graph order.
    """
    by_out = {p[2]: p for p in pending}
    grouped: set[Var] = set()
    groups = []
    for first in pending:
      if first[2] in grouped:
        continue
      group, total = [first], first[2]
      while first[0].kind == "dense" and total not in jaxpr.outvars:
        users = consumers.get(total, [])
        eqn = jaxpr.eqns[users[0]] if len(users) == 1 else None
        if eqn is None or eqn.primitive.name != "add":
          break
        other = by_out.get(eqn.invars[1] if eqn.invars[0] is total else eqn.invars[0])
        if other is None or other[2] in grouped or not _summable(first, other):
          break
        group.append(other)
        total = eqn.outvars[0]
      if len(group) > 1 and self._bias(jaxpr, total, first[4], (), consumers, origin,
                                       first[0].sliced_by)[0] is None:
        groups.extend(([p], p[2]) for p in group)  # no shared bias: separate layers
      else:
        groups.append((group, total))
      grouped.update(p[2] for p in group)
    return groups

  def _affine_candidate(self, eqn, ins: list[Any], found: list[_Affine]) -> None:
    if len(ins) != 2 or sum(o is not None for o in ins) != 1:
      return
    side = 0 if ins[0] is not None else 1
    other = eqn.invars[1 - side]
    view = _as_broadcast(ins[side])
    out = eqn.outvars[0]
    if (view is None or len(view.axes) != 1 or view.leaf in self.claimed
        or isinstance(other, Literal) or other.aval.ndim != out.aval.ndim
        or eqn.invars[side].aval.ndim != out.aval.ndim):
      return
    found.append(_Affine(eqn.primitive.name, view.leaf, view.axes[0], other, out,
                         view.sliced_by))

  def _finish_affine(self, jaxpr: Jaxpr, plan: interpret.Plan, origin: dict[Var, Any],
                     found: list[_Affine]) -> None:
    """Scale-and-shift layers: `x̂ * scale (+ shift)` with `x̂` a product of activations.

    A scale multiplies an activation; the product may be broadcast and
    multiplied by further activations before it is used (flax's normalisation
    layers scale `rsqrt(var + eps)` first, then multiply by `x - mean`): the
    layer's input `x̂` is the product of every multiplicand, captured as its
    factors, and its output is the end of that chain, or the `add` of a
    shift right after it.
    """
    consumers = _consumers(jaxpr)
    shifts = {a.other: a for a in found if a.op == "add"}
    paired = set()
    for scale in (a for a in found if a.op == "mul"):
      view, out = _BroadcastView(scale.leaf, (scale.axis,), scale.sliced_by), scale.out
      factors = [scale.other]
      while out not in jaxpr.outvars and len(consumers.get(out, [])) == 1:
        eqn = jaxpr.eqns[consumers[out][0]]
        name = eqn.primitive.name
        if name in ("broadcast_in_dim", "reshape"):
          moved = _propagate(eqn, [view])
          if moved is None:
            break
          view = moved
        elif name == "mul":
          other = eqn.invars[1] if eqn.invars[0] is out else eqn.invars[0]
          if (isinstance(other, Literal) or origin.get(other) is not None
              or other.aval.ndim != out.aval.ndim or eqn.outvars[0].aval.ndim != out.aval.ndim):
            break
          factors.append(other)
        else:
          break
        out = eqn.outvars[0]
      shift = shifts.get(out)
      if (shift is not None and (shift.axis,) == view.axes and shift.leaf != scale.leaf
          and shift.sliced_by == scale.sliced_by
          and consumers.get(out) and len(consumers[out]) == 1):
        paired.add(shift)
        leaves, out = (scale.leaf, shift.leaf), shift.out
      else:
        leaves = (scale.leaf, None)
      self._add_affine(plan, leaves, view.axes[0], out, factors, scale.sliced_by)
    for shift in found:
      if shift.op == "add" and shift not in paired:
        self._add_affine(plan, (None, shift.leaf), shift.axis, shift.out, [], shift.sliced_by)

  def _add_affine(self, plan: interpret.Plan, leaves: tuple[Optional[int], ...], axis: int,
                  out: Var, factors: list[Var], sliced_by: tuple[int, ...]) -> None:
    shape = tuple(out.aval.shape)
    use = Use(self._new_id(), x_axes=(axis,), out_axes=(axis,), x_shape=shape, out_shape=shape)
    plan.perturb[out] = use.id
    plan.capture[use.id] = tuple(factors)
    self.matches.append(_Match("scale_and_shift", leaves, use, (("axes", (axis,)),), "found",
                               sliced_by=sliced_by))

  def _bias(self, jaxpr: Jaxpr, out: Var, out_axes: tuple[int, ...],
            out_stack: tuple[int, ...], consumers, origin, sliced_by: tuple[int, ...]
            ) -> tuple[Optional[int], Var, tuple[int, ...], tuple[int, ...]]:
    """The bias added to a product, if any: its leaf, the sum, the sum's feature
    and stack axes.

    The product may be transposed first (a model written for one example and
    vmapped over the batch computes `W x`, then moves the batch axis first).
    The bias of a vmapped stack (`out_stack`, the stack's axes) is stacked
    alike. Without a bias: None, and the product with its own axes.
    """
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
    view = None if isinstance(other, Literal) else _as_broadcast(origin.get(other))
    if (view is None or view.leaf in self.claimed
        or view.sliced_by != sliced_by[:len(sliced_by) - len(out_stack)]):
      return product
    # The bias's axes are the stack's and the features', but for size-1 axes
    # (a convolution bias stored as (channels, 1, 1)).
    shape = out.aval.shape
    leaf_axes = [(a, n) for a, n in zip(view.axes, self._slice_shape(view)) if n != 1]
    if leaf_axes != [(a, shape[a]) for a in out_stack + out_axes if shape[a] != 1]:
      return product
    return view.leaf, eqn.outvars[0], out_axes, out_stack


def _through_reshapes(jaxpr: Jaxpr, var: Var, consumers) -> Var:
  """`var`, or the end of a chain of reshapes that gives it back its shape
  (`jax.vmap` adds and squeezes size-1 axes around a convolution)."""
  end, current = var, var
  while current not in jaxpr.outvars and len(consumers.get(current, [])) == 1:
    eqn = jaxpr.eqns[consumers[current][0]]
    if eqn.primitive.name not in ("reshape", "squeeze", "expand_dims"):
      break
    current = eqn.outvars[0]
    if current.aval.shape == var.aval.shape:
      end = current
  return end


def _summable(first: _Pending, other: _Pending) -> bool:
  """Whether two dense products can be one layer over their concatenated inputs."""
  (m, x, out, x_axes, out_axes, _, stack), (n, y, out2, y_axes, out_axes2, _, stack2) = (
      first, other)
  return (n.kind == "dense" and n.sliced_by == m.sliced_by and out_axes == out_axes2
          and not (stack or stack2 or m.member_axis is not None or n.member_axis is not None)
          and out.aval.shape == out2.aval.shape
          and x_axes == (x.aval.ndim - 1,) and y_axes == (y.aval.ndim - 1,)
          and x.aval.shape[:-1] == y.aval.shape[:-1])


def _stack_first(shape: tuple[int, ...], stack: tuple[int, ...], axes: tuple[int, ...]
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """A shape with the `stack` axes moved first, and where `axes` go."""
  order = list(stack) + [a for a in range(len(shape)) if a not in stack]
  return tuple(shape[a] for a in order), tuple(order.index(a) for a in axes)


def _as_broadcast(view: Any) -> Optional[_BroadcastView]:
  if isinstance(view, _LeafView):
    return _BroadcastView(view.leaf, tuple(view.perm.index(i) for i in range(len(view.perm))),
                          view.sliced_by)
  return view


def _propagate(eqn, ins: list[Any]) -> Any:
  """Returns the view an equation's single output holds, if any."""
  name = eqn.primitive.name
  view = ins[0] if ins else None
  if view is None or any(o is not None for o in ins[1:]):
    return None
  if name in _PASS_THROUGH:
    return view
  in_shape = tuple(eqn.invars[0].aval.shape)
  out_shape = tuple(eqn.outvars[0].aval.shape)
  if name == "transpose":
    perm = tuple(eqn.params["permutation"])
    if isinstance(view, _LeafView):
      return _LeafView(view.leaf, tuple(view.perm[p] for p in perm), view.sliced_by)
    return _BroadcastView(view.leaf, tuple(perm.index(a) for a in view.axes), view.sliced_by)
  view = _as_broadcast(view)
  if name == "broadcast_in_dim":
    dims = eqn.params["broadcast_dimensions"]
    return _BroadcastView(view.leaf, tuple(dims[a] for a in view.axes), view.sliced_by)
  if name == "squeeze":
    dims = [d % len(in_shape) for d in eqn.params["dimensions"]]
    return _BroadcastView(view.leaf, tuple(a - sum(d < a for d in dims) for a in view.axes),
                          view.sliced_by)
  if name == "reshape" and math.prod(in_shape) == math.prod(
      in_shape[a] for a in view.axes):  # a leaf with size-1 axes added or removed
    leaf_shape = tuple(in_shape[a] for a in view.axes)
    lead = len(out_shape) - len(leaf_shape)
    if lead >= 0 and out_shape[lead:] == leaf_shape:  # numpy's rule: the leaf trails
      return _BroadcastView(view.leaf, tuple(range(lead, len(out_shape))), view.sliced_by)
    big = [i for i, d in enumerate(out_shape) if d != 1]
    if all(d != 1 for d in leaf_shape) and [out_shape[i] for i in big] == list(leaf_shape):
      return _BroadcastView(view.leaf, tuple(big), view.sliced_by)
  return None


def _slice(view: Any, scan: int) -> Any:
  """The view one iteration of `scan` sees of a view it scans over (axis 0), or None.

  Only a leaf whose leading axis is the scanned one is sliced: the body sees
  one layer of a stack.
  """
  if isinstance(view, _LeafView) and view.perm and view.perm[0] == 0:
    return _LeafView(view.leaf, tuple(a - 1 for a in view.perm[1:]), view.sliced_by + (scan,))
  if isinstance(view, _BroadcastView) and view.axes and view.axes[0] == 0:
    return _BroadcastView(view.leaf, tuple(a - 1 for a in view.axes[1:]),
                          view.sliced_by + (scan,))
  return None


def _lift(use: Use, length: int, stacked: bool) -> tuple[Use, int]:
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


def _consumers(jaxpr: Jaxpr) -> dict[Var, list[int]]:
  users: dict[Var, list[int]] = {}
  for index, eqn in enumerate(jaxpr.eqns):
    for v in eqn.invars:
      if not isinstance(v, Literal):
        users.setdefault(v, []).append(index)
  return users


def _open(closed: Any) -> tuple[Jaxpr, list[Any]]:
  if isinstance(closed, ClosedJaxpr):
    return closed.jaxpr, list(closed.consts)
  return closed, []


def _inner_jaxprs(eqn) -> list[Jaxpr]:
  found = []
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, (ClosedJaxpr, Jaxpr)):
        found.append(_open(item)[0])
  return found


def _contains_primitive(jaxpr: Jaxpr, name: str) -> bool:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      return True
    if any(_contains_primitive(inner, name) for inner in _inner_jaxprs(eqn)):
      return True
  return False


def trace(loss_fn: Callable[..., Any], params: Any, args: Sequence[Any],
          has_aux: bool = False, reference: Optional[Sequence[Layer]] = None,
          overrides: Optional[Mapping[str, str]] = None,
          weight_sharing: str = "expand") -> Program:
  """Traces `loss_fn(params, *args)` and finds its layers and losses.

  Args:
    loss_fn: the user's loss function.
    params: the parameters (a pytree of arrays), or their shapes.
    args: the other arguments (example values or shapes).
    has_aux: whether `loss_fn` returns `(loss, aux)`.
    reference: the layers of an earlier trace; if given, this trace must find
      the same layers (used when the estimator meets new argument shapes).
    overrides: per-layer block choices (`jkfac.overrides`).
    weight_sharing: `"expand"` or `"reduce"`: how dense layers treat rows
      beyond the batch (`jkfac.blocks.dense`).

  Returns:
    The program.

  Raises:
    ValueError: no loss is registered, a loss is inside control flow, or
      (with `reference`) the layers differ from the reference.
  """
  flat_params, params_tree = jax.tree.flatten_with_path(params)
  paths = [_path_str(p) for p, _ in flat_params]
  leaves = [leaf for _, leaf in flat_params]
  num_params = len(leaves)

  flat_args, args_tree = jax.tree.flatten(tuple(args))

  def flat_fn(*flat):
    return loss_fn(jax.tree.unflatten(params_tree, flat[:num_params]),
                   *jax.tree.unflatten(args_tree, flat[num_params:]))

  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*leaves, *flat_args)
  out_tree = jax.tree.structure(out_shape)
  _check_output(out_shape, has_aux)
  shapes = [tuple(jax.numpy.shape(leaf)) for leaf in leaves]
  origins = [_LeafView(i, tuple(range(len(s)))) for i, s in enumerate(shapes)]
  origins += [None] * len(flat_args)

  probe = _Walker(shapes, claimed=set())
  probe.walk(closed.jaxpr, closed.consts, origins)
  claimed = {leaf for m in probe.matches if m.source == "tagged" for leaf in m.leaves
             if leaf is not None}
  walker = _Walker(shapes, claimed)
  plan, _ = walker.walk(closed.jaxpr, closed.consts, origins)
  if not walker.losses:
    raise ValueError(
        "The loss function registers no loss. Compute its value with a jkfac loss "
        "(jkfac.softmax_cross_entropy, jkfac.sigmoid_cross_entropy, "
        "jkfac.squared_error), or register the predictive distribution yourself "
        "with jkfac.register_categorical_predictive / register_bernoulli_predictive "
        "/ register_gaussian_predictive.")
  params_info = [Param(i, paths[i], shapes[i], jax.numpy.result_type(leaves[i]))
                 for i in range(num_params)]
  _check_per_example(walker)
  layers, uses = _group(walker, params_info)
  if weight_sharing == "reduce":
    layers = tuple(dataclasses.replace(l, options=l.options + (("weight_sharing", "reduce"),))
                   if l.kind == "dense" else l for l in layers)
  layers, uses = overrides_lib.apply(layers, uses, overrides)
  if reference is not None and tuple(reference) != layers:
    describe = lambda table: [f"{l.name} ({l.kind}, {len(l.params)} params)" for l in table]
    raise ValueError(
        "Tracing the loss function with new argument shapes found different layers "
        f"than at set-up.\n  set-up: {describe(reference)}\n  now:    {describe(layers)}\n"
        "The model's structure must not depend on argument shapes: write the model so "
        "that every batch shape uses the same layers, or build one estimator per shape.")
  return Program(plan, layers, uses, tuple(walker.losses), out_tree)


def _check_per_example(walker: _Walker) -> None:
  """Scale-and-shift statistics need the layer output's leading axis to be the batch."""
  batch = {loss.prediction_shape[0] for loss in walker.losses if loss.prediction_shape}
  for match in walker.matches:
    if (match.kind == "scale_and_shift" and len(batch) == 1
        and match.use.out_shape[match.use.stack:][:1] != tuple(batch)):
      match.problem = (f"applied to an array of shape {match.use.out_shape}, whose leading "
                       f"axis is not the batch ({batch.pop()} examples)")


def _check_output(out_shape: Any, has_aux: bool) -> None:
  if has_aux and not (isinstance(out_shape, (tuple, list)) and len(out_shape) == 2):
    raise ValueError(f"has_aux=True: the loss function must return a pair (loss, aux), "
                     f"got {out_shape}. Return (loss, aux), or leave has_aux=False if it "
                     "returns the loss alone.")
  value = out_shape[0] if has_aux else out_shape
  if not hasattr(value, "shape") or value.shape != ():
    hint = (" Return the batch mean (the jkfac losses do)." if has_aux else
            " Return the batch mean (the jkfac losses do); if it returns (loss, aux), "
            "pass has_aux=True.")
    raise ValueError(f"The loss function must return a scalar loss, got {value}.{hint}")


def _path_str(path: Sequence[Any]) -> str:
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts) if parts else "params"


def _group(walker: _Walker, params: list[Param]) -> tuple[tuple[Layer, ...], tuple[tuple[Use, ...], ...]]:
  """Groups matches that share a kernel into layers; the rest fall back."""
  groups: dict[Any, list[_Match]] = {}
  for position, match in enumerate(walker.matches):
    key = match.leaves[0] if match.leaves[0] is not None else ("untied", position)
    groups.setdefault(key, []).append(match)
  group_count: dict[int, int] = {}
  for group in groups.values():
    for leaf in {leaf for m in group for leaf in m.leaves if leaf is not None}:
      group_count[leaf] = group_count.get(leaf, 0) + 1
  layers: list[Layer] = []
  uses: list[tuple[Use, ...]] = []
  notes: dict[int, str] = {}
  for group in groups.values():
    first = group[0]
    leaves = [leaf for leaf in first.leaves if leaf is not None]
    problems = [m.problem for m in group if m.problem]
    if problems:
      reason = problems[0]
    elif any((m.kind, m.leaves, m.options, m.sliced_by)
             != (first.kind, first.leaves, first.options, first.sliced_by) for m in group):
      reason = "applied in several places with different structure"
    elif any(group_count[leaf] > 1 for leaf in leaves):
      reason = "shared by several layers"
    else:
      reason = None
    if reason is not None:
      for m in group:
        notes.update({leaf: reason for leaf in m.leaves if leaf is not None})
      continue
    roles = blocks.REGISTRY[first.kind].roles
    more = len(first.leaves) - len(roles)  # a dense layer's further kernels
    owned = tuple(dataclasses.replace(params[leaf], role=role)
                  for leaf, role in zip(first.leaves, roles + ("kernel",) * more)
                  if leaf is not None)
    options = first.options + tuple((role, leaf is not None)
                                    for role, leaf in zip(roles[1:], first.leaves[1:]))
    note = first.source + (f", {len(group)} uses" if len(group) > 1 else "")
    stack = owned[0].shape[:len(first.sliced_by)]
    layers.append(Layer(_layer_name([p.path for p in owned]), first.kind, owned, options,
                        note + _stacked_by(first.sliced_by, walker.vmaps), stack))
    uses.append(tuple(m.use for m in group))
  owned_leaves = {p.index for layer in layers for p in layer.params}
  for p in params:
    if p.index in owned_leaves or not jax.numpy.issubdtype(p.dtype, jax.numpy.inexact):
      continue
    note = notes.get(p.index)
    if note is None:
      used_by = sorted(walker.consumers.get(p.index, ()))
      note = ("used by " + ", ".join(used_by)) if used_by else "not used by the loss"
    layers.append(Layer(p.path, "diagonal", (dataclasses.replace(p, role="param"),), (), note))
    uses.append(())
  return _unique_names(layers), tuple(uses)


def _stacked_by(sliced_by: tuple[int, ...], vmaps: set[int]) -> str:
  """The layer note's mention of what stacks it: scans, vmaps or both."""
  how = sorted({"vmap" if i in vmaps else "scan" for i in sliced_by}, reverse=True)
  return ", stacked by " + " and ".join(how) if how else ""


def _unique_names(layers: list[Layer]) -> tuple[Layer, ...]:
  seen: dict[str, int] = {}
  unique = []
  for layer in layers:
    count = seen.get(layer.name, 0)
    seen[layer.name] = count + 1
    unique.append(layer if count == 0 else
                  dataclasses.replace(layer, name=f"{layer.name}#{count}"))
  return tuple(unique)


def _layer_name(paths: list[str]) -> str:
  """The parameters' common folder ('Dense_0' for Dense_0/kernel, Dense_0/bias).

  A trailing 'value' (flax nnx's variables) is not part of a parameter's name.
  """
  split = [p.split("/") for p in paths]
  split = [parts[:-1] if len(parts) > 1 and parts[-1] == "value" else parts for parts in split]
  common = []
  for parts in zip(*split):
    if len(set(parts)) != 1:
      break
    common.append(parts[0])
  if len(common) == len(split[0]):  # a single parameter: drop its own name
    common = common[:-1]
  if common and common != ["params"]:
    return "/".join(common[1:] if common[0] == "params" else common)
  return "+".join(paths)
