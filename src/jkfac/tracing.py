# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Trace the loss once: find the layers, the losses, and build the layer table.

`trace(loss_fn, params, args)` calls `jax.make_jaxpr` and walks the jaxpr,
following every parameter leaf through casts and transposes (a *view* of the
leaf) and every bias leaf through reshapes and broadcasts. It finds:

- manual layer tags (`register_dense`, ...), whose parameters they own first;
- the layers of each kind (`jkfac.kinds`: dense, conv, embedding,
  scale-and-shift): each equation goes to the matcher of the kind that handles
  its primitive (`kinds.BY_PRIMITIVE`), and each kind finishes what its
  matcher found once the jaxpr is walked (a dense layer's bias: when the
  product's only consumer is an `add` of a view of a leaf along the output
  axes);
- loss tags, from the loss functions of `jkfac.losses`.

The views of the leaves, the matches and the walk's state are in
`jkfac.kinds.views`; the walker here adds the tags, the calls and the scans.

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
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
from jax.extend.core import Jaxpr, Literal, Var

from jkfac import blocks, interpret, kinds, tags
from jkfac import overrides as overrides_lib
from jkfac.kinds import dense, scale_and_shift, views
from jkfac.layers import Layer, Loss, Param, Program, Use  # what the trace finds

_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr",
          "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr"}
_CHECKPOINTS = frozenset({"remat2", "checkpoint", "remat"})
# The layer tags' functions, for messages: "register_dense, register_conv or ...".
_TAG_FUNCTIONS = [f"register_{tag}" for tag in kinds.BY_TAG]
_TAGGERS = ", ".join(_TAG_FUNCTIONS[:-1]) + " or " + _TAG_FUNCTIONS[-1]


