# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The embedding block: a lookup `y = table[ids]` as a Kronecker block.

A lookup is a dense layer whose input is the one-hot vector of the id, so
`A = mean(onehot onehot^T)` is diagonal: the ids' frequencies over the
batch's rows (never a vocabulary-sized matrix; stored as a vector), and
`G = sum(g g^T)` over the rows, as for a dense layer (the estimator scales
the `g`s so that this sum is the per-example mean). The preconditioned
gradient is `diag(1 / (counts + π√λ)) ∇table (G + √λ/π I)^{-1}` (factored
Tikhonov damping, K-FAC section 6.3). Ids outside the table (which
`jnp.take` fills and indexing clamps) count for nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import jax
import jax.numpy as jnp
from typing_extensions import override

from jkfac import linalg
from jkfac.blocks.base import Block, Captures, row_weights
from jkfac.damping import Damping
from jkfac.sharding import row_products

if TYPE_CHECKING:  # jkfac.layers imports the blocks, through losses and tags
  from jkfac.layers import Layer

Array = jax.Array


class EmbeddingBlock(Block):
  """Kronecker block of a lookup table, with a diagonal input factor."""

  roles = ("table",)
  needs = "activations"
  kronecker = True

  def statistics(self, layer: Layer, captures: Captures) -> dict[str, Array]:
    """Returns `{"A": id frequencies (vocab,), "G": (features, features)}`.

    Args:
      layer: the layer (`tracing.Layer`), whose table has shape
        `(vocab, features)`.
      captures: the ids looked up and the output derivatives, one entry per
        use.

    Returns:
      `A[i]`, the fraction of the looked-up ids (all uses together) equal to
      `i` (weighted by a masked loss's term weights), ids outside the table
      adding to no entry; `G`, the sum over the rows of `g g^T`.
    """
    vocab, features = layer.params[0].shape
    dtype = captures.dtype
    counts, g_cov, rows = jnp.zeros((vocab,), dtype), 0.0, 0
    for ids, g in zip(captures.inputs, captures.output_grads):
      weight = row_weights(captures.weights, ids.shape, dtype)  # a masked loss's
      ids = ids.reshape(-1).astype(jnp.int32)
      counts = counts.at[ids].add(jnp.ones(ids.shape, dtype) if weight is None
                                  else weight.reshape(-1), mode="drop")
      rows += ids.shape[0]
      g_rows = g.astype(dtype).reshape(-1, features)
      g_cov = g_cov + row_products(g_rows, g_rows)
    return {"A": counts / rows, "G": g_cov}

  def refresh(self, layer: Layer, factors: dict[str, Array], damping: Damping,
              method: str = "cholesky") -> dict[str, Array]:
    """Returns `1 / (A + π√λ)` and `(G + √λ/π I)^{-1}` (factored Tikhonov).

    Args:
      layer: the layer (`tracing.Layer`); unused.
      factors: `A` (the id frequencies) and `G`, averaged over batches.
      damping: λ.
      method: how to invert the damped `G` (`linalg.damped_inverse`).

    Returns:
      `{"A_inv": (vocab,), "G_inv": (features, features), "pi": π}`, with π
      from the traces of `diag(A)` and `G` (`Damping.factored`).
    """
    a, g = factors["A"], factors["G"]
    shift_a, shift_g, pi = damping.factored(jnp.sum(a), a.shape[0], jnp.trace(g), g.shape[0])
    return {"A_inv": 1.0 / (jnp.maximum(a, 0.0) + shift_a),
            "G_inv": linalg.damped_inverse(g, shift_g, method), "pi": pi}

  def precondition(self, layer: Layer, inverse: dict[str, Array],
                   grads: Sequence[Array]) -> tuple[Array, ...]:
    """Returns `diag(A_inv) ∇table G_inv`.

    Args:
      layer: the layer (`tracing.Layer`); unused.
      inverse: `A_inv` and `G_inv` (`refresh`).
      grads: the table's gradient, shape `(vocab, features)`.

    Returns:
      A 1-tuple: the preconditioned table gradient, typed as `grads[0]`.
    """
    dtype = inverse["G_inv"].dtype
    u = (inverse["A_inv"][:, None] * grads[0].astype(dtype)) @ inverse["G_inv"]
    return (u.astype(grads[0].dtype),)

  @override
  def describe(self, layer: Layer) -> str:
    vocab, features = layer.params[0].shape
    return f"A diag {vocab}, G {features}x{features}"


BLOCK = EmbeddingBlock()
