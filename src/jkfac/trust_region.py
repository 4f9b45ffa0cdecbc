# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""A trust region for fixed learning rates: the K-FAC update's predicted KL bounded.

A step `-η Δ` along the preconditioned gradient `Δ = F̆^{-1} ∇h` changes the
model's predictive distribution by `KL ≈ ½ η² Δ^T F Δ`; with the damped K-FAC
curvature `F̆` in place of `F`, `Δ^T F̆ Δ = Δ^T ∇h`, which costs one inner
product. `scale_by_kl_clip` multiplies `Δ` by

    ν = min(1, sqrt(κ / (η² Δ^T ∇h)))

so that `η² (νΔ)^T F̆ (νΔ) ≤ κ`: the rule of Ba, Grosse & Martens (2017,
distributed K-FAC), kfac-pytorch's `kl_clip` and kfac-jax's `norm_constraint`.
With heavy-ball momentum μ the steps add up to `1/(1 - μ)` times one of them
while their directions agree, so `η/(1 - μ)`, the effective learning rate,
takes η's place: the bound then holds for the update actually taken, not
only for its newest term.
A step far outside the region where the quadratic model of the loss holds,
as a learning rate too large for the network, the damping or the batch
gives, is shortened instead of taken; where the steps are already small,
`ν = 1` and nothing changes. The bound is in nats per example: a loss that
sums many outputs (an autoencoder's pixels) takes larger steps in KL than a
classifier's, and needs a larger κ.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jkfac import adaptive

Array = jax.Array


class KLClipState(NamedTuple):
  """State of `scale_by_kl_clip`.

  Attributes:
    count: updates made so far (int32), for a learning-rate schedule.
    scale: the factor ν applied to the last update (1 when it was inside the
      trust region), for logging.
  """
  count: Array
  scale: Array


def scale_by_kl_clip(kl_clip: float, learning_rate: Any, momentum: Any = 0.0,
                     damping: Any = 0.0) -> optax.GradientTransformationExtraArgs:
  """Shortens preconditioned gradients whose predicted KL change exceeds `kl_clip`.

  Place it right after `scale_by_kfac`, whose output `Δ = F̆^{-1} ∇h` it
  takes, before momentum and the learning rate (`η/(1 - μ)` is bounded); it reads the raw gradient
  `∇h` from `grads=` (`jkfac.kfac` passes it). See the module docstring for
  the rule.

  Args:
    kl_clip: κ, the bound on `(η/(1 - μ))² Δ^T F̆ Δ` (positive).
    learning_rate: η, the learning rate the update will be multiplied by (a
      float or an optax schedule of the update count).
    momentum: μ, the heavy-ball momentum applied after this transform (a
      float in [0, 1) or a schedule; 0 for none).
    damping: λ, the damping of the preconditioner (a float or a schedule):
      its part `λ|Δ|²` of `Δ^T F̆ Δ` is not a change of the model and is
      left out (`Δ^T F̂ Δ ≤ Δ^T ∇h - λ|Δ|²` for the undamped K-FAC curvature
      `F̂`, since the cross terms of factored damping are non-negative).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose updates are `ν Δ`.
  """

  def init_fn(params: Any) -> KLClipState:
    del params
    return KLClipState(jnp.zeros([], jnp.int32), jnp.ones([], jnp.float32))

  def update_fn(updates: Any, state: KLClipState, params: Any = None, *,
                grads: Optional[Any] = None, **unused_extra_args):
    del params
    if grads is None:
      raise ValueError("scale_by_kl_clip needs the raw gradient: call update(updates, state, "
                       "params, grads=grads), or use jkfac.kfac, which passes it.")
    wide = lambda tree: jax.tree.map(
        lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), tree)
    wide_updates = wide(updates)
    curvature = optax.tree_utils.tree_vdot(wide_updates, wide(grads))
    lam = adaptive.value_at(damping, state.count).astype(curvature.dtype)
    curvature = curvature - lam * optax.tree_utils.tree_vdot(wide_updates, wide_updates)
    rate = (adaptive.value_at(learning_rate, state.count).astype(curvature.dtype)
            / (1.0 - adaptive.value_at(momentum, state.count).astype(curvature.dtype)
))
    predicted = rate * rate * curvature
    # No information (a zero or non-finite step, or a negative inner product
    # from an indefinite curvature) leaves the update as it is.
    outside = jnp.isfinite(predicted) & (predicted > kl_clip)
    scale = jnp.where(outside, jnp.sqrt(kl_clip / jnp.where(outside, predicted, 1.0)), 1.0)
    clipped = jax.tree.map(lambda u: u * scale.astype(u.dtype), updates)
    return clipped, KLClipState(optax.safe_int32_increment(state.count),
                                scale.astype(jnp.float32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
