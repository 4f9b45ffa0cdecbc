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
calls. Parameters that no layer owns are handed to the `"diagonal"` fallback
block and listed, with the operations that use them, in the layer table.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import jax
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal, Var

from jkfac import blocks, interpret, losses, tags

_PASS_THROUGH = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision"})
_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr",
          "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr"}
_CHECKPOINTS = frozenset({"remat2", "checkpoint", "remat"})


@dataclasses.dataclass(frozen=True)
class Param:
  """A parameter leaf: its index among the flattened leaves, path and shape."""
  index: int
  path: str
  shape: tuple[int, ...]
  dtype: Any
  role: str = ""


@dataclasses.dataclass(frozen=True)
class Layer:
  """One curvature block's worth of parameters.

  Attributes:
    name: a readable name, from the parameters' common path.
    kind: the block type (`"dense"`, `"diagonal"`, ...).
    params: the parameter leaves it owns, in the block's order.
    options: static facts the block needs (for dense: `transposed`, `bias`).
    note: how it was found, or why it is a fallback.
  """
  name: str
  kind: str
  params: tuple[Param, ...]
  options: tuple[tuple[str, Any], ...] = ()
  note: str = ""

  def option(self, key: str, default: Any = None) -> Any:
    return dict(self.options).get(key, default)


@dataclasses.dataclass(frozen=True)
class Use:
  """One place in the graph where a layer is applied.

  Attributes:
    id: the perturbation/capture id.
    x_axis: the input's feature axis (contracted with the weight).
    out_axis: the output's feature axis.
    x_shape: the input's shape.
    out_shape: the output's shape.
  """
  id: int
  x_axis: int
  out_axis: int
  x_shape: tuple[int, ...]
  out_shape: tuple[int, ...]

  @property
  def rows(self) -> int:
    """How many rows (examples times positions) the use contributes."""
    return math.prod(self.x_shape) // self.x_shape[self.x_axis]


@dataclasses.dataclass(frozen=True)
class Loss:
  """A registered loss: its distribution, weight and prediction shape."""
  id: int
  distribution: str
  weight: float
  prediction_shape: tuple[int, ...]

  @property
  def num_examples(self) -> int:
    return losses.DISTRIBUTIONS[self.distribution].num_examples(self.prediction_shape)


@dataclasses.dataclass
class Program:
  """A traced loss function, ready to be evaluated by `interpret.run`.

  Attributes:
    plan: the evaluation plan of the top-level jaxpr.
    layers: the layers, in graph order, fallbacks last.
    uses: for each layer, its uses (empty for fallback layers).
    losses: the registered losses, in graph order.
    out_tree: the tree structure of the loss function's output.
  """
  plan: interpret.Plan
  layers: tuple[Layer, ...]
  uses: tuple[tuple[Use, ...], ...]
  losses: tuple[Loss, ...]
  out_tree: Any


# Views of parameter leaves, tracked through the graph.
@dataclasses.dataclass(frozen=True)
class _LeafView:
  leaf: int
  perm: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _VectorView:
  leaf: int
  axis: int


@dataclasses.dataclass
class _Match:
  kind: str
  leaves: tuple[Optional[int], ...]  # kernel/bias or the tag's parameters
  use: Optional[Use]
  options: tuple[tuple[str, Any], ...]
  source: str


