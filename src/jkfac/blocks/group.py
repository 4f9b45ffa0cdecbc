# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Blocks over groups of layers: how the transform refreshes and applies every block.

A layer's own block is a group of one (`OneLayer`); a block-tridiagonal
chain of dense layers (`jkfac.tridiagonal.ChainBlock`) a group of several,
whose inverse couples consecutive layers.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import jax

from jkfac.blocks.base import Block
from jkfac.damping import Damping

Array = jax.Array


class GroupBlock(Protocol):
  """A block over a group of layers, refreshed and applied to them together.

  The transform refreshes and applies every block as a group block: a
  layer's own block as a group of one (`OneLayer`), a block-tridiagonal
  chain of dense layers (`jkfac.tridiagonal.ChainBlock`) as a group of
  several, whose inverse couples consecutive layers.

  Attributes:
    refreshes: whether the transform calls `refresh` at a refresh.
  """
  refreshes: bool

  def refresh(self, layers: Sequence[Any], factors: Sequence[dict[str, Array]],
              damping: Damping, method: str) -> list[dict[str, Array]]:
    """Each layer's inverses, from the group's averaged factors.

    Args:
      layers: the group's layers, in order.
      factors: each layer's averaged factors.
      damping: λ.
      method: how to invert a damped symmetric factor.

    Returns:
      Per layer, its inverses.
    """
    ...

  def precondition(self, layers: Sequence[Any], inverses: Sequence[dict[str, Array]],
                   grads: Sequence[Sequence[Array]]) -> list[tuple[Array, ...]]:
    """Each layer's preconditioned gradients.

    Args:
      layers: the group's layers, in order.
      inverses: each layer's inverses.
      grads: each layer's parameters' gradients.

    Returns:
      Per layer, its preconditioned gradients, shaped and typed as `grads`.
    """
    ...


class OneLayer(GroupBlock):
  """A layer's block as a group block of one layer.

  Args:
    block: the layer's block (`jkfac.blocks.for_layer`).
  """

  def __init__(self, block: Block):
    self.block = block
    self.refreshes = block.refreshes

  def refresh(self, layers: Sequence[Any], factors: Sequence[dict[str, Array]],
              damping: Damping, method: str) -> list[dict[str, Array]]:
    """Returns `[block.refresh(...)]` of the one layer.

    Args:
      layers: the one layer.
      factors: its averaged factors.
      damping: λ.
      method: how to invert a damped symmetric factor.

    Returns:
      A list of its inverses.
    """
    return [self.block.refresh(layers[0], factors[0], damping, method)]

  def precondition(self, layers: Sequence[Any], inverses: Sequence[dict[str, Array]],
                   grads: Sequence[Sequence[Array]]) -> list[tuple[Array, ...]]:
    """Returns `[block.precondition(...)]` of the one layer.

    Args:
      layers: the one layer.
      inverses: its inverses.
      grads: its parameters' gradients.

    Returns:
      A list of its preconditioned gradients.
    """
    return [self.block.precondition(layers[0], inverses[0], grads[0])]
