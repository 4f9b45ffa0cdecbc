# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The `none` block: no curvature; the gradient passes unchanged.

Chosen per layer with `overrides={pattern: "none"}` (see `jkfac.overrides`).
"""

from __future__ import annotations

from typing import Sequence

import jax

from jkfac.blocks.base import Block, Captures

Array = jax.Array


class NoneBlock(Block):
  """Identity preconditioning of one parameter.

  It has no factors and no inverses (`statistics` and `inverse` return `{}`),
  and `precondition` returns the gradients unchanged.
  """

  roles = ("param",)
  needs = "nothing"

  def statistics(self, layer, captures: Captures) -> dict[str, Array]:
    return {}

  def inverse(self, layer, factors: dict[str, Array], damping: Array,
              method: str = "cholesky") -> dict[str, Array]:
    return {}

  def precondition(self, layer, inverse: dict[str, Array],
                   grads: Sequence[Array]) -> tuple[Array, ...]:
    return tuple(grads)

  def describe(self, layer) -> str:
    return "none (gradient unchanged)"


BLOCK = NoneBlock()
