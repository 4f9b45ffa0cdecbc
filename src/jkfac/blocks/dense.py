# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The dense-layer Kronecker block (K-FAC, Martens & Grosse 2015, section 3).

For `s = x @ w + b` the Fisher block is approximated by `A ⊗ G` with
`A = mean(ā ā^T)` over the rows of the input (`ā` the input with a trailing 1
when there is a bias) and `G = sum(g g^T)` over the rows of the output
derivatives, which the estimator has scaled so that this sum is the
per-example mean. A layer applied at several places (or over extra leading
axes such as sequence positions) pools every row: the K-FAC-expand
approximation of Eschenhagen et al. (2023), which is the usual K-FAC for a
single use with one row per example.

The preconditioned gradient is `A^{-1} V G^{-1}` with `V = [∇w; ∇b]`, shape
`(in + 1, out)` (section 4.2; the bias is the last row of `A`'s side).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jkfac import linalg
from jkfac.blocks.base import Captures

Array = jax.Array


def _rows(x: Array, axis: int, dtype: Any) -> Array:
  x = jnp.moveaxis(x.astype(dtype), axis, -1)
  return x.reshape(-1, x.shape[-1])


def _dims(layer) -> tuple[int, int]:
  shape = layer.params[0].shape
  return (shape[1], shape[0]) if layer.option("transposed") else shape


class DenseBlock:
  """Kronecker-factored block of a dense layer."""

  roles = ("kernel", "bias")
  needs = "activations"

  def statistics(self, layer, captures: Captures) -> dict[str, Array]:
    """Returns `A` (with the bias row and column) and `G` of this batch.

    Args:
      layer: the layer (`tracing.Layer`).
      captures: its inputs and output derivatives, one entry per use.

    Returns:
      `{"A": (in[+1], in[+1]), "G": (out, out)}`.
    """
    dtype = captures.dtype
    xx, x_sum, g_cov, rows = 0.0, 0.0, 0.0, 0
    for use, x, g in zip(captures.uses, captures.inputs, captures.output_grads):
      x_rows = _rows(x, use.x_axis, dtype)
      xx = xx + x_rows.T @ x_rows
      x_sum = x_sum + jnp.sum(x_rows, axis=0)
      g_rows = _rows(g, use.out_axis + 1, dtype)  # axis 0 of g counts passes
      g_cov = g_cov + g_rows.T @ g_rows
      rows += x_rows.shape[0]
    a = xx / rows
    if layer.option("bias"):
      mean = (x_sum / rows)[:, None]
      one = jnp.ones((1, 1), dtype)
      a = jnp.block([[a, mean], [mean.T, one]])
    return {"A": a, "G": g_cov}

  def inverse(self, layer, factors: dict[str, Array], damping: Array,
              method: str = "cholesky") -> dict[str, Array]:
    """Returns the damped factor inverses (factored Tikhonov with π)."""
    a_inv, g_inv, pi = linalg.kronecker_inverses(factors["A"], factors["G"], damping, method)
    return {"A_inv": a_inv, "G_inv": g_inv, "pi": pi}

  def precondition(self, layer, inverse: dict[str, Array],
                   grads: Sequence[Array]) -> tuple[Array, ...]:
    """Returns `A^{-1} [∇w; ∇b] G^{-1}`, split back into kernel and bias."""
    dtype = inverse["A_inv"].dtype
    kernel = grads[0].T if layer.option("transposed") else grads[0]
    v = kernel.astype(dtype)
    if layer.option("bias"):
      v = jnp.concatenate([v, grads[1].astype(dtype)[None, :]], axis=0)
    u = inverse["A_inv"] @ v @ inverse["G_inv"]
    new_kernel = u[:kernel.shape[0]]
    new_kernel = (new_kernel.T if layer.option("transposed") else new_kernel)
    out = (new_kernel.astype(grads[0].dtype),)
    if layer.option("bias"):
      out += (u[-1].astype(grads[1].dtype),)
    return out

  def describe(self, layer) -> str:
    fan_in, fan_out = _dims(layer)
    a = fan_in + (1 if layer.option("bias") else 0)
    return f"A {a}x{a}, G {fan_out}x{fan_out}"


BLOCK = DenseBlock()
