# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The `none` block: no curvature; the gradient passes unchanged.

Chosen per layer with `overrides={pattern: "none"}` (see `jkfac.overrides`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import jax
from typing_extensions import override

from jkfac.blocks.base import Block, Captures

if TYPE_CHECKING:  # jkfac.layers imports the blocks, through losses and tags
  from jkfac.layers import Layer

Array = jax.Array


class NoneBlock(Block):
  """Identity preconditioning of one parameter.

  It has no factors and no inverses (`statistics` and `inverse` return `{}`),
  and `precondition` returns the gradients unchanged.
  """

  roles = ("param",)
  needs = "nothing"

  @override
  def statistics(self, layer: Layer, captures: Captures) -> dict[str, Array]:
    return {}

  @override
  def inverse(self, layer: Layer, factors: dict[str, Array], damping: Array,
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
