# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The full Fisher block of a small layer, chosen by `overrides={...: "full"}`.

`F = mean_n E[∇θ_n ∇θ_n^T]` over all of the layer's parameters together (the
kernel and bias of a small dense layer, say), from per-example gradients
computed by the estimator with the same sampled targets (or Fisher
square-root columns) as the Kronecker blocks: no Kronecker assumption at
all, at the price of a `P x P` matrix for `P` parameters and its inverse.
The update is `(F + λ I)^{-1} ∇θ`. Limited to `MAX_SIZE` parameters; like the
diagonal fallback it costs one extra pass over the batch and needs a model
whose examples are independent.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp
from typing_extensions import override

from jkfac import linalg
from jkfac.blocks import stacked
from jkfac.blocks.base import Block, Captures, flatten, unflatten
from jkfac.damping import Damping
from jkfac.sharding import row_products

if TYPE_CHECKING:  # jkfac.layers imports the blocks, through losses and tags
  from jkfac.layers import Layer

Array = jax.Array
MAX_SIZE = 4096  # a 4096 x 4096 float32 factor is 64 MiB; use Kronecker blocks above


class FullBlock(Block):
  """Exact Fisher block of one layer's parameters."""

  roles = ("param",)
  needs = "per_example_gradients"
  kinds = None

  @override
  def assign(self, layer: Layer, name: str, note: str) -> tuple[Layer, ...]:
    """The layer as one full block (per layer of a stack).

    Args:
      layer: the layer found (`tracing.Layer`).
      name: `"full"`.
      note: how the layer table explains the choice.

    Returns:
      The layer, of kind `"full"`, with no uses.

    Raises:
      ValueError: it has more than `MAX_SIZE` parameter entries.
    """
    size = size_of(stacked.unstacked(layer) if layer.stack else layer)
    if size > MAX_SIZE:
      raise ValueError(
          f"overrides: layer {layer.name!r} has {size} parameter entries, too many for a "
          f"'full' block (at most {MAX_SIZE}: its matrix would have {size}^2 "
          "entries). Use 'kronecker' or 'diagonal' for it.")
    return (type(layer)(layer.name, name, layer.params, (), note, layer.stack),)

  def gradient_moment(self, grads: Sequence[Array], dtype: Any) -> Array:
    """`Σ_k v_k v_k^T` of one example's gradients over the curvature passes.

    Args:
      grads: per parameter, shape `(K, *param_shape)`.
      dtype: the factor dtype.

    Returns:
      Shape `(P, P)`.
    """
    rows = jnp.concatenate([g.astype(dtype).reshape(g.shape[0], -1) for g in grads], axis=1)
    return row_products(rows, rows)

  def statistics(self, layer: Layer, captures: Captures) -> dict[str, Array]:
    """Returns `{"full": Σ_n ∇θ_n ∇θ_n^T}` (a mean, by the scaling of the gradients).

    Args:
      layer: the layer (`tracing.Layer`); unused.
      captures: its `gradient_moment`, the sum over examples of
        `gradient_moment`.

    Returns:
      `{"full": (P, P)}` in `captures.dtype`, `P` the number of parameter
      entries of the layer (`size_of`).
    """
    return {"full": captures.gradient_moment.astype(captures.dtype)}

  def refresh(self, layer: Layer, factors: dict[str, Array], damping: Damping,
              method: str = "cholesky") -> dict[str, Array]:
    """Returns `(F + λ I)^{-1}`.

    Args:
      layer: the layer (`tracing.Layer`); unused.
      factors: `full`, the Fisher block `F`, averaged over batches.
      damping: λ.
      method: how to invert `F + λ I` (`linalg.damped_inverse`).

    Returns:
      `{"full_inv": (P, P)}`.
    """
    return {"full_inv": linalg.damped_inverse(factors["full"], damping.value, method)}

  def precondition(self, layer: Layer, inverse: dict[str, Array],
                   grads: Sequence[Array]) -> tuple[Array, ...]:
    """Returns `(F + λ I)^{-1} ∇θ`, split back into the parameters.

    Args:
      layer: the layer (`tracing.Layer`); unused.
      inverse: `full_inv` (`refresh`).
      grads: the gradients of the layer's parameters, in `layer.params`
        order; `∇θ` is their concatenation, flattened (`base.flatten`).

    Returns:
      The preconditioned gradients, shaped and typed as `grads`.
    """
    full_inv = inverse["full_inv"]
    return unflatten(full_inv @ flatten(grads, full_inv.dtype), grads)

  @override
  def describe(self, layer: Layer) -> str:
    size = size_of(layer)
    return f"full {size}x{size}"


def size_of(layer: Layer) -> int:
  """The number of parameter entries of a layer.

  Args:
    layer: the layer (`tracing.Layer`).

  Returns:
    `P`, the sum of its parameters' sizes.
  """
  return sum(math.prod(p.shape) for p in layer.params)


BLOCK = FullBlock()
