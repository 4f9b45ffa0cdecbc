# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The interface every curvature block implements."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp

from jkfac import sharding

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Captures:
  """What the estimator hands a block for one batch.

  Attributes:
    uses: the layer's uses (`tracing.Use`), one per place it is applied.
    inputs: per use, the layer input `x`.
    output_grads: per use, the output derivatives, shape `(K, *out_shape)`:
      K backward passes (sampled targets, or the columns of the loss's Fisher
      square root in mode "exact"), already scaled so that the output-side
      factor is `sum_k sum_rows g g^T`.
    gradient_moment: for blocks that need per-example gradients, the sum
      over examples of `block.gradient_moment` of each example's gradients
      (already scaled the same way), else None.
    dtype: the factor dtype.
    weights: None, or the weights of the loss's terms when it is masked
      (mean 1, shaped as the terms: `(batch,)` or `(batch, positions)`):
      input-side statistics weigh each row by its term's weight
      (`row_weights`), so that masked examples and tokens contribute
      nothing; the output derivatives already carry them.
  """
  uses: Sequence[Any]
  inputs: Sequence[Array] = ()
  output_grads: Sequence[Array] = ()
  gradient_moment: Optional[Array] = None
  dtype: Any = jnp.float32
  weights: Optional[Array] = None


def row_weights(weights: Optional[Array], rows_shape: Sequence[int], dtype: Any
                ) -> Optional[Array]:
  """The weights of a layer's rows (examples, positions), from the terms' weights.

  Args:
    weights: `Captures.weights` (None: unweighted).
    rows_shape: the shape of the layer's rows, examples first (`(batch,)`,
      `(batch, positions)`, a convolution's `(batch, height, width)`).
    dtype: the factor dtype.

  Returns:
    None without weights; the weights broadcast over `rows_shape` when the
    rows' leading axes are the terms' (a token mask on a layer over the
    tokens) or their flattening (`(batch * positions, ...)` rows); else
    each example's mean weight broadcast over its rows when the rows start
    with the examples; else None (rows that are not the loss's examples,
    whose statistics stay unweighted).
  """
  if weights is None:
    return None
  rows_shape = tuple(rows_shape)
  terms = weights.shape
  if rows_shape and rows_shape[0] == weights.size and len(terms) > 1:
    weights = weights.reshape(-1)  # the terms flattened into rows, (batch * positions, ...)
  elif rows_shape[:len(terms)] != terms:
    if not rows_shape or rows_shape[0] != terms[0]:
      return None
    weights = jnp.mean(weights.reshape(terms[0], -1), axis=1)
  weights = weights.reshape(weights.shape + (1,) * (len(rows_shape) - weights.ndim))
  return jnp.broadcast_to(weights, rows_shape).astype(dtype)


def with_bias_moments(second_moment: Array, mean: Array) -> Array:
  """`[[M, m], [m^T, 1]]`: the second moment of `[a; 1]` from those of `a`.

  Args:
    second_moment: `M = mean(a a^T)`, shape `(..., d, d)`.
    mean: `m = mean(a)`, shape `(..., d)`.

  Returns:
    Shape `(..., d + 1, d + 1)`.
  """
  # Under Explicit axes, a mean over the rows of a tensor-parallel layer's input is
  # sharded over its features: the factor is kept whole.
  second_moment, mean = sharding.gathered(second_moment), sharding.gathered(mean)
  column = mean[..., :, None]
  corner = jnp.ones(mean.shape[:-1] + (1, 1), mean.dtype)
  return jnp.concatenate([jnp.concatenate([second_moment, column], axis=-1),
                          jnp.concatenate([jnp.swapaxes(column, -1, -2), corner], axis=-1)],
                         axis=-2)


