# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Damping and inverses of symmetric positive semi-definite factors.

Inverses come from symmetric eigendecompositions, `M = Q diag(d) Q^T`, with
negative round-off eigenvalues clipped to 0 before the damping is added, so
that `(M + c I)^{-1} = Q diag(1 / (max(d, 0) + c)) Q^T` is always positive
definite for `c > 0`. Non-finite input never reaches `eigh`: the caller gets a
flag and keeps its previous inverse (see `transform`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def all_finite(tree) -> Array:
  """True when every leaf of `tree` is finite (a scalar boolean array)."""
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def damped_inverse(matrix: Array, shift: Array) -> Array:
  """Returns `(matrix + shift I)^{-1}` for a symmetric PSD `matrix`.

  Args:
    matrix: symmetric, shape `(n, n)`; non-finite entries are replaced by 0
      before the eigendecomposition (the caller checks finiteness itself).
    shift: a positive scalar added to every eigenvalue.

  Returns:
    The inverse, symmetric, shape `(n, n)`.
  """
  eigenvalues, eigenvectors = safe_eigh(matrix)
  scale = 1.0 / (eigenvalues + shift)
  return (eigenvectors * scale) @ eigenvectors.T


def safe_eigh(matrix: Array) -> tuple[Array, Array]:
  """Eigendecomposition of a symmetric PSD matrix, robust to bad input.

  Non-finite entries are replaced by 0; the matrix is symmetrised and scaled
  to unit largest entry, and entries below the smallest normal number are
  flushed to 0: subnormal numbers (common in the output factor of a confident
  classifier) slow LAPACK's eigensolver down a hundredfold. Eigenvalues are
  clipped at 0.

  Args:
    matrix: symmetric, shape `(n, n)`.

  Returns:
    `(eigenvalues, eigenvectors)`, eigenvalues non-negative, ascending.
  """
  safe = jnp.where(jnp.isfinite(matrix), matrix, 0.0)
  safe = 0.5 * (safe + safe.T)
  largest = jnp.max(jnp.abs(safe))
  scale = jnp.where(largest > 0, largest, 1.0)
  unit = safe / scale
  unit = jnp.where(jnp.abs(unit) < jnp.finfo(unit.dtype).tiny, 0.0, unit)
  eigenvalues, eigenvectors = jnp.linalg.eigh(unit)
  return jnp.maximum(eigenvalues, 0.0) * scale, eigenvectors


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
  ratio = (jnp.trace(a) / a.shape[0]) / (jnp.trace(g) / g.shape[0])
  ok = jnp.isfinite(ratio) & (ratio > 0)
  return jnp.where(ok, jnp.sqrt(jnp.where(ok, ratio, 1.0)), 1.0)


def kronecker_inverses(a: Array, g: Array, damping: Array) -> tuple[Array, Array, Array]:
  """Damped inverses of the two Kronecker factors (factored Tikhonov).

  `(A + π√λ I)^{-1}` and `(G + √λ/π I)^{-1}` (K-FAC section 6.3), so that
  their Kronecker product approximates `(A ⊗ G + λ I)^{-1}`.

  Args:
    a: the input-side factor `A`.
    g: the output-side factor `G`.
    damping: λ.

  Returns:
    `(A_inv, G_inv, π)`.
  """
  pi = pi_factor(a, g)
  root = jnp.sqrt(damping).astype(a.dtype)
  return damped_inverse(a, pi * root), damped_inverse(g, root / pi), pi
