# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The diagonal fallback block, for parameters no Kronecker block owns.

The Fisher's diagonal, `mean_n E[(∂ -log p(y_n|x_n) / ∂θ)^2]`, estimated from
per-example gradients (never from the squared batch gradient, which is
biased towards zero by a factor of the batch size): the estimator
differentiates each example on its own, with the same sampled targets (or
Fisher square-root columns) as the Kronecker blocks. The update is
`∇θ / (diag + λ)`.

Per-example gradients cost one extra forward and backward pass over the
batch, restricted to the fallback parameters, and need a model whose
examples are independent (no batch normalisation across them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import jax
from typing_extensions import override

from jkfac.blocks.base import Block, Captures, per_parameter
from jkfac.damping import Damping

if TYPE_CHECKING:  # jkfac.layers imports the blocks, through losses and tags
  from jkfac.layers import Layer

Array = jax.Array


class DiagonalBlock(Block):
  """Diagonal Fisher block of one parameter."""

  roles = ("param",)
  needs = "per_example_gradients"
  kinds = None

  @override
  def assign(self, layer: Layer, name: str, note: str) -> tuple[Layer, ...]:
    return per_parameter(layer, name, note)

  def gradient_moment(self, grads: Sequence[Array], dtype: Any) -> Array:
    """`Σ_k g_k²` of one example's gradients over the curvature passes.

    Args:
      grads: the one parameter's gradients, shape `(K, *param_shape)`.
      dtype: the factor dtype.

    Returns:
      The parameter's shape.
    """
    return jax.numpy.sum(jax.numpy.square(grads[0].astype(dtype)), axis=0)

  def statistics(self, layer: Layer, captures: Captures) -> dict[str, Array]:
    """Returns `{"diag": sum over examples of squared per-example gradients}`.

    Args:
      layer: the layer (`tracing.Layer`); unused.
      captures: its `gradient_moment`, the sum over examples of
        `gradient_moment` (a mean, by the scaling of the gradients).

    Returns:
      `{"diag": ...}`, the parameter's shape, in `captures.dtype`.
    """
    return {"diag": captures.gradient_moment.astype(captures.dtype)}

  def refresh(self, layer: Layer, factors: dict[str, Array], damping: Damping,
              method: str = "cholesky") -> dict[str, Array]:
    """Returns `1 / (diag + λ)`.

    Args:
      layer: the layer (`tracing.Layer`); unused.
      factors: `diag`, averaged over batches.
      damping: λ.
      method: unused (no matrix to factorise).

    Returns:
      `{"diag_inv": 1 / (max(diag, 0) + λ)}`: entries of `diag` that round-off
      made negative count as 0.
    """
    return {"diag_inv": 1.0 / (jax.numpy.maximum(factors["diag"], 0.0) + damping.value)}

  def precondition(self, layer: Layer, inverse: dict[str, Array],
                   grads: Sequence[Array]) -> tuple[Array, ...]:
    """Returns `∇θ / (diag + λ)`.

    Args:
      layer: the layer (`tracing.Layer`); unused.
      inverse: `diag_inv` (`refresh`).
      grads: the one parameter's gradient.

    Returns:
      A 1-tuple: the preconditioned gradient, typed as `grads[0]`.
    """
    return ((grads[0] * inverse["diag_inv"]).astype(grads[0].dtype),)

  @override
  def describe(self, layer: Layer) -> str:
    return "diag " + "x".join(map(str, layer.params[0].shape)) if layer.params[0].shape else "diag 1"


BLOCK = DiagonalBlock()