class _Walker:
  """Walks a jaxpr tree once, building plans and collecting matches."""

  def __init__(self, leaf_shapes: Sequence[tuple[int, ...]], claimed: set[int]):
    self.leaf_shapes = leaf_shapes
    self.claimed = claimed
    self.matches: list[_Match] = []
    self.losses: list[Loss] = []
    self.consumers: dict[int, set[str]] = {}
    self._next_id = 0

  def _new_id(self) -> int:
    self._next_id += 1
    return self._next_id - 1

  def walk(self, jaxpr: Jaxpr, consts: list[Any], origins: list[Any]) -> tuple[interpret.Plan, list[Any]]:
    plan = interpret.Plan(jaxpr, list(consts))
    origin: dict[Var, Any] = {v: o for v, o in zip(jaxpr.invars, origins) if o is not None}
    pending: list[tuple[_Match, Var, Var, int, int]] = []
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
      elif name in _CALLS or name in _CHECKPOINTS:
        outs = self._nested(index, eqn, ins, plan)
      else:
        outs = [_propagate(eqn, ins)] if len(eqn.outvars) == 1 else outs
        if any(o is not None for o in ins):
          self._record_consumers(name, ins, outs)
        if not any(o is not None for o in outs) and _inner_jaxprs(eqn):
          self._check_no_loss(eqn)
      origin.update({v: o for v, o in zip(eqn.outvars, outs) if o is not None})
    self._finish_dense(jaxpr, plan, origin, pending)
    return plan, [None if isinstance(v, Literal) else origin.get(v) for v in jaxpr.outvars]

  def _record_consumers(self, name: str, ins: list[Any], outs: list[Any]) -> None:
    if any(o is not None for o in outs):
      return  # a view op: the view's consumers are recorded instead
    for o in ins:
      if o is not None:
        self.consumers.setdefault(o.leaf, set()).add(name)

  def _check_no_loss(self, eqn) -> None:
    for inner in _inner_jaxprs(eqn):
      if _contains_primitive(inner, tags.LOSS_TAG_NAME):
        raise ValueError(
            f"A registered loss is inside a `{eqn.primitive.name}` "
            "(lax.cond, lax.switch, lax.while_loop, lax.scan or a similar "
            "control-flow primitive). jkfac needs the loss outside control flow: "
            "compute every branch's predictions, select them with jnp.where, and "
            "call the jkfac loss function once on the result.")

  def _nested(self, index: int, eqn, ins: list[Any], plan: interpret.Plan) -> list[Any]:
    name = eqn.primitive.name
    if name in _CHECKPOINTS:
      inner, consts, how = eqn.params["jaxpr"], [], interpret.CHECKPOINT
    else:
      closed = eqn.params.get(_CALLS[name])
      if closed is None:
        return [None] * len(eqn.outvars)
      inner, consts, how = _open(closed) + (interpret.INLINE,)
    inner_plan, inner_outs = self.walk(inner, consts, ins)
    if inner_plan.active:
      plan.nested[index] = (how, inner_plan)
    return inner_outs

  def _layer_tag(self, eqn, ins: list[Any], plan: interpret.Plan) -> None:
    kind = eqn.params["kind"]
    present = eqn.params["present"]
    operands = iter(range(2, len(eqn.invars)))
    leaves: list[Optional[int]] = []
    for is_present in present:
      if not is_present:
        leaves.append(None)
        continue
      position = next(operands)
      view = ins[position]
      if not isinstance(view, (_LeafView, _VectorView)) or (
          isinstance(view, _LeafView) and view.perm != tuple(range(len(view.perm)))):
        raise ValueError(
            f"register_{kind}: parameter operand {position - 2} is not a parameter "
            "leaf of the loss function (possibly cast to another dtype). Pass the "
            "parameter itself, as it appears in `params`, to the tag.")
      leaves.append(view.leaf)
    y, x = eqn.invars[0], eqn.invars[1]
    use = Use(self._new_id(), x_axis=x.aval.ndim - 1, out_axis=y.aval.ndim - 1,
              x_shape=tuple(x.aval.shape), out_shape=tuple(y.aval.shape))
    plan.perturb[eqn.outvars[0]] = use.id
    plan.capture[use.id] = x
    options = eqn.params["meta"] + (("transposed", False),)
    self.matches.append(_Match(kind, tuple(leaves), use, options, "tagged"))

  def _loss_tag(self, eqn, plan: interpret.Plan) -> None:
    loss = Loss(self._new_id(), eqn.params["distribution"], eqn.params["weight"],
                tuple(eqn.outvars[0].aval.shape))
    self.losses.append(loss)
    plan.losses.append((loss.id, eqn.outvars[0], eqn.invars[1]))

  def _dense(self, index: int, eqn, ins: list[Any], plan: interpret.Plan,
             pending: list[tuple[_Match, Var, Var, int, int]]) -> None:
    (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
    found = None
    if not lhs_b and not rhs_b and len(lhs_c) == 1:
      for side in (1, 0):
        view, other = ins[side], ins[1 - side]
        if (isinstance(view, _LeafView) and len(view.perm) == 2 and other is None
            and view.leaf not in self.claimed):
          found = side, view
          break
    if found is None:
      self._record_consumers("dot_general", ins, [None])
      return
    side, view = found
    param_contract = (rhs_c if side == 1 else lhs_c)[0]
    x_axis = (lhs_c if side == 1 else rhs_c)[0]
    out = eqn.outvars[0]
    out_axis = out.aval.ndim - 1 if side == 1 else 0
    transposed = view.perm[param_contract] == 1
    match = _Match("dense", (view.leaf, None), None, (("transposed", transposed),), "found")
    self.matches.append(match)  # completed by _finish_dense, once bias views are known
    pending.append((match, eqn.invars[1 - side], out, x_axis, out_axis))

  def _finish_dense(self, jaxpr: Jaxpr, plan: interpret.Plan, origin: dict[Var, Any],
                    pending: list[tuple[_Match, Var, Var, int, int]]) -> None:
    consumers = _consumers(jaxpr)
    for match, x, out, x_axis, out_axis in pending:
      bias, out = self._bias(jaxpr, out, out_axis, consumers, origin)
      match.leaves = (match.leaves[0], bias)
      match.use = Use(self._new_id(), x_axis=x_axis, out_axis=out_axis,
                      x_shape=tuple(x.aval.shape), out_shape=tuple(out.aval.shape))
      plan.perturb[out] = match.use.id
      plan.capture[match.use.id] = x

  def _bias(self, jaxpr: Jaxpr, out: Var, out_axis: int, consumers, origin):
    users = consumers.get(out, [])
    if len(users) != 1 or out in jaxpr.outvars:
      return None, out
    eqn = jaxpr.eqns[users[0]]
    if eqn.primitive.name != "add" or eqn.outvars[0].aval.shape != out.aval.shape:
      return None, out
    other = eqn.invars[1] if eqn.invars[0] is out else eqn.invars[0]
    view = None if isinstance(other, Literal) else _as_vector(origin.get(other), self.leaf_shapes)
    size = out.aval.shape[out_axis]
    if (view is None or view.axis != out_axis or view.leaf in self.claimed
        or self.leaf_shapes[view.leaf] != (size,)):
      return None, out
    return view.leaf, eqn.outvars[0]


def _as_vector(view: Any, leaf_shapes) -> Optional[_VectorView]:
  if isinstance(view, _VectorView):
    return view
  if isinstance(view, _LeafView) and len(leaf_shapes[view.leaf]) == 1:
    return _VectorView(view.leaf, 0)
  return None


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
    perm = eqn.params["permutation"]
    if isinstance(view, _LeafView):
      return _LeafView(view.leaf, tuple(view.perm[p] for p in perm))
    return _VectorView(view.leaf, tuple(perm).index(view.axis))
  if isinstance(view, _LeafView):
    if len(view.perm) != 1:
      return None
    view = _VectorView(view.leaf, 0)
  if name == "broadcast_in_dim":
    return _VectorView(view.leaf, eqn.params["broadcast_dimensions"][view.axis])
  if name == "squeeze":
    dims = [d % len(in_shape) for d in eqn.params["dimensions"]]
    return _VectorView(view.leaf, view.axis - sum(d < view.axis for d in dims))
  if name == "reshape":
    size = in_shape[view.axis]
    if size == 1 or math.prod(in_shape) != size:
      return None
    axes = [i for i, d in enumerate(out_shape) if d != 1]
    return _VectorView(view.leaf, axes[0]) if len(axes) == 1 else None
  return None


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
          has_aux: bool = False, reference: Optional[Sequence[Layer]] = None) -> Program:
  """Traces `loss_fn(params, *args)` and finds its layers and losses.

  Args:
    loss_fn: the user's loss function.
    params: the parameters (a pytree of arrays), or their shapes.
    args: the other arguments (example values or shapes).
    has_aux: whether `loss_fn` returns `(loss, aux)`.
    reference: the layers of an earlier trace; if given, this trace must find
      the same layers (used when the estimator meets new argument shapes).

  Returns:
    The program.

  Raises:
    ValueError: no loss is registered, a loss is inside control flow, or
      (with `reference`) the layers differ from the reference.
  """
  flat_params, params_tree = jax.tree_util.tree_flatten_with_path(params)
  paths = [_path_str(p) for p, _ in flat_params]
  leaves = [leaf for _, leaf in flat_params]
  num_params = len(leaves)

  flat_args, args_tree = jax.tree_util.tree_flatten(tuple(args))

  def flat_fn(*flat):
    return loss_fn(jax.tree_util.tree_unflatten(params_tree, flat[:num_params]),
                   *jax.tree_util.tree_unflatten(args_tree, flat[num_params:]))

  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*leaves, *flat_args)
  out_tree = jax.tree_util.tree_structure(out_shape)
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
  layers, uses = _group(walker, params_info)
  if reference is not None and tuple(reference) != layers:
    raise ValueError(
        "Tracing the loss function with new argument shapes found different layers "
        "than at set-up. The model's structure must not depend on argument shapes.")
  return Program(plan, layers, uses, tuple(walker.losses), out_tree)


