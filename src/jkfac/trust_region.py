# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""A trust region for fixed learning rates: the update's predicted KL bounded.

A step `-η Δ` along the preconditioned gradient `Δ = F̆^{-1} ∇h` changes the
model's predictive distribution by `KL ≈ ½ η² Δ^T F Δ`. `scale_by_kl_clip`
estimates `Δ^T F Δ` by `Δ^T ∇h = Δ^T F̆ Δ`, the damped K-FAC curvature's
quadratic form (which costs one inner product: no further product with the
factors, no communication under `pmap`, and bounds the undamped one from
above), and multiplies `Δ` by

    ν = min(1, sqrt(κ n / (η_eff² Δ^T ∇h))),   η_eff = η / (1 - μ),

so that `η_eff² (νΔ)^T F̆ (νΔ) ≤ κ n`: the rule of Ba, Grosse & Martens (2017,
distributed K-FAC), kfac-pytorch's `kl_clip` and kfac-jax's
`norm_constraint`, with two differences that make one bound `κ` suit every
model:

- `n` is the number of predicted variables per averaged loss term, weighted
  by the losses' weights (`predicted_variables`): 1 for a classifier or a
  language model's per-token loss, 784 for an autoencoder whose loss sums
  784 pixels' cross-entropies. `κ` bounds the KL per predicted variable, so
  summing a loss over outputs or averaging it (which scales `F` and
  `Δ^T ∇h` together) bounds the same step.
- with heavy-ball momentum μ the steps add up to `1/(1 - μ)` times one of
  them while their directions agree, so the effective learning rate
  `η/(1 - μ)` is what is bounded: the update actually taken, not only its
  newest term.

A step far outside the region where the quadratic model of the loss holds is
shortened instead of taken; where the steps are already small, `ν = 1` and
nothing changes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jkfac import adaptive, tracing

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


def predicted_variables(registered: list[tracing.Loss]) -> float:
  """The number of predicted variables per loss term, weighted by the losses.

  Args:
    registered: the registered losses (`Estimator.losses`).

  Returns:
    `Σ weight · variables_per_term` over the losses (at least one): a
    categorical prediction is one variable per term, a Bernoulli or Gaussian
    one has one per element of a term.
  """
  return max(sum(loss.weight * loss.variables_per_term for loss in registered), 1e-12)


def scale_by_kl_clip(kl_clip: float, learning_rate: Any, momentum: Any = 0.0,
                     variables: float = 1.0) -> optax.GradientTransformationExtraArgs:
  """Shortens preconditioned gradients whose predicted KL change exceeds the bound.

  Place it right after the preconditioner (`scale_by_kfac`), whose output
  `Δ` it takes, before momentum and the learning rate; it also needs the
  gradient `Δ` was computed from, as `update(updates, state, params,
  grads=grads)` (`jkfac.kfac` passes it). See the module docstring for the
  rule. Under `pmap`, give it the averaged gradient (the one the
  preconditioner was given): every device then computes the same ν.

  Args:
    kl_clip: κ, the bound on `(η / (1 - μ))² Δ^T ∇h / n` (positive): nats
      per predicted variable.
    learning_rate: η, the learning rate the update will be multiplied by (a
      float or an optax schedule of the update count).
    momentum: μ, the heavy-ball momentum applied after this transform (a
      float in [0, 1) or a schedule; 0 for none).
    variables: n, predicted variables per loss term (`predicted_variables`
      of the estimator's losses).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose updates are `ν Δ`.
  """

  def init_fn(params: Any) -> KLClipState:
    del params
    return KLClipState(jnp.zeros([], jnp.int32), jnp.ones([], jnp.float32))

  def update_fn(updates: Any, state: KLClipState, params: Any = None, *,
                grads: Any = None, **unused_extra_args):
    del params
    if grads is None:
      raise ValueError("scale_by_kl_clip needs the gradient that was preconditioned: call "
                       "update(updates, state, params, grads=grads), or use jkfac.kfac, "
                       "which passes it.")
    if jax.tree.structure(grads) != jax.tree.structure(updates):
      raise ValueError("scale_by_kl_clip: grads= must have the structure of the updates "
                       f"(got {jax.tree.structure(grads)} and {jax.tree.structure(updates)}).")
    dtype = jnp.result_type(jnp.float32, *jax.tree.leaves(updates))
    # Products and sums, which XLA fuses into one pass over Δ and ∇h (on CPU
    # half the cost of optax.tree_utils.tree_vdot's dots).
    curvature = sum(jnp.sum(u.astype(dtype) * g.astype(dtype))
                    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)))
    rate = (adaptive.value_at(learning_rate, state.count).astype(dtype)
            / (1.0 - adaptive.value_at(momentum, state.count).astype(dtype)))
    predicted = rate * rate * curvature / variables
    # No information (a zero or non-finite step or gradient) leaves the update
    # as it is: non-finite values are the other safeguards' business.
    outside = jnp.isfinite(predicted) & (predicted > kl_clip)
    scale = jnp.where(outside, jnp.sqrt(kl_clip / jnp.where(outside, predicted, 1.0)), 1.0)
    clipped = jax.tree.map(lambda u: u * scale.astype(u.dtype), updates)
    return clipped, KLClipState(optax.safe_int32_increment(state.count),
                                scale.astype(jnp.float32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
