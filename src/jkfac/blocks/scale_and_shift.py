# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The scale-and-shift block: `y = x̂ * scale + shift` (normalisation layers).

The per-example gradients are exact and cheap from what the estimator
captures: with `g = dL_n/dy` (already scaled so that sums over examples are
means), `∇scale_n = Σ g ⊙ x̂` and `∇shift_n = Σ g`, summed over every axis
except the batch and the parameters' own. The block is diagonal by default,
`mean_n ∇θ_n²` per entry, and full (`mean_n ∇θ_n ∇θ_n^T` over the scale and
shift together) with the layer option `full`, affordable for the usual sizes
(2 x channels).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional, Sequence

import jax
import jax.numpy as jnp
from typing_extensions import override

from jkfac.blocks import diagonal, full
from jkfac.blocks.base import Block, Captures, flatten, unflatten
from jkfac.damping import Damping
from jkfac.sharding import row_products

if TYPE_CHECKING:  # jkfac.layers imports the blocks, through losses and tags
  from jkfac.layers import Layer

Array = jax.Array


def _per_example(layer: Layer, captures: Captures) -> Array:
  """Per-example gradients, shape `(passes x examples, parameter entries)`."""
  axes = layer.option("axes")
  roles = [p.role for p in layer.params]
  total = 0.0
  for x, g in zip(captures.inputs, captures.output_grads):
    g = g.astype(captures.dtype)
    summed = tuple(a + 1 for a in range(1, g.ndim - 1) if a not in axes)  # axis 0: passes
    parts = []
    for role in roles:
      term = g * x.astype(captures.dtype) if role == "scale" else g
      parts.append(jnp.sum(term, axis=summed).reshape(g.shape[0] * g.shape[1], -1))
    total = total + jnp.concatenate(parts, axis=1)
  return total


class ScaleAndShiftBlock(Block):
  """Diagonal (default) or full Fisher block of a scale and/or shift."""

  roles = ("scale", "shift")
  needs = "activations"

  @override
  def choose(self, layer: Layer, choice: str, note: str) -> Optional[Layer]:
    if choice not in ("diagonal", "full"):
      return None
    options = tuple(o for o in layer.options if o[0] != "full") + (("full", choice == "full"),)
    return dataclasses.replace(layer, options=options, note=note)

  def statistics(self, layer: Layer, captures: Captures) -> dict[str, Array]:
    """Returns `{"diag": ...}` (or `{"full": ...}` with option `full`) of this batch.

    Args:
      layer: the layer (`tracing.Layer`), with options `axes` (the input's
        axes that the parameters span) and `full`.
      captures: per use, the input `x̂` (None for a shift alone) and the
        output derivatives.

    Returns:
      With `v` the per-example gradients of the scale and shift together,
      flattened, one per example and curvature pass: `{"diag": Σ v²}`, shape
      `(P,)`, or `{"full": Σ v v^T}`, shape `(P, P)`.
    """
    grads = _per_example(layer, captures)
    if layer.option("full"):
      return {"full": row_products(grads, grads)}
    return {"diag": jnp.sum(jnp.square(grads), axis=0)}

  def refresh(self, layer: Layer, factors: dict[str, Array], damping: Damping,
              method: str = "cholesky") -> dict[str, Array]:
    """Returns `(F + λ I)^{-1}` (full) or `1 / (diag + λ)`.

    Args:
      layer: the layer (`tracing.Layer`), with option `full`.
      factors: `full` or `diag`, averaged over batches.
      damping: λ.
      method: how to invert `F + λ I` (`linalg.damped_inverse`); unused for
        the diagonal.

    Returns:
      `{"full_inv": (P, P)}` (`FullBlock.refresh`) or `{"diag_inv": (P,)}`
      (`DiagonalBlock.refresh`).
    """
    block = full.BLOCK if layer.option("full") else diagonal.BLOCK
    return block.refresh(layer, factors, damping, method)

  def precondition(self, layer: Layer, inverse: dict[str, Array],
                   grads: Sequence[Array]) -> tuple[Array, ...]:
    """Returns the preconditioned scale and shift gradients.

    Args:
      layer: the layer (`tracing.Layer`), with option `full`.
      inverse: `full_inv` or `diag_inv` (`refresh`).
      grads: the gradients of the scale and/or shift, in `layer.params` order.

    Returns:
      `(F + λ I)^{-1} ∇θ` or `∇θ / (diag + λ)`, `∇θ` the gradients flattened
      and concatenated, split back, shaped and typed as `grads`.
    """
    if layer.option("full"):
      return full.BLOCK.precondition(layer, inverse, grads)
    diag_inv = inverse["diag_inv"]
    return unflatten(flatten(grads, diag_inv.dtype) * diag_inv, grads)

  @override
  def describe(self, layer: Layer) -> str:
    if layer.option("full"):
      return full.BLOCK.describe(layer)
    return f"diag {full.size_of(layer)}"


BLOCK = ScaleAndShiftBlock()
