# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The dense-layer Kronecker block (K-FAC, Martens & Grosse 2015, section 3).

A dense layer contracts some axes of its input with some axes of its kernel:
`x @ w + b`, `x @ w.T`, or an einsum projection such as `btd,dhk->bthk`
(flax `DenseGeneral`, attention). Its kernel, as a matrix `W` of shape
`(in, out)` (the contracted axes, then the others), gives `s = W^T ā`, and
the Fisher block is approximated by `A ⊗ G` with `ā` the input features with
a trailing 1 when there is a bias.

Rows beyond the batch (sequence positions, several applications of the same
kernel) share the weight; the two approximations of Eschenhagen et al. (2023):

- K-FAC-expand (the default): every row is an example of its own,
  `A = mean over rows of ā ā^T`, `G = sum over rows of g g^T` (the estimator
  scales the `g`s so that this sum is the per-example mean). With one row
  per example this is the usual K-FAC.
- K-FAC-reduce: rows are first aggregated per example,
  `A = mean_n (mean_r ā_{n,r})(mean_r ā_{n,r})^T`,
  `G = sum_n (sum_r g_{n,r})(sum_r g_{n,r})^T`; axis 0 is the batch.

The preconditioned gradient is `A^{-1} [W; b] G^{-1}` (section 4.2; the bias
is the last row of `A`'s side).

Several products summed before one bias, `x @ Wx + h @ Wh + b` (every RNN,
GRU and LSTM cell), are one layer over the concatenated input `[x, h, 1]`
(Martens, Ba & Johnson 2018): `W` is `[Wx; Wh]`, the kernels' matrices
stacked (option `more_kernels` holds the further kernels' axes).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional, Sequence

import jax
import jax.numpy as jnp
from typing_extensions import override

from jkfac.blocks.base import (Block, Captures, kronecker_inverses, row_weights,
                               with_bias_moments)
from jkfac.damping import Damping
from jkfac.sharding import row_products

if TYPE_CHECKING:  # jkfac.layers imports the blocks, through losses and tags
  from jkfac.layers import Layer

Array = jax.Array

WEIGHT_SHARING = ("expand", "reduce")


def _features_last(x: Array, axes: Sequence[int], dtype: Any) -> Array:
  """Moves `axes` to the end, in order, and flattens them."""
  x = jnp.moveaxis(x.astype(dtype), tuple(axes), tuple(range(x.ndim - len(axes), x.ndim)))
  return x.reshape(x.shape[:x.ndim - len(axes)] + (-1,))


def _layouts(layer: Layer) -> list[dict[str, tuple[int, ...]]]:
  """Each kernel's `in_axes` and `out_axes`: the first's, then option `more_kernels`'."""
  return [dict(options) for options in (layer.options, *layer.option("more_kernels", ()))]


def _kernel_rows(layout: dict[str, tuple[int, ...]], shape: Sequence[int]) -> int:
  return math.prod(shape[a] for a in layout["in_axes"])


def _kernel_matrix(layout: dict[str, tuple[int, ...]], kernel: Array) -> Array:
  """A kernel as the matrix `W`, shape `(in, out)`.

  Args:
    layout: the kernel's `in_axes` and `out_axes` (a dense layer's options).
    kernel: the kernel leaf, or an array of its shape (its gradient).

  Returns:
    `kernel` with its `in_axes` (in that order) flattened into the rows and
    its `out_axes` into the columns.
  """
  order = tuple(layout["in_axes"]) + tuple(layout["out_axes"])
  return jnp.transpose(kernel, order).reshape(_kernel_rows(layout, kernel.shape), -1)


def _kernel_from_matrix(layout: dict[str, tuple[int, ...]], matrix: Array,
                        shape: Sequence[int]) -> Array:
  order = tuple(layout["in_axes"]) + tuple(layout["out_axes"])
  kernel = matrix.reshape(tuple(shape[a] for a in order))
  return jnp.transpose(kernel, [order.index(a) for a in range(len(shape))])


def _split_params(layer: Layer, grads: Sequence[Array]) -> tuple[list[Array], Optional[Array]]:
  """The kernels (first, then `more_kernels`) and the bias (or None) of `grads`."""
  bias = layer.option("bias")
  kernels = [grads[0], *grads[2 if bias else 1:]]
  return kernels, grads[1] if bias else None


def gradient_matrix(layer: Layer, grads: Sequence[Array], dtype: Any) -> Array:
  """The gradients as `[∇W; ∇b]`, shape `(in[+1], out)`, in `dtype`.

  Args:
    layer: the dense layer (`tracing.Layer`).
    grads: the gradients of its parameters, in `layer.params` order: the
      kernel, the bias when the layer has one (option `bias`), then the
      further kernels of a layer summing several products (option
      `more_kernels`).
    dtype: the matrix's dtype.

  Returns:
    Each kernel's gradient as `_kernel_matrix` lays it out, stacked in the
    order of the layer's input features, with `∇b` as an extra last row when
    the layer has a bias.
  """
  kernels, bias = _split_params(layer, grads)
  rows = [_kernel_matrix(layout, g.astype(dtype)) for layout, g in zip(_layouts(layer), kernels)]
  if bias is not None:
    rows.append(bias.astype(dtype).reshape(1, -1))
  return jnp.concatenate(rows, axis=0) if len(rows) > 1 else rows[0]


def split_matrix(layer: Layer, u: Array, grads: Sequence[Array]) -> tuple[Array, ...]:
  """Splits `[U_W; u_b]` back into the parameters, shaped and typed as `grads`.

  Args:
    layer: the dense layer (`tracing.Layer`).
    u: a matrix laid out as `gradient_matrix` returns it, `(in[+1], out)`.
    grads: the gradients of the layer's parameters: the shapes and dtypes to
      give the pieces.

  Returns:
    One array per parameter, in `layer.params` order: the inverse of
    `gradient_matrix`.
  """
  kernels, bias = _split_params(layer, grads)
  pieces, start = [], 0
  for layout, g in zip(_layouts(layer), kernels):
    rows = _kernel_rows(layout, g.shape)
    pieces.append(_kernel_from_matrix(layout, u[start:start + rows], g.shape).astype(g.dtype))
    start += rows
  if bias is None:
    return tuple(pieces)
  return (pieces[0], u[start].reshape(bias.shape).astype(bias.dtype), *pieces[1:])


def _pairs(captures: Captures) -> list[tuple[Array, Array]]:
  """Per use, the input `(..., in)` and output derivatives `(K, ..., out)`, features last."""
  dtype = captures.dtype
  return [(_features_last(x, use.x_axes, dtype),
           _features_last(g, [a + 1 for a in use.out_axes], dtype))  # g's axis 0: passes
          for use, x, g in zip(captures.uses, captures.inputs, captures.output_grads)]


def rows(layer: Layer, captures: Captures) -> tuple[Array, Array]:
  """The rows whose outer products the factors average: `ā` and `g`, all uses together.

  The gradient of one row is `ā g^T` (summed over the curvature passes'
  `g`s in second moments), so per-row statistics of the kernel, such as
  EK-FAC's, come from these.

  Args:
    layer: the dense layer (`tracing.Layer`).
    captures: its inputs and output derivatives, one entry per use.

  Returns:
    `(ā, g)`: shapes `(R, in[+1])` (a trailing 1 with a bias) and
    `(K, R, out)`. With K-FAC-expand every position of every use is a row;
    with K-FAC-reduce (option `weight_sharing`) a row per example: its
    inputs averaged and its output derivatives summed over positions and
    uses. The output derivatives carry a masked loss's weights.
  """
  pairs = _pairs(captures)
  if layer.option("weight_sharing", "expand") == "reduce":
    count = sum(math.prod(x.shape[1:-1]) for x, _ in pairs)
    a = sum(jnp.sum(x.reshape(x.shape[0], -1, x.shape[-1]), axis=1) for x, _ in pairs) / count
    g = sum(jnp.sum(g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1]), axis=2)
            for _, g in pairs)
  else:
    a = jnp.concatenate([x.reshape(-1, x.shape[-1]) for x, _ in pairs], axis=0)
    g = jnp.concatenate([g.reshape(g.shape[0], -1, g.shape[-1]) for _, g in pairs], axis=1)
  if layer.option("bias"):
    a = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)
  return a, g


