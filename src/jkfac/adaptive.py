# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Learning rate and momentum from the quadratic model (K-FAC section 7).

With `Δ = -F̆^{-1} ∇h` the K-FAC direction and `δ0` the previous update, the
step is `δ = α Δ + μ δ0` with `(α, μ)` minimising the quadratic model

    M(δ) = ½ δ^T (F + (λ + η) I) δ + ∇h^T δ

over the plane they span, `F` the exact Fisher of the current mini-batch
(products from `stats.extras["curvature"]`, never a matrix). On the first step
(`δ0 = 0`) μ = 0 and `α = -∇h^T Δ / (Δ^T F Δ + (λ + η)|Δ|²)`. Either can be
fixed instead, and the other is then chosen alone.

With `layer_scales_every=T`, each layer's part `Δ_l` of the direction is
first multiplied by a scale `s_l`, re-chosen every T updates as the
minimiser of the same quadratic model over the span of the layers' parts
(`s = -(G + (λ + η) diag|Δ_l|²)^{-1} (∇h^T Δ_l)_l`, `G` their exact Gram
matrix: one curvature product per layer), normalised to a geometric mean of
1. K-FAC's blocks misjudge some layers' curvature by factors of 10 or more
where a layer's rows are not independent examples (a transformer's value
projection and position embeddings, whose outputs attention mixes over the
sequence); one α for all layers must then keep the worst of them in check,
and the others barely move.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from jkfac import linalg, sharding
from jkfac.damping import levenberg_marquardt as levenberg_marquardt  # its former home
from jkfac.estimator import Estimator
from jkfac.statistics import Statistics

Array = jax.Array


class QuadraticModelState(NamedTuple):
  """State of `scale_by_quadratic_model`.

  Attributes:
    previous_update: `δ0`, the last update: a tuple of the leaves of the
      parameters the transform updates (all of them, or its partition's).
    learning_rate: the α of the last update.
    momentum: the μ of the last update.
    predicted_change: `M(δ) - M(0)` of the last update (negative).
    damping_share: the share of the damping in the model's curvature along
      the last update, `(λ + η)|δ|² / δ^T (F + (λ + η) I) δ`: near 1, λ
      rather than the Fisher sets the step's length.
    layer_scales: with `layer_scales_every`, the scale of each layer's part
      of the direction (`layer_groups` gives the layers' order); else `()`.
  """
  previous_update: Any
  learning_rate: Array
  momentum: Array
  predicted_change: Array
  damping_share: Array
  layer_scales: Any = ()


