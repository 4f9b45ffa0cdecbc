# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""`Statistics`: what the estimator returns beside the loss and the gradient, and its checks."""

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


def check_stats(stats: Any, est: Any, factors: dict[str, Any]) -> dict[str, Any]:
  """Checks the `stats` passed to `update`.

  Args:
    stats: what was passed as `stats=`.
    est: the transform's estimator (`jkfac.estimator.Estimator`).
    factors: the state's factors (their layers and structure).

  Returns:
    The statistics' factors of the layers the state keeps.
  """
  if stats is None:
    raise ValueError(
        "scale_by_kfac.update needs the curvature statistics of this batch: call "
        "tx.update(grads, opt_state, params, stats=stats) with the stats returned "
        "by `loss, grads, stats = est(params, batch, rng=key)`.")
  if not isinstance(stats, Statistics):
    raise TypeError(f"stats must be the Statistics returned by the estimator, got "
                    f"{type(stats).__name__}: pass the third value of `loss, grads, stats = "
                    "est(params, batch, rng=key)` as tx.update(..., stats=stats).")
  if stats.estimator_id != est.id:
    raise ValueError(
        f"stats come from another estimator (id {stats.estimator_id}) than the one "
        f"this transform was built with (id {est.id}). Build the optimizer with the "
        "estimator you call in the training step: jkfac.kfac(est, ...).")
  return kept_factors(stats, factors)


def kept_factors(stats: Statistics, factors: dict[str, Any]) -> dict[str, Any]:
  """The statistics' factors of the layers a state keeps, checked to be there.

  Args:
    stats: one batch's statistics.
    factors: the state's factors (their layers and keys).

  Returns:
    Layer name -> the statistics' factors of that layer (all of its keys,
    those the state keeps among them).
  """
  batch = {name: stats.factors.get(name) for name in factors}
  if any(batch[name] is None or not set(factors[name]) <= set(batch[name])
         for name in factors):
    raise ValueError(
        "stats do not have the factors this transform keeps. A transform with "
        "structure='block_tridiagonal' needs cross moments the estimator computes only "
        "once such a transform is built: build the optimizer before tracing (jitting) "
        "the training step, and the optimizer state with tx.init after that.")
  return batch
