# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""A trust region for fixed learning rates: the update's predicted KL bounded.

A step `-η Δ` along the preconditioned gradient `Δ = F̆^{-1} ∇h` changes the
model's predictive distribution by `KL ≈ ½ η² Δ^T F Δ`. `scale_by_kl_clip`
estimates `Δ^T F Δ` with the K-FAC curvature of the batch, `Δ^T F̂ Δ` with
`F̂` the undamped blocks (`A ⊗ G` for a Kronecker block, the diagonal or full
block otherwise; each block's own product, `kfac_quadratic_form`), and
multiplies `Δ` by

    ν = min(1, sqrt(κ / (η_eff² Δ^T F̂ Δ))),   η_eff = η / (1 - μ),

so that `η_eff² (νΔ)^T F̂ (νΔ) ≤ κ`: the rule of Ba, Grosse & Martens (2017,
distributed K-FAC), kfac-pytorch's `kl_clip` and kfac-jax's
`norm_constraint`, with two differences. The curvature is the undamped one
(the damping is not a change of the model: with a large damping, `Δ^T ∇h =
Δ^T F̆ Δ` would overstate the step many times), and with heavy-ball momentum
μ the steps add up to `1/(1 - μ)` times one of them while their directions
agree, so the effective learning rate `η/(1 - μ)` is what is bounded: the
update actually taken, not only its newest term. A step far outside the
region where the quadratic model of the loss holds is shortened instead of
taken; where the steps are already small, `ν = 1` and nothing changes.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jkfac import adaptive, blocks
from jkfac.estimator import Estimator, Statistics

Array = jax.Array


class KLClipState(NamedTuple):
  """State of `scale_by_kl_clip`.

  Attributes:
    count: updates made so far (int32), for learning-rate schedules.
    scale: the factor ν applied to the last update (1 when it was inside the
      trust region), for logging.
  """
  count: Array
  scale: Array


def kfac_quadratic_form(est: Estimator, factors: dict[str, dict[str, Array]],
                        vectors: Any) -> Array:
  """`v^T F̂ v` under the undamped K-FAC curvature `F̂` of `factors`.

  Each block's product with its own (undamped) factors, by its
  `precondition` given the factors in place of their inverses; the
  block-tridiagonal cross moments are left out (the block-diagonal part).
  Layers without factors (`"none"`) count nothing.

  Args:
    est: the estimator.
    factors: layer name -> its factors (a batch's `Statistics.factors`, or
      moving averages).
    vectors: a tree with the parameters' structure.

  Returns:
    The scalar `v^T F̂ v`, in the factors' dtype.
  """
  flat = est.check_params(vectors, "kfac_quadratic_form(vectors)")
  total = jnp.zeros([], est.factor_dtype)
  for layer in est.layers:
    own = {key: value for key, value in factors[layer.name].items()
           if not key.endswith("_next")}
    if not own:
      continue
    products = blocks.get(layer.kind).precondition(
        layer, {f"{key}_inv": value for key, value in own.items()},
        [flat[p.index] for p in layer.params])
    total += sum(jnp.vdot(flat[p.index].astype(total.dtype), u.astype(total.dtype))
                 for p, u in zip(layer.params, products))
  return total


def scale_by_kl_clip(est: Estimator, kl_clip: float, learning_rate: Any,
                     momentum: Any = 0.0, axis_name: Optional[str] = None
                     ) -> optax.GradientTransformationExtraArgs:
  """Shortens preconditioned gradients whose predicted KL change exceeds `kl_clip`.

  Place it right after `scale_by_kfac`, whose output `Δ = F̆^{-1} ∇h` it
  takes, before momentum and the learning rate; it reads the batch's factors
  from `stats=`. See the module docstring for the rule.

  Args:
    est: the estimator whose statistics `update` is given.
    kl_clip: κ, the bound on `(η / (1 - μ))² Δ^T F̂ Δ` (positive).
    learning_rate: η, the learning rate the update will be multiplied by (a
      float or an optax schedule of the update count).
    momentum: μ, the heavy-ball momentum applied after this transform (a
      float in [0, 1) or a schedule; 0 for none).
    axis_name: under `pmap`, the mapped axis: the batch's factors are
      averaged over it (an all-reduce of the factors at every update), so
      that every device bounds the same step as one device on the whole
      batch would.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose updates are `ν Δ`.
  """

  def init_fn(params: Any) -> KLClipState:
    del params
    return KLClipState(jnp.zeros([], jnp.int32), jnp.ones([], jnp.float32))

  def update_fn(updates: Any, state: KLClipState, params: Any = None, *,
                stats: Optional[Statistics] = None, **unused_extra_args):
    del params
    if not isinstance(stats, Statistics):
      raise ValueError("scale_by_kl_clip needs the batch's statistics: call update(updates, "
                       "state, params, stats=stats) with the stats returned by the "
                       "estimator, or use jkfac.kfac, which passes them.")
    factors = stats.factors
    if axis_name is not None:  # the K-FAC form is bilinear in A and G: average them first
      factors = jax.lax.pmean(factors, axis_name)
    curvature = kfac_quadratic_form(est, factors, updates)
    count = state.count
    rate = (adaptive.value_at(learning_rate, count).astype(curvature.dtype)
            / (1.0 - adaptive.value_at(momentum, count).astype(curvature.dtype)))
    predicted = rate * rate * curvature
    # No information (a zero or non-finite step or statistics) leaves the
    # update as it is: non-finite values are the other safeguards' business.
    outside = jnp.isfinite(predicted) & (predicted > kl_clip)
    scale = jnp.where(outside, jnp.sqrt(kl_clip / jnp.where(outside, predicted, 1.0)), 1.0)
    clipped = jax.tree.map(lambda u: u * scale.astype(u.dtype), updates)
    return clipped, KLClipState(optax.safe_int32_increment(count), scale.astype(jnp.float32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