def _dot(a: Any, b: Any, dtype) -> Array:
  # Not optax.tree_utils.tree_vdot: jnp.vdot contracts a sharded axis, which
  # JAX refuses under Explicit axes without an out_sharding.
  return sum(sharding.vdot(x.astype(dtype), y.astype(dtype))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


MAX_MOMENTUM = 2.0
"""The largest |μ| taken from the two-dimensional solve; beyond it, α alone."""

MAX_LAYER_SCALE = 100.0
"""The largest ratio of a layer's scale to the geometric mean of all, and of its inverse."""


def layer_groups(est: Estimator, held: Sequence[int]) -> list[list[int]]:
  """Which of a transform's parameter leaves each layer owns.

  Args:
    est: the estimator (its layers).
    held: the indices (among all parameter leaves) of the leaves the
      transform updates.

  Returns:
    For each layer owning a held leaf, in `est.layers`' order, the positions
    in `held` of its leaves; then one group per held leaf no layer owns.
  """
  position = {index: k for k, index in enumerate(held)}
  groups, seen = [], set()
  for layer in est.layers:
    members = [position[p.index] for p in layer.params
               if p.index in position and position[p.index] not in seen]
    if members:
      groups.append(members)
      seen.update(members)
  return groups + [[k] for k in range(len(held)) if k not in seen]


def solve_layer_scales(gram: Array, grad_dots: Array, sizes: Array, damping: Array,
                       previous: Array) -> Array:
  """The layers' scales minimising the quadratic model over the span of their parts.

  Minimises `½ s^T (G + λ diag(sizes)) s + g^T s`, then divides by the
  geometric mean of the positive scales and clips each to
  `[1/MAX_LAYER_SCALE, MAX_LAYER_SCALE]`. The system is solved in Jacobi
  scaling (its diagonal made 1), with a small ridge, so that layers of very
  different curvature or a layer with no direction do not spoil the rest.

  Args:
    gram: `G`, the exact curvature products of the layers' parts, LxL.
    grad_dots: `g`, the gradient's inner products with the parts.
    sizes: the parts' squared norms.
    damping: `λ + η`.
    previous: the scales in use, kept for a layer whose new scale is not
      positive and finite (and for all, if none is).

  Returns:
    The scales, shape `(L,)`.
  """
  matrix = gram + damping * jnp.diag(sizes)
  diagonal = jnp.diagonal(matrix)
  norm = jnp.where(diagonal > 0, jnp.sqrt(jnp.where(diagonal > 0, diagonal, 1.0)), 1.0)
  scaled = matrix / norm[:, None] / norm[None, :] + 1e-6 * jnp.eye(len(sizes), dtype=gram.dtype)
  scales = jnp.linalg.solve(scaled, -grad_dots / norm) / norm
  positive = jnp.isfinite(scales) & (scales > 0) & (diagonal > 0)
  logs = jnp.log(jnp.where(positive, scales, 1.0))
  mean = jnp.sum(jnp.where(positive, logs, 0.0)) / jnp.maximum(jnp.sum(positive), 1)
  bound = math.log(MAX_LAYER_SCALE)
  return jnp.where(positive, jnp.exp(jnp.clip(logs - mean, -bound, bound)), previous)


def solve_coefficients(curvature: Array, grad_dots: Array,
                       learning_rate: Optional[Array] = None,
                       momentum: Optional[Array] = None) -> tuple[Array, Array]:
  """Minimises `½ c^T C c + g^T c` over `c = (α, μ)` (or one of them).

  The two-dimensional solve is guarded: when `C` is not positive definite,
  is ill-conditioned (`det C ≤ 10⁻⁶ C₀₀ C₁₁`), or gives a momentum with
  `|μ| > MAX_MOMENTUM` (the quadratic model is then not to be trusted along
  the previous update), the step falls back to the K-FAC direction alone
  (`μ = 0`, `α = -g₀ / C₀₀`). A model without positive curvature along the
  direction gives no step.

  Args:
    curvature: `C`, 2x2, `[[Δ^T K Δ, Δ^T K δ0], [., δ0^T K δ0]]` with
      `K = F + (λ + η) I`.
    grad_dots: `g = (∇h^T Δ, ∇h^T δ0)`.
    learning_rate: a fixed α, or None to choose it.
    momentum: a fixed μ, or None to choose it.

  Returns:
    `(α, μ)`; μ = 0 when `δ0 = 0`, and both 0 if the model is degenerate
    or not finite (no step rather than a wild one).
  """
  c00, c01, c11 = curvature[0, 0], curvature[0, 1], curvature[1, 1]
  g0, g1 = grad_dots[0], grad_dots[1]
  tiny = jnp.finfo(curvature.dtype).tiny
  has_previous = c11 > tiny
  positive = c00 > tiny
  alpha_alone = -g0 / jnp.where(positive, c00, 1.0)
  if learning_rate is None and momentum is None:
    det = c00 * c11 - c01 * c01
    plane = has_previous & positive & (det > 1e-6 * c00 * c11)
    safe_det = jnp.where(plane, det, 1.0)
    mu = (c01 * g0 - c00 * g1) / safe_det
    plane = plane & (jnp.abs(mu) <= MAX_MOMENTUM)
    alpha = jnp.where(plane, (c01 * g1 - c11 * g0) / safe_det, alpha_alone)
    mu = jnp.where(plane, mu, 0.0)
  elif learning_rate is None:
    mu = jnp.where(has_previous, momentum, 0.0)
    alpha = -(g0 + mu * c01) / jnp.where(positive, c00, 1.0)
  elif momentum is None:
    alpha = jnp.asarray(learning_rate, curvature.dtype)
    mu = jnp.where(has_previous, -(g1 + alpha * c01) / jnp.where(has_previous, c11, 1.0), 0.0)
  else:
    alpha, mu = jnp.asarray(learning_rate, curvature.dtype), jnp.asarray(momentum,
                                                                        curvature.dtype)
  if learning_rate is None:
    alpha = jnp.where(positive, alpha, 0.0)
  ok = jnp.isfinite(alpha) & jnp.isfinite(mu)
  return jnp.where(ok, alpha, 0.0), jnp.where(ok, mu, 0.0)


def scale_by_quadratic_model(est: Estimator, damping: Any, l2_reg: float = 0.0,
                             learning_rate: Optional[Any] = None,
                             momentum: Optional[Any] = None,
                             axis_name: Optional[Any] = None,
                             layer_scales_every: Optional[int] = None
                             ) -> optax.GradientTransformationExtraArgs:
  """Turns preconditioned gradients into steps `α Δ + μ δ0` (section 7).

  Place it right after `scale_by_kfac`, whose output `F̆^{-1} ∇h` it takes;
  it also needs the raw gradient, which it reads from `grads=` (passed on by
  `jkfac.kfac`), and the batch's curvature products from `stats`. `count=`
  (for schedules) and `damping_now=` (overriding `damping`) are optional.

  Args:
    est: the estimator.
    damping: λ, a float or a schedule of the update count.
    l2_reg: η, the L2 coefficient already in the loss (its Hessian ηI is not
      in the Fisher, so it is added to the model's damping).
    learning_rate: a fixed α (float or schedule), or None to choose it.
    momentum: a fixed μ (float or schedule), or None to choose it.
    axis_name: under `pmap`, the mapped axis: the curvature products of each
      device's batch are averaged over it (the gradients are already).
    layer_scales_every: None, or T: scale each layer's part of the
      direction, re-choosing the scales every T updates (see the module's
      docstring; one curvature product per layer then).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose updates are the steps
    to add to the parameters.
  """

  def init_fn(params: Any) -> QuadraticModelState:
    zero = jnp.zeros([], est.factor_dtype)
    _, leaves = est.align(params, "scale_by_quadratic_model.init(params)", partial=True)
    previous = optax.tree_utils.tree_zeros_like(tuple(x for x in leaves if x is not None))
    scales = ()
    if layer_scales_every is not None:
      held = [i for i, x in enumerate(leaves) if x is not None]
      scales = jnp.ones(len(layer_groups(est, held)), est.factor_dtype)
    return QuadraticModelState(previous, zero, zero, zero, zero, scales)

  def update_fn(updates: Any, state: QuadraticModelState, params: Any = None, *,
                stats: Optional[Statistics] = None, grads: Any = None, count: Any = None,
                damping_now: Any = None, **unused_extra_args):
    if stats is None or grads is None:
      raise ValueError("scale_by_quadratic_model needs stats= (from the estimator) and "
                       "grads= (the raw gradient): call update(updates, state, params, "
                       "stats=stats, grads=grads), or use jkfac.kfac, which passes both.")
    dtype = est.factor_dtype
    where = "scale_by_quadratic_model.update(updates, ...)"
    updates_view, flat_updates = est.align(updates, where, partial=True)
    _, flat_grads = est.align(grads, where + ": grads", partial=True)
    held = [i for i, present in enumerate(updates_view.present) if present]
    if len(held) != len(state.previous_update):
      raise ValueError(f"{where}: the updates hold other parameters than those given to "
                       "init (optax.MaskedNode in other places). Pass the same partition "
                       "of the parameters to init and update.")
    # The parameters this transform updates, as lists (a partition's others are left out).
    direction = [-flat_updates[i] for i in held]
    previous = list(state.previous_update)
    grads = [flat_grads[i] for i in held]
    as_tree = lambda leaves: updates_view.rebuild(dict(zip(held, leaves)))
    step_count = jnp.zeros([], jnp.int32) if count is None else count
    lam = value_at(damping if damping_now is None else damping_now,
                   step_count).astype(dtype) + l2_reg
    curvature_of = lambda vectors: (stats.extras["curvature"](vectors) if axis_name is None
                                    else jax.lax.pmean(stats.extras["curvature"](vectors),
                                                       axis_name))
    scales = state.layer_scales
    if layer_scales_every is not None:
      groups = layer_groups(est, held)

      def rechoose(scales):
        parts = [[d if k in members else jnp.zeros_like(d) for k, d in enumerate(direction)]
                 for members in groups]
        pick = lambda leaves, members: [leaves[k] for k in members]
        grad_dots = jnp.stack([_dot(pick(grads, m), pick(direction, m), dtype) for m in groups])
        sizes = jnp.stack([_dot(pick(direction, m), pick(direction, m), dtype) for m in groups])
        return solve_layer_scales(curvature_of([as_tree(part) for part in parts]), grad_dots,
                                  sizes, lam, scales)

      scales = jax.lax.cond(step_count % layer_scales_every == 0, rechoose, lambda s: s, scales)
      group_of = {k: g for g, members in enumerate(groups) for k in members}
      direction = [d * scales[group_of[k]].astype(d.dtype) for k, d in enumerate(direction)]
    gram = curvature_of([as_tree(direction), as_tree(previous)])
    cross = _dot(direction, previous, dtype)
    dots = jnp.array([[_dot(direction, direction, dtype), cross],
                      [cross, _dot(previous, previous, dtype)]])
    curvature = gram + lam * dots
    grad_dots = jnp.stack([_dot(grads, direction, dtype), _dot(grads, previous, dtype)])
    alpha, mu = solve_coefficients(
        curvature, grad_dots,
        None if learning_rate is None else value_at(learning_rate, step_count),
        None if momentum is None else value_at(momentum, step_count))
    # No step at all (momentum restarts) when the direction or the gradient is
    # not finite (α, μ are then 0, but 0 x NaN would still be NaN).
    finite = linalg.all_finite((direction, grads))
    alpha, mu = jnp.where(finite, alpha, 0.0), jnp.where(finite, mu, 0.0)
    step = tuple(jnp.where(finite, alpha * d.astype(dtype) + mu * p.astype(dtype),
                           0.0).astype(p.dtype)  # the parameters' dtype
                 for d, p in zip(direction, previous))
    coefficients = jnp.stack([alpha, mu])
    along = coefficients @ curvature @ coefficients
    change = jnp.where(finite, 0.5 * along + coefficients @ grad_dots, 0.0)
    damped = lam * (coefficients @ dots @ coefficients)
    share = jnp.where(finite & (along > 0), damped / jnp.where(along > 0, along, 1.0), 0.0)
    return as_tree(step), QuadraticModelState(step, alpha, mu, change, share, scales)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def value_at(schedule: Any, count: Array) -> Array:
  """A hyperparameter's value at an update count (an optax schedule or a number).

  Args:
    schedule: an optax schedule (a callable of the count) or a number.
    count: the update count, an integer scalar.

  Returns:
    `schedule(count)`, or the number as an array.
  """
  return schedule(count) if callable(schedule) else jnp.asarray(schedule)
