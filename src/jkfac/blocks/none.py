# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The `none` block: no curvature; the gradient passes unchanged.

Chosen per layer with `overrides={pattern: "none"}` (see `jkfac.overrides`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import jax
from typing_extensions import override

from jkfac.blocks.base import Block, Captures, per_parameter
from jkfac.damping import Damping

if TYPE_CHECKING:  # jkfac.layers imports the blocks, through losses and tags
  from jkfac.layers import Layer

Array = jax.Array


class NoneBlock(Block):
  """Identity preconditioning of one parameter.

  It has no factors and no inverses (`statistics` and `refresh` return `{}`),
  and `precondition` returns the gradients unchanged.
  """

  roles = ("param",)
  needs = "nothing"
  kinds = None

  @override
  def assign(self, layer: Layer, name: str, note: str) -> tuple[Layer, ...]:
    return per_parameter(layer, name, note)

  @override
  def statistics(self, layer: Layer, captures: Captures) -> dict[str, Array]:
    return {}

  @override
  def refresh(self, layer: Layer, factors: dict[str, Array], damping: Damping,
              method: str = "cholesky") -> dict[str, Array]:
    return {}

  @override
  def precondition(self, layer: Layer, inverse: dict[str, Array],
                   grads: Sequence[Array]) -> tuple[Array, ...]:
    return tuple(grads)

  @override
  def describe(self, layer: Layer) -> str:
    return "none (gradient unchanged)"


BLOCK = NoneBlock()
