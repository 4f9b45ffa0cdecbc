# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The interface every curvature block implements."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp

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
  """
  uses: Sequence[Any]
  inputs: Sequence[Array] = ()
  output_grads: Sequence[Array] = ()
  gradient_moment: Optional[Array] = None
  dtype: Any = jnp.float32


def with_bias_moments(second_moment: Array, mean: Array) -> Array:
  """`[[M, m], [m^T, 1]]`: the second moment of `[a; 1]` from those of `a`.

  Args:
    second_moment: `M = mean(a a^T)`, shape `(..., d, d)`.
    mean: `m = mean(a)`, shape `(..., d)`.

  Returns:
    Shape `(..., d + 1, d + 1)`.
  """
  column = mean[..., :, None]
  corner = jnp.ones(mean.shape[:-1] + (1, 1), mean.dtype)
  return jnp.concatenate([jnp.concatenate([second_moment, column], axis=-1),
                          jnp.concatenate([jnp.swapaxes(column, -1, -2), corner], axis=-1)],
                         axis=-2)


class Block(Protocol):
  roles: tuple[str, ...]
  needs: str

  def statistics(self, layer: Any, captures: Captures) -> dict[str, Array]:
    ...

  def inverse(self, layer: Any, factors: dict[str, Array], damping: Array,
              method: str = "cholesky") -> dict[str, Array]:
    ...

  def precondition(self, layer: Any, inverse: dict[str, Array],
                   grads: Sequence[Array]) -> tuple[Array, ...]:
    ...

  def describe(self, layer: Any) -> str:
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
  """Splits `flat` into arrays shaped and typed as `like` (inverse of `flatten`)."""
  out, start = [], 0
  for g in like:
    out.append(flat[start:start + g.size].reshape(g.shape).astype(g.dtype))
    start += g.size
  return tuple(out)
