# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Convolution layers: `conv_general_dilated` of an activation and a kernel view.

Any `lax.conv_general_dilated` whose kernel is a view of a parameter leaf
(cast or transposed) and whose input is an activation is a layer, its spec
in the leaf's axes (`jkfac.blocks.conv.spec_from_params`). The product
awaits its bias with the dense ones (`jkfac.kinds.products`), found in graph
order once the jaxpr is walked (`jkfac.kinds.dense.finish`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from jkfac.blocks import conv as conv_block
from jkfac.kinds import views
from jkfac.kinds.products import Pending

NAME = "conv"


class Options(NamedTuple):
  """The options a convolution layer carries (`Layer.option`), read by `jkfac.blocks.conv`.

  Attributes:
    conv: the convolution's static arguments, in the kernel leaf's axes.
    bias: whether the layer has a bias.
  """
  conv: conv_block.ConvSpec
  bias: bool


def match(walker: views.WalkState, eqn: Any, ins: list[Any], frame: views.Frame) -> bool:
  """`conv_general_dilated` of an activation (lhs) and a kernel view (rhs).

  Args:
    walker: the walk.
    eqn: the `conv_general_dilated` equation.
    ins: the views its operands hold.
    frame: the jaxpr's walk; the product joins `frame.products`.

  Returns:
    True: the walker does nothing more with the equation.
  """
  view, other = ins[1], ins[0]
  spec = None
  if isinstance(view, views.LeafView) and other is None and view.leaf not in walker.claimed:
    spec = conv_block.spec_from_params(eqn.params, view.perm)
  if spec is None:
    walker.record_consumers("conv_general_dilated", ins, [None])
    return True
  found = views.Match(NAME, (view.leaf, None), None, (("conv", spec),), "found",
                      sliced_by=view.sliced_by)
  walker.matches.append(found)
  frame.products.append(Pending(found, eqn.invars[0], eqn.outvars[0], (spec.lhs_spec[1],),
                                (spec.out_spec[1],), (), ()))
  return True
