# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The damping: the value handed to the blocks, λ's defaults, bounds and rules.

A refresh hands each curvature block a `Damping`: λ, applied plainly
(`F + λ I`: diagonal and full blocks, EK-FAC's corrected eigenvalues) or
factored between two Kronecker factors (`Damping.factored`, section 6.3).
`kfac` damps the curvature as `F + (λ + η) I` (η the L2 coefficient folded
in, section 6.1) and its Kronecker blocks by factored Tikhonov with
`γ² = λ + η` (section 6.3). With the quadratic model, λ follows the
Levenberg-Marquardt rule (section 6.5, `levenberg_marquardt`, `adapt`) and γ
may be re-chosen among `candidates` every T2 steps (section 6.6).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jkfac import linalg

Array = jax.Array


class Damping(NamedTuple):
  """The damping a curvature block is refreshed with (a pytree: one scalar).

  Attributes:
    value: λ, a positive scalar in the factor dtype: a block approximates
      the inverse of `F + λ I`.
  """
  value: Array

  def factored(self, trace_a: Array, dim_a: int, trace_g: Array, dim_g: int
               ) -> tuple[Array, Array, Array]:
    """Factored Tikhonov damping of `A ⊗ G` (section 6.3).

    `(A + π√λ I) ⊗ (G + √λ/π I)` approximates `A ⊗ G + λ I`, with
    `π = sqrt((tr(A)/dim A) / (tr(G)/dim G))` balancing the two factors (1
    when that ratio is not positive and finite).

    Args:
      trace_a: the trace of the input-side factor `A` (of `diag(A)` for a
        diagonal factor).
      dim_a: `A`'s dimension.
      trace_g: the trace of the output-side factor `G`.
      dim_g: `G`'s dimension.

    Returns:
      `(π√λ, √λ/π, π)`: the shifts of `A` and `G`, and π.
    """
    pi = linalg.pi_from_traces(trace_a, dim_a, trace_g, dim_g)
    root = jnp.sqrt(self.value).astype(pi.dtype)
    return pi * root, root / pi, pi

  def kronecker(self, a: Array, g: Array) -> tuple[Array, Array, Array]:
    """`factored` for two square factors.

    Args:
      a: the input-side factor `A`, `(m, m)`.
      g: the output-side factor `G`, `(n, n)`.

    Returns:
      `(π√λ, √λ/π, π)` (`factored` of their traces).
    """
    return self.factored(jnp.trace(a), a.shape[0], jnp.trace(g), g.shape[0])

ADAPTIVE_DAMPING = 1.0
"""`kfac`'s default initial λ with the quadratic model (adapted from there)."""
FIXED_DAMPING = 3e-3
"""`kfac`'s default λ with a fixed learning rate and momentum."""
MAX_DAMPING = 1e8
"""The ceiling of the adapted λ (the floor is `kfac`'s `min_damping`)."""
DRIFT = 2.0
"""The inverses are refreshed early when their damping is off by this factor."""
OMEGA = 19.0 / 20.0
"""ω for one step (section 6.5): λ moves by `OMEGA ** steps` since the last measurement."""
JUMP_FACTOR = 10.0
"""The most λ moves at one measurement, up at a rejection or down towards balance."""
MAX_STREAK = 2
"""The most consecutive moves up of λ whose factors compound (`ω^-k`)."""


def levenberg_marquardt(damping: Array, streak: Array, rho: Array, rejected: Array,
                        measured: Array, omega: Array, damping_share: Array,
                        may_fall: Any = True) -> tuple[Array, Array]:
  """The Levenberg-Marquardt rule for λ (section 6.5), with step rejection.

  At a measurement, λ rises if `ρ < 1/4` or ρ is not finite, falls if
  `ρ > 3/4`, by ω (the paper's rule), with two exceptions that make it
  travel fast both ways when it is far off:

  - up: the k-th move up in a row is by `ω^-k` (`k ≤ MAX_STREAK`), and a
    rejected step multiplies λ by `JUMP_FACTOR`;
  - down: while the damping dominates the model's curvature along the step
    (`damping_share = s > 1/2`: λ, not the Fisher, sets the step's length,
    so λ is too large whatever else), λ falls to the balance point
    `λ (1 - s) / s = δ^T F δ / |δ|²` where the two are equal, by at most
    `JUMP_FACTOR` (and at least ω).

  Args:
    damping: λ.
    streak: the signed count of the last consecutive moves (+ up, - down).
    rho: the reduction ratio of this step (anything when not measured).
    rejected: whether this step was rejected.
    measured: whether ρ was measured at this step (nothing changes if not).
    omega: ω, the factor of one move (`(19/20)^steps` since the last
      measurement).
    damping_share: the quadratic model's `QuadraticModelState.damping_share`
      of this step.
    may_fall: False: λ does not fall at this measurement, whatever ρ (it
      still rises).

  Returns:
    The new `(λ, streak)`, unclipped.
  """
  up = rejected | ~jnp.isfinite(rho) | (rho < 0.25)
  down = ~up & (rho > 0.75) & may_fall
  new_streak = jnp.where(up, jnp.maximum(streak, 0) + 1,
                         jnp.where(down, jnp.minimum(streak, 0) - 1, 0))
  rise = omega ** -jnp.minimum(new_streak, MAX_STREAK).astype(damping.dtype)
  rise = jnp.where(rejected, JUMP_FACTOR, rise)
  dominant = damping_share > 0.5
  balance = (1.0 - damping_share) / jnp.where(dominant, damping_share, 1.0)
  fall = jnp.where(dominant, jnp.clip(balance, 1.0 / JUMP_FACTOR, omega), omega)
  factor = jnp.where(up, rise, jnp.where(down, fall, 1.0))
  return (jnp.where(measured, damping * factor, damping).astype(damping.dtype),
          jnp.where(measured, new_streak, streak).astype(streak.dtype))


def adapt(damping: Array, streak: Array, rho: Array, rejected: Array, measured: Array,
          probing: Array, interval: int, damping_share: Array, min_damping: float,
          may_fall: Any = True) -> tuple[Array, Array]:
  """`levenberg_marquardt` at `kfac`'s measurements, λ kept in `[min_damping, MAX_DAMPING]`.

  Args:
    damping: λ.
    streak: the signed count of the last consecutive moves.
    rho: this step's reduction ratio.
    rejected: whether this step was rejected.
    measured: whether ρ was measured at this step.
    probing: whether ρ is measured at every step now (ω for one step), else
      every `interval` steps (ω for `interval` steps).
    interval: T1, the steps between two measurements.
    damping_share: the quadratic model's damping share of this step.
    min_damping: the floor of λ.
    may_fall: whether λ may fall at this measurement (see `levenberg_marquardt`).

  Returns:
    The new `(λ, streak)`.
  """
  omega = jnp.where(probing, OMEGA, OMEGA ** interval).astype(damping.dtype)
  new, streak = levenberg_marquardt(damping, streak, rho, rejected, measured, omega,
                                    damping_share, may_fall)
  return jnp.clip(new, min_damping, MAX_DAMPING).astype(damping.dtype), streak


def candidates(gamma: Array, interval: int) -> tuple[Array, Array, Array]:
  """γ's candidates at a re-choice every `interval` steps (section 6.6).

  Args:
    gamma: the current γ.
    interval: T2, the steps between two re-choices.

  Returns:
    `(ω2 γ, γ, γ / ω2)` with `ω2 = sqrt(19/20)^T2`.
  """
  omega2 = math.sqrt(OMEGA) ** interval
  return gamma * omega2, gamma, gamma / omega2


def drifted(damping_now: Array, damping_of_inverses: Array) -> Array:
  """Whether the inverses' damping is off by more than `DRIFT` either way.

  Args:
    damping_now: the damping the update asks for (γ²).
    damping_of_inverses: the damping the inverses in use were computed with.

  Returns:
    A boolean scalar: refresh the inverses now.
  """
  ratio = damping_now / damping_of_inverses
  return (ratio > DRIFT) | (ratio < 1.0 / DRIFT)


def with_l2(damping: Any, l2_reg: float) -> Any:
  """λ + η: the damping with the L2 coefficient folded in (section 6.1).

  Args:
    damping: λ, a number or a schedule of the update count.
    l2_reg: η.

  Returns:
    λ + η, of the same form.
  """
  if callable(damping):
    return lambda count: jnp.asarray(damping(count)) + l2_reg
  return damping + l2_reg
