# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Scale-and-shift layers: `x̂ * scale + shift`, a normalisation layer's affine part.

The matcher (`match`) notes each `mul` or `add` of an activation and a
vector parameter broadcast along one axis (an `Affine`); once the jaxpr is
walked, `finish` pairs each scale with the shift added right after it (flax's
LayerNorm, RMSNorm, GroupNorm, BatchNorm), skipping the dense and
convolution biases (`jkfac.kinds.products`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional, Sequence

from jax.extend.core import Literal, Var

from jkfac import layers
from jkfac.kinds import views

NAME = "scale_and_shift"


class Options(NamedTuple):
  """The options a scale-and-shift layer carries (`Layer.option`).

  Read by `jkfac.blocks.scale_and_shift`.

  Attributes:
    axes: the input's axes the parameters run along.
    shift: whether the layer has a shift.
    full: whether its block is the full Fisher block of scale and shift
      together (`overrides=` `"full"`) rather than their diagonal.
  """
  axes: tuple[int, ...]
  shift: bool
  full: bool = False


@dataclasses.dataclass(frozen=True)
class Affine:
  """A `mul` or `add` of an activation and a broadcast vector parameter.

  Attributes:
    op: `"mul"` or `"add"`.
    leaf: the parameter's leaf.
    axis: the axis it runs along.
    other: the activation.
    out: the result.
    sliced_by: the scans that slice the leaf.
  """
  op: str
  leaf: int
  axis: int
  other: Var
  out: Var
  sliced_by: tuple[int, ...] = ()


def match(walker: views.WalkState, eqn: Any, ins: list[Any], frame: views.Frame) -> bool:
  """Notes a `mul` or `add` of an activation and a vector parameter in `frame.affine`.

  Args:
    walker: the walk.
    eqn: the `mul` or `add` equation.
    ins: the views its operands hold.
    frame: the jaxpr's walk.

  Returns:
    False: the walker also treats the equation as any other.
  """
  if len(ins) != 2 or sum(o is not None for o in ins) != 1:
    return False
  side = 0 if ins[0] is not None else 1
  other = eqn.invars[1 - side]
  view = views.as_broadcast(ins[side])
  out = eqn.outvars[0]
  if (view is None or len(view.axes) != 1 or view.leaf in walker.claimed
      or isinstance(other, Literal) or other.aval.ndim != out.aval.ndim
      or eqn.invars[side].aval.ndim != out.aval.ndim):
    return False
  frame.affine.append(Affine(eqn.primitive.name, view.leaf, view.axes[0], other, out,
                             view.sliced_by))
  return False


def finish(walker: views.WalkState, frame: views.Frame) -> None:
  """Scale-and-shift layers: `x̂ * scale (+ shift)` with `x̂` a product of activations.

  A scale multiplies an activation; the product may be broadcast and
  multiplied by further activations before it is used (flax's normalisation
  layers scale `rsqrt(var + eps)` first, then multiply by `x - mean`): the
  layer's input `x̂` is the product of every multiplicand, captured as its
  factors, and its output is the end of that chain, or the `add` of a
  shift right after it. The `add`s of a dense or convolution bias
  (`frame.biased`) are not shifts.

  Args:
    walker: the walk.
    frame: the jaxpr's walk, its candidates in `frame.affine`.
  """
  jaxpr, origin = frame.jaxpr, frame.origin
  found = [a for a in frame.affine if a.out not in frame.biased]
  consumers = views.consumers(jaxpr)
  shifts = {a.other: a for a in found if a.op == "add"}
  paired = set()
  for scale in (a for a in found if a.op == "mul"):
    view, out = views.BroadcastView(scale.leaf, (scale.axis,), scale.sliced_by), scale.out
    factors = [scale.other]
    while out not in jaxpr.outvars and len(consumers.get(out, [])) == 1:
      eqn = jaxpr.eqns[consumers[out][0]]
      name = eqn.primitive.name
      if name in ("broadcast_in_dim", "reshape"):
        moved = views.propagate(eqn, [view])
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
    _add(walker, frame, leaves, view.axes[0], out, factors, scale.sliced_by)
  for shift in found:
    if shift.op == "add" and shift not in paired:
      _add(walker, frame, (None, shift.leaf), shift.axis, shift.out, [], shift.sliced_by)


def _add(walker: views.WalkState, frame: views.Frame, leaves: tuple[Optional[int], ...],
         axis: int, out: Var, factors: list[Var], sliced_by: tuple[int, ...]) -> None:
  """Records a scale-and-shift layer's match and its use in the plan."""
  shape = tuple(out.aval.shape)
  use = layers.Use(walker.new_id(), x_axes=(axis,), out_axes=(axis,), x_shape=shape,
                   out_shape=shape)
  frame.plan.perturb[out] = use.id
  frame.plan.capture[use.id] = tuple(factors)
  walker.matches.append(views.Match(NAME, leaves, use, (("axes", (axis,)),), "found",
                                    sliced_by=sliced_by))


def check_batch_axis(matches: Sequence[views.Match], losses: Sequence[layers.Loss]) -> None:
  """Marks the scale-and-shift matches whose output's leading axis is not the batch.

  Their statistics need it to be (per-example gradients of the parameters):
  such a match gets a `problem` and falls back.

  Args:
    matches: the walk's matches.
    losses: the registered losses, whose predictions' leading axis is the batch.
  """
  batch = {loss.prediction_shape[0] for loss in losses if loss.prediction_shape}
  for match_ in matches:
    if (match_.kind == NAME and len(batch) == 1
        and match_.use.out_shape[match_.use.stack:][:1] != tuple(batch)):
      match_.problem = (f"applied to an array of shape {match_.use.out_shape}, whose leading "
                        f"axis is not the batch ({batch.pop()} examples)")
