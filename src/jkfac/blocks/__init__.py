# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Curvature blocks, one file each, registered here by kind.

A block is an instance of a subclass of the protocol `jkfac.blocks.base.Block`,
which documents its methods in full, with:

- `roles`: the names of the parameters it owns, in order (`("kernel", "bias")`);
  the first is required, the others optional.
- `needs`: `"activations"` (layer inputs and output derivatives),
  `"per_example_gradients"` or `"nothing"`. A block that needs per-example
  gradients has `gradient_moment(grads, dtype)`, the moment of one example's
  gradients (per parameter, shape `(K, *shape)` for K curvature passes); the
  estimator sums it over examples into `captures.gradient_moment`.
- `statistics(layer, captures) -> dict`: this batch's factors.
- `inverse(layer, factors, damping, method) -> dict`: what `precondition`
  needs; `method` is `"cholesky"` or `"eigh"` (`linalg.damped_inverse`).
- `precondition(layer, inverse, grads) -> tuple`: the preconditioned gradients
  of the layer's parameters, in `layer.params` order.
- `describe(layer) -> str`: the factor shapes for the layer table.

A stack of layers (`Layer.stack`) gets its kind's block once per slice,
batched (`jkfac.blocks.stacked`): use `for_layer(layer)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jkfac.blocks import conv, dense, diagonal, embedding, full, none, scale_and_shift, stacked
from jkfac.blocks.base import Block, Captures

if TYPE_CHECKING:  # jkfac.layers imports the blocks, through losses and tags
  from jkfac.layers import Layer

REGISTRY: dict[str, Block] = {
    "conv": conv.BLOCK,
    "dense": dense.BLOCK,
    "diagonal": diagonal.BLOCK,
    "embedding": embedding.BLOCK,
    "full": full.BLOCK,
    "none": none.BLOCK,
    "scale_and_shift": scale_and_shift.BLOCK,
}


def get(kind: str) -> Block:
  """The block registered for a layer kind.

  Args:
    kind: a key of `REGISTRY` (`"dense"`, `"conv"`, ...), as in `Layer.kind`.

  Returns:
    `REGISTRY[kind]`.
  """
  return REGISTRY[kind]


def for_layer(layer: Layer) -> Block:
  """The block of a layer: its kind's, batched over a stack's slices.

  Args:
    layer: a `tracing.Layer`.

  Returns:
    The `Block`.
  """
  block = REGISTRY[layer.kind]
  if layer.stack and block.needs != "nothing":
    return stacked.Stacked(block, layer.stack)
  return block