class DenseBlock(Block):
  """Kronecker-factored block of a dense layer."""

  roles = ("kernel", "bias")
  needs = "activations"
  kronecker = True

  def statistics(self, layer: Layer, captures: Captures) -> dict[str, Array]:
    """Returns `A` (with the bias row and column) and `G` of this batch.

    Args:
      layer: the layer (`tracing.Layer`).
      captures: its inputs and output derivatives, one entry per use.

    Returns:
      `{"A": (in[+1], in[+1]), "G": (out, out)}`.
    """
    dtype = captures.dtype
    pairs = _pairs(captures)
    # With a masked loss, rows weighted by their terms' weights (mean 1).
    weights = [row_weights(captures.weights, x.shape[:-1], dtype) for x, _ in pairs]
    weighted = [x if w is None else x * w[..., None] for (x, _), w in zip(pairs, weights)]
    if layer.option("weight_sharing", "expand") == "reduce":
      rows = sum(math.prod(x.shape[1:-1]) for x, _ in pairs)  # per example, all uses
      per_example = lambda x: jnp.sum(x.reshape(x.shape[0], -1, x.shape[-1]), axis=1)
      # Each example's rows averaged by weight, the example weighted by their mean:
      # A = Σ_b s_b s_b^T / (c_b · rows) / batch, s_b = Σ w x, c_b = Σ w.
      s = sum(per_example(x) for x in weighted)
      x = s / rows
      c = sum(jnp.full(x.shape[:1], math.prod(x.shape[1:-1]), dtype) if w is None else
              jnp.sum(w.reshape(w.shape[0], -1), axis=1) for (x, _), w in zip(pairs, weights))
      g = sum(jnp.sum(g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1]), axis=2)
              for _, g in pairs).reshape(-1, pairs[0][1].shape[-1])
      a = row_products(s / jnp.where(c > 0, c, 1.0)[:, None], x) / x.shape[0]
      mean, g_cov = jnp.mean(x, axis=0), row_products(g, g)
    else:
      rows = sum(math.prod(x.shape[:-1]) for x, _ in pairs)
      flat = lambda x: x.reshape(-1, x.shape[-1])
      a = sum(row_products(flat(w), flat(x)) for (x, _), w in zip(pairs, weighted)) / rows
      mean = sum(jnp.sum(flat(w), axis=0) for w in weighted) / rows
      g_cov = sum(row_products(flat(g), flat(g)) for _, g in pairs)
    if layer.option("bias"):
      a = with_bias_moments(a, mean)
    return {"A": a, "G": g_cov}

  def refresh(self, layer: Layer, factors: dict[str, Array], damping: Damping,
              method: str = "cholesky") -> dict[str, Array]:
    """Returns the damped factor inverses (factored Tikhonov with π).

    Args:
      layer: the layer (`tracing.Layer`).
      factors: `A` and `G`, averaged over batches.
      damping: λ.
      method: how to invert each damped factor (`linalg.damped_inverse`).

    Returns:
      `{"A_inv": (A + π√λ I)^{-1}, "G_inv": (G + √λ/π I)^{-1}, "pi": π}`
      (`base.kronecker_inverses`).
    """
    return kronecker_inverses(factors["A"], factors["G"], damping, method)

  def precondition(self, layer: Layer, inverse: dict[str, Array],
                   grads: Sequence[Array]) -> tuple[Array, ...]:
    """Returns `A^{-1} [∇W; ∇b] G^{-1}`, split back into kernel and bias.

    Args:
      layer: the layer (`tracing.Layer`).
      inverse: the damped inverses `A_inv` and `G_inv` (`refresh`).
      grads: the kernel's gradient, and the bias's when the layer has one.

    Returns:
      The preconditioned kernel gradient, and bias gradient if any, shaped
      and typed as `grads`.
    """
    v = gradient_matrix(layer, grads, inverse["A_inv"].dtype)
    return split_matrix(layer, inverse["A_inv"] @ v @ inverse["G_inv"], grads)

  @override
  def describe(self, layer: Layer) -> str:
    kernels, _ = _split_params(layer, [p.shape for p in layer.params])
    fan_in = sum(_kernel_rows(layout, shape) for layout, shape in zip(_layouts(layer), kernels))
    fan_out = math.prod(kernels[0][i] for i in layer.option("out_axes"))
    a = fan_in + (1 if layer.option("bias") else 0)
    sharing = ", reduce" if layer.option("weight_sharing") == "reduce" else ""
    return f"A {a}x{a}, G {fan_out}x{fan_out}{sharing}"


BLOCK = DenseBlock()
