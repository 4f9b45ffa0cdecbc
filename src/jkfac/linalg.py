# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Damping and inverses of symmetric positive semi-definite factors.

Two ways to compute `(M + c I)^{-1}` for a factor `M` and a shift `c > 0`:

- `"cholesky"` (the default): a Cholesky factorisation and two triangular
  solves, a third of an eigendecomposition's time on CPU.
- `"eigh"`: the symmetric eigendecomposition `M = Q diag(d) Q^T`, with negative
  round-off eigenvalues clipped to 0: `Q diag(1 / (max(d, 0) + c)) Q^T`.

Non-finite input never reaches either: the transform only averages finite
statistics into its factors, and keeps its previous inverses when a new one
is not finite (`all_finite`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

METHODS = ("cholesky", "eigh")


def all_finite(tree: Any) -> Array:
  """True when every entry of every leaf of `tree` is finite.

  One sum per leaf: a sum is finite only if all its terms are (a sum that
  overflows the dtype counts as non-finite, which is what it is).

  Args:
    tree: a pytree of arrays.

  Returns:
    A scalar boolean array.
  """
  sums = [jnp.sum(x) for x in jax.tree.leaves(tree)]
  if not sums:
    return jnp.array(True)
  return jnp.all(jnp.isfinite(jnp.stack(sums)))


def damped_inverse(matrix: Array, shift: Array, method: str = "cholesky") -> Array:
  """Returns `(matrix + shift I)^{-1}` for a finite symmetric PSD `matrix`.

  The shift is at least `8 eps tr(matrix)` (`eps` the dtype's machine
  epsilon): below that, `matrix + shift I` is not numerically positive
  definite in the factor dtype, and its inverse would be round-off.

  Args:
    matrix: symmetric positive semi-definite, shape `(n, n)`, finite.
    shift: a positive scalar.
    method: `"cholesky"` or `"eigh"` (see the module docstring).

  Returns:
    The inverse, symmetric positive definite, shape `(n, n)`; NaN if LAPACK
    fails, which the caller detects (`all_finite`) and replaces.
  """
  if method not in METHODS:
    raise ValueError(f"inverse method must be one of {METHODS}, got {method!r}: pass "
                     "'cholesky' (the default) or 'eigh'.")
  shift = floored_shift(matrix, shift)
  if method == "eigh":
    eigenvalues, eigenvectors = jnp.linalg.eigh(matrix)
    scale = 1.0 / (jnp.maximum(eigenvalues, 0.0) + shift)
    return (eigenvectors * scale) @ eigenvectors.T
  eye = jnp.eye(matrix.shape[0], dtype=matrix.dtype)
  lower = jnp.linalg.cholesky(matrix + shift * eye)
  return jax.scipy.linalg.cho_solve((lower, True), eye)


def floored_shift(matrix: Array, shift: Array) -> Array:
  """`shift`, at least `8 eps tr(matrix)` (see `damped_inverse`).

  Args:
    matrix: symmetric positive semi-definite, shape `(n, n)`.
    shift: a positive scalar.

  Returns:
    `max(shift, 8 eps tr(matrix))`, `eps` the machine epsilon of `matrix`'s
    dtype.
  """
  return jnp.maximum(shift, 8 * jnp.finfo(matrix.dtype).eps * jnp.trace(matrix))


def pi_factor(a: Array, g: Array) -> Array:
  """The factored-Tikhonov π of K-FAC section 6.3.

  `π = sqrt((tr(A)/dim A) / (tr(G)/dim G))`, which balances the damping
  between the two factors; 1 when either trace is not positive and finite.

  Args:
    a: the input-side factor.
    g: the output-side factor.

  Returns:
    π, a positive scalar.
  """
  return pi_from_traces(jnp.trace(a), a.shape[0], jnp.trace(g), g.shape[0])


def pi_from_traces(trace_a: Array, dim_a: int, trace_g: Array, dim_g: int) -> Array:
  """`pi_factor` from the factors' traces and dimensions (diagonal factors).

  Args:
    trace_a: the trace of the input-side factor `A`.
    dim_a: `A`'s dimension.
    trace_g: the trace of the output-side factor `G`.
    dim_g: `G`'s dimension.

  Returns:
    `π = sqrt((trace_a/dim_a) / (trace_g/dim_g))`, or 1 when that ratio is
    not positive and finite.
  """
  ratio = (trace_a / dim_a) / (trace_g / dim_g)
  ok = jnp.isfinite(ratio) & (ratio > 0)
  return jnp.where(ok, jnp.sqrt(jnp.where(ok, ratio, 1.0)), 1.0)
