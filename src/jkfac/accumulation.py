# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Gradient accumulation over micro-batches, statistics included.

`optax.MultiSteps` accumulates the gradients of k micro-batches and calls
the inner optimizer once with their mean, but hands it the extra arguments
of the last micro-batch only: a K-FAC optimizer inside it would see the
curvature statistics of one micro-batch in k. `MultiSteps` here wraps it
and also averages the statistics' factors over the micro-batches, so that
k micro-batches give the update of one k-times larger batch.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from jkfac import blocks
from jkfac.estimator import Estimator
from jkfac.statistics import Statistics

Array = jax.Array


class MultiStepsState(NamedTuple):
  """State of `MultiSteps`.

  Attributes:
    multi_steps: the wrapped `optax.MultiStepsState` (its `inner_opt_state`
      is the K-FAC optimizer's).
    factors: the running mean of this cycle's micro-batch statistics,
      structured as `Statistics.factors`.
  """
  multi_steps: optax.MultiStepsState
  factors: dict[str, dict[str, Array]]


class MultiSteps:
  """`optax.MultiSteps` whose statistics are averaged over the micro-batches too.

  Use it as `optax.MultiSteps`: `update(grads, state, params, stats=stats)`
  every micro-batch; every k-th call returns the update of the k
  micro-batches together (their mean gradient and mean factors), the others
  a zero update. The quadratic model of `jkfac.kfac` (its curvature
  products and the loss at the new parameters) is evaluated on the last
  micro-batch.
  """

  def __init__(self, opt: optax.GradientTransformation, every_k_schedule: Union[int, Callable],
               est: Estimator, use_grad_mean: bool = True,
               should_skip_update_fn: Optional[Callable] = None,
               accumulator_dtype: Any = None):
    """Wraps `opt`.

    Args:
      opt: the optimizer taking `stats=` (`jkfac.kfac`, or a chain with
        `jkfac.scale_by_kfac`).
      every_k_schedule: k, the micro-batches per update: an int, or a
        function of the update count (as `optax.MultiSteps`).
      est: the estimator whose statistics are passed as `stats=`.
      use_grad_mean: average the gradients (else sum them), as
        `optax.MultiSteps`; the statistics are always averaged.
      should_skip_update_fn: as `optax.MultiSteps`: a skipped micro-batch
        leaves the gradients and statistics accumulated so far unchanged.
      accumulator_dtype: the gradients' accumulator dtype (None: the factor
        dtype, float32 or float64); the statistics' is the factor dtype.
    """
    unsummable = [l.name for l in est.layers if not blocks.for_layer(l).summable]
    if unsummable:
      raise ValueError(
          f"jkfac.MultiSteps averages the statistics of micro-batches, and the blocks of "
          f"layers {unsummable} keep statistics that do not average (EK-FAC's are "
          "measured in the eigenbasis the optimizer holds at each update). Use another "
          "block for them (overrides=), or one larger batch instead of micro-batches.")
    self._est = est
    self._every_k = every_k_schedule if callable(every_k_schedule) else (
        lambda step: every_k_schedule)
    self._skip = should_skip_update_fn
    self._inner = optax.MultiSteps(opt, every_k_schedule, use_grad_mean=use_grad_mean,
                                   should_skip_update_fn=should_skip_update_fn,
                                   accumulator_dtype=accumulator_dtype or est.factor_dtype)

  def init(self, params: Any) -> MultiStepsState:
    """Returns the initial state.

    Args:
      params: the parameters.

    Returns:
      The wrapped `optax.MultiSteps` state, and zero factors.
    """
    shapes = self._est.factor_shapes()
    return MultiStepsState(self._inner.init(params),
                           jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))

  def update(self, updates: Any, state: MultiStepsState, params: Any = None, *,
             stats: Optional[Statistics] = None, **extra_args: Any
             ) -> tuple[Any, MultiStepsState]:
    """Accumulates one micro-batch; updates the parameters every k-th call.

    Args:
      updates: this micro-batch's gradient.
      state: the state.
      params: the parameters.
      stats: this micro-batch's statistics (from the estimator).
      **extra_args: passed on to the wrapped optimizer.

    Returns:
      The update (zero but at the k-th micro-batch) and the new state.
    """
    if not isinstance(stats, Statistics):
      raise ValueError("jkfac.MultiSteps.update needs the micro-batch's statistics: call "
                       "update(grads, state, params, stats=stats).")
    inner = state.multi_steps
    step = inner.mini_step
    mean = jax.tree.map(lambda acc, new: acc + (new.astype(acc.dtype) - acc) / (step + 1),
                        state.factors, stats.factors)
    averaged = Statistics(mean, stats.estimator_id, stats.extras)
    new_updates, new_inner = self._inner.update(updates, inner, params, stats=averaged,
                                                **extra_args)
    emit = step == self._every_k(inner.gradient_step) - 1
    # A new cycle starts after an update; a skipped micro-batch keeps what was accumulated.
    skipped = (False if self._skip is None
               else self._skip(updates, inner.gradient_step, params)[0])
    factors = jax.tree.map(
        lambda old, new: jnp.where(skipped, old, jnp.where(emit, 0.0, new)).astype(old.dtype),
        state.factors, mean)
    return new_updates, MultiStepsState(new_inner, factors)

  def gradient_transformation(self) -> optax.GradientTransformationExtraArgs:
    """This accumulator as an `optax.GradientTransformationExtraArgs`.

    Returns:
      The transform, with `init` and `update` of this object.
    """
    return optax.GradientTransformationExtraArgs(self.init, self.update)

  def has_updated(self, state: MultiStepsState) -> Array:
    """Whether the last call updated the parameters (as `optax.MultiSteps`).

    Args:
      state: the state.

    Returns:
      A boolean scalar.
    """
    return self._inner.has_updated(state.multi_steps)
