# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""What tracing finds: parameter leaves, layers and their uses, losses, programs.

Plain frozen dataclasses: `jkfac.tracing` makes them, the blocks read a
`Layer` and its `Use`s, the estimator evaluates a `Program`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from jkfac import interpret, losses


@dataclasses.dataclass(frozen=True)
class Param:
  """A parameter leaf: its index among the flattened leaves, path and shape.

  Attributes:
    index: its position in `jax.tree.leaves(params)`.
    path: its path in the parameter tree, keys joined by `/` (`"dense/kernel"`;
      `"params"` for a bare array).
    shape: its shape.
    dtype: its dtype.
    role: its name in its layer's block (`"kernel"`, `"bias"`, `"param"`,
      ...: one of the block's `roles`); empty until it is given a layer.
  """
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
    kind: what the layer is (`"dense"`, `"conv"`, ...; `"diagonal"`,
      `"full"` and `"none"` for parameters handed to those blocks), which
      also names its default block.
    params: the parameter leaves it owns, in the block's order.
    options: static facts the block needs (for dense: the kernel leaf's
      `in_axes` and `out_axes`, and `bias`).
    note: how it was found, or why it is a fallback.
    stack: for a stack of layers (a parameter sliced by `lax.scan`), the
      sizes of the leading axes its parameters are stacked along, outermost
      first; each slice is a layer of `kind` (`jkfac.blocks.stacked`).
      Empty for a single layer.
    block: the name of its block in `jkfac.blocks.REGISTRY` when
      `overrides=` chose one other than its kind's (`"ekfac"`); empty for
      the kind's own.
  """
  name: str
  kind: str
  params: tuple[Param, ...]
  options: tuple[tuple[str, Any], ...] = ()
  note: str = ""
  stack: tuple[int, ...] = ()
  block: str = ""

  def option(self, key: str, default: Any = None) -> Any:
    """The value of one of the layer's options.

    Args:
      key: the option's name (`"bias"`, `"in_axes"`, ...).
      default: the value when the layer does not have the option.

    Returns:
      The option's value, or `default`.
    """
    return dict(self.options).get(key, default)


@dataclasses.dataclass(frozen=True)
class Use:
  """One place in the graph where a layer is applied.

  Attributes:
    id: the perturbation/capture id.
    x_axes: the input's feature axes (contracted with the weight, in the
      order of the kernel's `in_axes`).
    out_axes: the output's feature axes (in the order of the kernel's
      `out_axes`).
    x_shape: the input's shape.
    out_shape: the output's shape.
    stack: how many leading axes of the input and output index the layers
      of a stack (a use inside a `scan` over a stacked parameter). Inside a
      `scan` that shares the weights over its iterations, the iterations are
      an axis right after the batch axis (the axis after the stack's).
  """
  id: int
  x_axes: tuple[int, ...]
  out_axes: tuple[int, ...]
  x_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  stack: int = 0


@dataclasses.dataclass(frozen=True)
class Loss:
  """A registered loss: its distribution, weight and prediction shape.

  Attributes:
    id: the loss's id: its key in `interpret.Result.predictions`.
    distribution: the name of its predictive distribution (a key of
      `losses.DISTRIBUTIONS`: `"categorical"`, ...).
    weight: its coefficient in the total loss, as registered.
    prediction_shape: the shape of the prediction it is computed from.
    term_axes: with a mask, how many leading prediction axes index the
      weighted terms (the mask's shape); None: the distribution's own.
  """
  id: int
  distribution: str
  weight: float
  prediction_shape: tuple[int, ...]
  term_axes: Optional[int] = None

  @property
  def masked(self) -> bool:
    """Whether the loss weighs its terms by a mask (`term_weights`)."""
    return self.term_axes is not None

  @property
  def term_shape(self) -> tuple[int, ...]:
    """The shape of the terms the loss averages (or weighs) over."""
    dist = losses.DISTRIBUTIONS[self.distribution]
    axes = dist.term_axes(self.prediction_shape) if self.term_axes is None else self.term_axes
    return self.prediction_shape[:axes]

  @property
  def num_examples(self) -> int:
    """How many terms the loss averages over (`losses.Distribution.num_examples`)."""
    return losses.DISTRIBUTIONS[self.distribution].num_examples(self.prediction_shape,
                                                                self.term_axes)

  @property
  def variables_per_term(self) -> int:
    """Predicted variables in one term (`losses.Distribution.variables_per_term`)."""
    return losses.DISTRIBUTIONS[self.distribution].variables_per_term(self.prediction_shape,
                                                                      self.term_axes)


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