class _Walker(views.WalkState):
  """Walks a jaxpr tree once, building plans and collecting matches and losses."""

  def __init__(self, leaf_shapes: Sequence[tuple[int, ...]], claimed: set[int]):
    super().__init__(leaf_shapes, claimed)
    self.losses: list[Loss] = []

  def walk(self, jaxpr: Jaxpr, consts: list[Any], origins: list[Any]
           ) -> tuple[interpret.Plan, list[Any]]:
    """Walks one jaxpr: its plan, and the views its outputs hold.

    An equation of a primitive that a layer kind handles goes to its matcher
    (`kinds.BY_PRIMITIVE`); then each kind finishes what it found, in registry order.
    """
    plan = interpret.Plan(jaxpr, list(consts))
    origin: dict[Var, Any] = {v: o for v, o in zip(jaxpr.invars, origins) if o is not None}
    frame = views.Frame(jaxpr, plan, origin)
    for index, eqn in enumerate(jaxpr.eqns):
      ins = [None if isinstance(v, Literal) else origin.get(v) for v in eqn.invars]
      name = eqn.primitive.name
      outs: list[Any] = [None] * len(eqn.outvars)
      kind = kinds.BY_PRIMITIVE.get(name)
      if name == tags.LAYER_TAG_NAME:
        self._layer_tag(eqn, ins, plan)
      elif name == tags.LOSS_TAG_NAME:
        self._loss_tag(eqn, plan)
      elif kind is not None and kind.match(self, eqn, ins, frame):
        pass  # the kind's alone
      elif name in _CALLS or name in _CHECKPOINTS:
        dense.follow_members(self, eqn)
        outs = self._nested(index, eqn, ins, plan)
      elif name == "scan":
        outs = self._scan(index, eqn, ins, plan)
      else:
        outs = [views.propagate(eqn, ins)] if len(eqn.outvars) == 1 else outs
        if any(o is not None for o in ins):
          self.record_consumers(name, ins, outs)
        if not any(o is not None for o in outs) and views.inner_jaxprs(eqn):
          self._check_no_tags_inside(eqn)
        dense.follow_members(self, eqn)
      origin.update({v: o for v, o in zip(eqn.outvars, outs) if o is not None})
    for kind in kinds.KINDS.values():
      if kind.finish is not None:
        kind.finish(self, frame)
    return plan, [None if isinstance(v, Literal) else origin.get(v) for v in jaxpr.outvars]

  def _check_no_tags_inside(self, eqn, layer_tags: bool = True) -> None:
    """Refuses a loss (or a layer tag) inside control flow the walk does not enter."""
    for inner in views.inner_jaxprs(eqn):
      if layer_tags and views.contains_primitive(inner, tags.LAYER_TAG_NAME):
        raise ValueError(
            f"A jkfac layer tag ({_TAGGERS}) is inside a `{eqn.primitive.name}` (lax.cond, "
            "lax.switch, lax.while_loop or a similar control-flow primitive): jkfac does "
            "not look inside control flow other than lax.scan, so the tagged layer would "
            "get no block of its own. Tag the layer outside it (unroll a short loop in "
            "Python, or apply the layer once to the stacked inputs after the loop), or "
            "remove the tag to leave its parameters to the diagonal fallback block.")
      if views.contains_primitive(inner, tags.LOSS_TAG_NAME):
        raise ValueError(
            f"A registered loss is inside a `{eqn.primitive.name}` "
            "(lax.cond, lax.switch, lax.while_loop, lax.scan or a similar "
            "control-flow primitive). jkfac needs the loss outside control flow: "
            "compute every branch's predictions, select them with jnp.where, and "
            "call the jkfac loss function once on the result (for a loop, return the "
            "predictions from it and compute the loss after it).")

  def _nested(self, index: int, eqn, ins: list[Any], plan: interpret.Plan) -> list[Any]:
    """A call (`jit`, `custom_vjp`, ...) or a `remat`: its jaxpr walked, inlined in the plan."""
    name = eqn.primitive.name
    if name in _CHECKPOINTS:
      inner, consts, how = eqn.params["jaxpr"], [], interpret.CHECKPOINT
    else:
      closed = eqn.params.get(_CALLS[name])
      if closed is None:
        return [None] * len(eqn.outvars)
      inner, consts, how = views.open_jaxpr(closed) + (interpret.INLINE,)
    for outer, inner_var in zip(eqn.invars, inner.invars):
      if not isinstance(outer, Literal) and outer in self.members:
        self.members[inner_var] = self.members[outer]
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
    body, consts = views.open_jaxpr(params["jaxpr"])
    num_consts, num_carry = params["num_consts"], params["num_carry"]
    scan = self.new_id()
    origins = []
    for position, view in enumerate(ins):
      if view is None or position < num_consts:
        origins.append(view)
        continue
      sliced = views.slice_view(view, scan) if position >= num_consts + num_carry else None
      if sliced is None:  # carried, or scanned over another axis
        self.record_consumers("scan", [view], [None])
      origins.append(sliced)
    first = len(self.matches)
    inner_plan, _ = self.walk(body, consts, origins)
    if not inner_plan.active:
      return [None] * len(eqn.outvars)
    for match in self.matches[first:]:
      match.use, inner_plan.scan_axis[match.use.id] = views.lift(
          match.use, params["length"], scan in match.sliced_by)
    plan.nested[index] = (interpret.SCAN, inner_plan)
    return [None] * len(eqn.outvars)

  def _layer_tag(self, eqn, ins: list[Any], plan: interpret.Plan) -> None:
    """A layer tag (`jkfac.tags.register_*`): a match of its kind, which owns its parameters."""
    kind = eqn.params["kind"]  # the tag's kind string (`kinds.Kind.tag`)
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
      if not isinstance(view, (views.LeafView, views.BroadcastView)) or (
          isinstance(view, views.LeafView) and view.perm != tuple(range(len(view.perm)))):
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
    use = Use(self.new_id(), x_axes=(x.aval.ndim - 1,), out_axes=(y.aval.ndim - 1,),
              x_shape=tuple(x.aval.shape), out_shape=tuple(y.aval.shape))
    plan.perturb[eqn.outvars[0]] = use.id
    plan.capture[use.id] = (x,)
    self.matches.append(views.Match(kinds.BY_TAG[kind].name, tuple(leaves), use,
                                    eqn.params["meta"], "tagged",
                                    sliced_by=slicing.pop() if slicing else ()))

  def _loss_tag(self, eqn, plan: interpret.Plan) -> None:
    """A loss tag (`jkfac.tags.loss_tag`): a registered loss."""
    mask = eqn.invars[2] if len(eqn.invars) > 2 else None
    loss = Loss(self.new_id(), eqn.params["distribution"], eqn.params["weight"],
                tuple(eqn.outvars[0].aval.shape),
                None if mask is None else len(mask.aval.shape))
    self.losses.append(loss)
    plan.losses.append((loss.id, eqn.outvars[0], eqn.invars[1], mask))


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
  origins = [views.LeafView(i, tuple(range(len(s)))) for i, s in enumerate(shapes)]
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
  scale_and_shift.check_batch_axis(walker.matches, walker.losses)
  layers, uses = _group(walker, params_info)
  layers = dense.with_weight_sharing(layers, weight_sharing)
  layers, uses = overrides_lib.apply(layers, uses, overrides)
  if reference is not None and tuple(reference) != layers:
    describe = lambda table: [f"{l.name} ({l.kind}, {len(l.params)} params)" for l in table]
    raise ValueError(
        "Tracing the loss function with new argument shapes found different layers "
        f"than at set-up.\n  set-up: {describe(reference)}\n  now:    {describe(layers)}\n"
        "The model's structure must not depend on argument shapes: write the model so "
        "that every batch shape uses the same layers, or build one estimator per shape.")
  return Program(plan, layers, uses, tuple(walker.losses), out_tree)


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


def _group(walker: _Walker, params: list[Param]
           ) -> tuple[tuple[Layer, ...], tuple[tuple[Use, ...], ...]]:
  """Groups matches that share a kernel into layers; the rest fall back."""
  groups: dict[Any, list[views.Match]] = {}
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
    roles = blocks.REGISTRY[kinds.KINDS[first.kind].default_block].roles
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
