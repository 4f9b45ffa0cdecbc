# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""`Statistics`: what the estimator returns beside the loss and the gradient."""

from __future__ import annotations

from typing import Any, Optional

import jax

Array = jax.Array


@jax.tree_util.register_pytree_node_class
class Statistics:
  """One batch's curvature statistics, as returned by `est`.

  Attributes:
    factors: layer name -> that layer's factors for this batch.
    estimator_id: which estimator made them (static, checked by the transform).
    extras: anything else a transform needs, keyed by name:
      `"curvature"`, a `jax.tree_util.Partial` taking a list of vectors
      (pytrees shaped as the parameters) and returning their Gram matrix
      `v_i^T F v_j` under the exact Fisher of the batch; `"loss_at"`, a
      `Partial` giving the loss at other parameters, both on the batch's
      first `curvature_fraction` (the whole batch by default, as in K-FAC
      section 7); and `"loss"`, the batch's loss. Both take pytrees with
      parameters masked out (`optax.MaskedNode`, an optax partition's):
      those are zero in a vector and keep this batch's values in
      `loss_at`.
  """

  factors: dict[str, dict[str, Array]]
  estimator_id: int
  extras: dict[str, Any]

  def __init__(self, factors: dict[str, dict[str, Array]], estimator_id: int,
               extras: Optional[dict[str, Any]] = None):
    """Holds the statistics.

    Args:
      factors: as the attribute.
      estimator_id: as the attribute.
      extras: as the attribute (None for none).
    """
    self.factors = factors
    self.estimator_id = estimator_id
    self.extras = {} if extras is None else extras

  def tree_flatten(self) -> tuple[tuple[Any, Any], int]:
    """The pytree protocol: the factors and extras are children, the id static."""
    return (self.factors, self.extras), self.estimator_id

  @classmethod
  def tree_unflatten(cls, estimator_id: int, children: tuple[Any, Any]) -> Statistics:
    """The pytree protocol's inverse of `tree_flatten`."""
    return cls(children[0], estimator_id, children[1])

  def __repr__(self) -> str:
    shapes = jax.tree.map(lambda x: tuple(x.shape), self.factors)
    return f"Statistics(estimator={self.estimator_id}, factors={shapes})"