def _check_output(out_shape: Any, has_aux: bool) -> None:
  value = out_shape[0] if has_aux else out_shape
  if has_aux and not (isinstance(out_shape, tuple) and len(out_shape) == 2):
    raise ValueError("has_aux=True: the loss function must return (loss, aux).")
  if not hasattr(value, "shape") or value.shape != ():
    hint = "" if has_aux else " If it returns (loss, aux), pass has_aux=True."
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
    if any((m.kind, m.leaves, m.options) != (first.kind, first.leaves, first.options)
           for m in group):
      reason = "applied in several places with different structure"
    elif any(group_count[leaf] > 1 for leaf in leaves):
      reason = "shared by several layers"
    elif first.kind not in blocks.REGISTRY:
      reason = f"tagged as {first.kind!r}, which has no block yet"
    else:
      reason = None
    if reason is not None:
      for m in group:
        notes.update({leaf: reason for leaf in m.leaves if leaf is not None})
      continue
    roles = blocks.REGISTRY[first.kind].roles
    owned = tuple(dataclasses.replace(params[leaf], role=role)
                  for leaf, role in zip(first.leaves, roles) if leaf is not None)
    options = first.options + tuple((role, leaf is not None)
                                    for role, leaf in zip(roles[1:], first.leaves[1:]))
    note = first.source + (f", {len(group)} uses" if len(group) > 1 else "")
    layers.append(Layer(_layer_name([p.path for p in owned]), first.kind, owned, options, note))
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
  """The parameters' common folder ('Dense_0' for Dense_0/kernel, Dense_0/bias)."""
  split = [p.split("/") for p in paths]
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