class Block(Protocol):
  """A curvature block: the Fisher approximation of one layer's parameters.

  Blocks are stateless, one instance per kind (`jkfac.blocks.REGISTRY`); the
  block classes of `jkfac.blocks` subclass this protocol. For every batch the
  estimator computes a layer's factors with `statistics`; the transform
  averages them over batches, inverts the damped averages with `inverse`
  every `inverse_every` updates, and preconditions the layer's gradients with
  `precondition`. A block that needs per-example gradients also has
  `gradient_moment(grads, dtype)`, the moment of one example's gradients (per
  parameter, shape `(K, *shape)` for K curvature passes), which the estimator
  sums over examples into `Captures.gradient_moment`.

  Attributes:
    roles: the names of the parameters it owns, in order (`("kernel", "bias")`);
      the first is required, the others optional.
    needs: what the estimator captures for it: `"activations"` (layer inputs
      and output derivatives), `"per_example_gradients"` or `"nothing"`.
  """
  roles: tuple[str, ...]
  needs: str

  def statistics(self, layer: Any, captures: Captures) -> dict[str, Array]:
    """This batch's factors of a layer.

    Args:
      layer: the layer (`tracing.Layer`): its parameters and options.
      captures: what the estimator captured for it, as the block `needs`:
        inputs and output derivatives per use, or the summed per-example
        gradient moment.

    Returns:
      The factors, name -> array in `captures.dtype` (`{"A": ..., "G": ...}`
      for a Kronecker block), with the same structure, shapes and dtypes for
      every batch: the transform averages them over batches.
    """
    ...

  def inverse(self, layer: Any, factors: dict[str, Array], damping: Array,
              method: str = "cholesky") -> dict[str, Array]:
    """What `precondition` needs: the inverse of the damped block, or its parts.

    Args:
      layer: the layer (`tracing.Layer`).
      factors: the factors averaged over batches, structured as `statistics`
        returns them.
      damping: λ, a positive scalar in the factor dtype: the block
        approximates the inverse of `F + λ I`.
      method: how to invert a damped symmetric factor, `"cholesky"` or
        `"eigh"` (`linalg.damped_inverse`); unused by blocks with no matrix
        to factorise.

    Returns:
      The inverses, name -> array (`{"A_inv": ..., "G_inv": ..., "pi": ...}`
      for a Kronecker block). The transform keeps its previous inverses when
      these are not finite.
    """
    ...

  def precondition(self, layer: Any, inverse: dict[str, Array],
                   grads: Sequence[Array]) -> tuple[Array, ...]:
    """The preconditioned gradients of a layer's parameters.

    Args:
      layer: the layer (`tracing.Layer`).
      inverse: what `inverse` returned.
      grads: the gradients of the layer's parameters, in `layer.params` order.

    Returns:
      The inverse of the damped block applied to `grads`, one array per
      parameter, in the same order, shaped and typed as `grads`.
    """
    ...

  def describe(self, layer: Any) -> str:
    """The block's factors and their shapes, for the layer table (`Estimator.table`).

    Args:
      layer: the layer (`tracing.Layer`).

    Returns:
      A short description, such as `"A 785x785, G 10x10"`.
    """
    ...


def flatten(grads: Sequence[Array], dtype: Any) -> Array:
  """The parameters' gradients as one vector (in `layer.params` order).

  Args:
    grads: one array per parameter.
    dtype: the vector's dtype.

  Returns:
    Shape `(sum of sizes,)`.
  """
  return jnp.concatenate([g.astype(dtype).reshape(-1) for g in grads])


def unflatten(flat: Array, like: Sequence[Array]) -> tuple[Array, ...]:
  """Splits `flat` into arrays shaped and typed as `like` (inverse of `flatten`).

  Args:
    flat: a vector, as long as the sizes of `like` together.
    like: the arrays whose shapes and dtypes to give the pieces, in order.

  Returns:
    One array per entry of `like`, cast to its dtype.
  """
  out, start = [], 0
  for g in like:
    out.append(flat[start:start + g.size].reshape(g.shape).astype(g.dtype))
    start += g.size
  return tuple(out)
