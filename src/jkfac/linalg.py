# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Damping and inverses of symmetric positive semi-definite factors.

Inverses come from symmetric eigendecompositions, `M = Q diag(d) Q^T`, with
negative round-off eigenvalues clipped to 0 before the damping is added, so
that `(M + c I)^{-1} = Q diag(1 / (max(d, 0) + c)) Q^T` is always positive
definite for `c > 0`. Non-finite input never reaches `eigh`: the transform
only averages finite statistics into its factors, and keeps its previous
inverses when a new one is not finite (`gram_finite`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def gram_finite(tree) -> Array:
  """True when every leaf of `tree`, a tree of Gram matrices, is finite.

  Cheap: for a positive semi-definite matrix (a factor `x^T x`, or a damped
  inverse `Q diag(s) Q^T` with `s > 0`) a non-finite entry always comes with
  a non-finite diagonal entry, so only diagonals are read. Vectors (diagonal
  blocks) and scalars are read whole.

  Args:
    tree: a pytree of square matrices, vectors and scalars.

  Returns:
    A scalar boolean array.
  """
  sums = [jnp.trace(x) if x.ndim == 2 and x.shape[0] == x.shape[1] else jnp.sum(x)
          for x in jax.tree_util.tree_leaves(tree)]
  if not sums:
    return jnp.array(True)
  return jnp.all(jnp.isfinite(jnp.stack(sums)))


def damped_inverse(matrix: Array, shift: Array) -> Array:
  """Returns `(matrix + shift I)^{-1}` for a finite symmetric PSD `matrix`.

  From the symmetric eigendecomposition `Q diag(d) Q^T` (of the symmetrised
  input), with round-off negative eigenvalues clipped to 0:
  `Q diag(1 / (max(d, 0) + shift)) Q^T`. If LAPACK fails, the result is NaN,
  which the caller detects (`gram_finite`) and replaces.

  Args:
    matrix: symmetric, shape `(n, n)`, finite.
    shift: a positive scalar added to every eigenvalue.

  Returns:
    The inverse, symmetric, shape `(n, n)`.
  """
  eigenvalues, eigenvectors = jnp.linalg.eigh(matrix)
  scale = 1.0 / (jnp.maximum(eigenvalues, 0.0) + shift)
  return (eigenvectors * scale) @ eigenvectors.T


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
