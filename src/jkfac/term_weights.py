# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""How a masked (weighted) loss weighs the curvature: its terms' weights.

A loss `sum(m * nll) / sum(m)` over terms (examples, or examples and
positions) is the mean over its terms of `q * nll` with `q = m * terms /
sum(m)`. The curvature pass scales each term's cotangents by `sqrt(q)`
(`over_outputs`), the input-side statistics weigh each row by its term's `q`
(`row_side_weights`, lined up with a layer's rows by
`jkfac.blocks.base.row_weights`), and the quadratic model's products by `q`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from jkfac import losses, tracing

Array = jax.Array


def term_weights(loss: tracing.Loss, mask: Optional[Array]) -> Optional[Array]:
  """A masked loss's term weights scaled to mean 1: `mask * terms / sum(mask)`.

  With them, the loss `sum(mask * nll) / sum(mask)` is the mean over its
  terms of `weight * nll`, and its curvature the same mean of the terms'
  curvatures; all zero when every term is masked.
  """
  if mask is None:
    return None
  return mask * (loss.num_examples / losses.mask_total(mask))


def over_outputs(weights: Array, ndim: int) -> Array:
  """Term weights with size-1 axes appended, to scale arrays of `ndim` axes."""
  return weights.reshape(weights.shape + (1,) * (ndim - weights.ndim))


def row_side_weights(registered: Sequence[tracing.Loss],
                      weights: Sequence[Optional[Array]]) -> Optional[Array]:
  """The weights of the input-side statistics' rows, from the losses' term weights.

  None when no loss is masked. With one term shape, the losses' weights
  averaged by their coefficients; with several, each reduced to the
  examples (the mean over a term's positions) first. The blocks line them
  up with their rows (`blocks.base.row_weights`).
  """
  if all(w is None for w in weights):
    return None
  full = [jnp.ones(l.term_shape) if w is None else w for l, w in zip(registered, weights)]
  if len({w.shape for w in full}) > 1:
    full = [jnp.mean(w.reshape(w.shape[0], -1), axis=1) for w in full]
    if len({w.shape for w in full}) > 1:
      return None
  coefficients = [l.weight for l in registered]
  if not sum(coefficients):
    coefficients = [1.0] * len(full)
  return sum(c / sum(coefficients) * w for c, w in zip(coefficients, full))
