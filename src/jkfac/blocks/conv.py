# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The convolution Kronecker block (KFC, Grosse & Martens 2016).

For `s = conv(x, w) + b`, with `T` output locations per example, the Fisher
block is approximated by `Ω ⊗ Γ` (the paper's names; `A ⊗ G` in jkfac):

- `A = Ω`, the mean over examples and output locations of `ā ā^T`, where `ā`
  is the input patch read at a location (channel-major, then the kernel's
  spatial offsets, exactly as `lax.conv_general_dilated_patches` orders it),
  with a trailing 1 when there is a bias;
- `G = Γ`, the mean over examples of the sum over locations of `g g^T`, `g`
  the derivative at one location (the paper's `T Γ`, folded into `G` so that
  the dense formulas hold unchanged).

Any `lax.conv_general_dilated` is covered: 1-, 2- and 3-D, strides, explicit
padding (SAME and VALID resolve to it), kernel dilation, input dilation
(transposed convolutions), any layout through `dimension_numbers`. A grouped
convolution (`feature_group_count = k`, depthwise when every group has one
input channel) is `k` independent blocks, one per group: its factors carry a
leading group axis. Patches are built batch chunk by batch chunk when the
whole patch matrix would exceed `PATCH_BYTES`, with the same result.

The preconditioned gradient of group `j` is `A_j^{-1} [W_j; b_j] G_j^{-1}`,
`W_j` the group's kernel as a `(in/k · kernel size, out/k)` matrix.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from typing_extensions import override

from jkfac import sharding
from jkfac.blocks.base import (Block, Captures, kronecker_inverses, row_weights,
                               with_bias_moments)
from jkfac.damping import Damping

if TYPE_CHECKING:  # jkfac.layers imports the blocks, through losses and tags
  from jkfac.layers import Layer

Array = jax.Array

PATCH_BYTES = 1 << 28  # largest patch matrix built at once (256 MiB)


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """The static arguments of a convolution, in canonical form.

  Attributes:
    window_strides: per spatial dimension.
    padding: `(low, high)` per spatial dimension.
    lhs_dilation: input dilation per spatial dimension (transposed convs).
    rhs_dilation: kernel dilation per spatial dimension.
    lhs_spec: the input's axes: batch, feature, then spatial.
    rhs_spec: the kernel leaf's axes: output feature, input feature, spatial.
    out_spec: the output's axes: batch, feature, spatial.
    groups: `feature_group_count`.
  """
  window_strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  lhs_dilation: tuple[int, ...]
  rhs_dilation: tuple[int, ...]
  lhs_spec: tuple[int, ...]
  rhs_spec: tuple[int, ...]
  out_spec: tuple[int, ...]
  groups: int

  @property
  def kernel_spatial(self) -> tuple[int, ...]:
    """The kernel leaf's spatial axes, in the convolution's order (`rhs_spec[2:]`)."""
    return self.rhs_spec[2:]


def spec_from_params(params: dict[str, Any], rhs_perm: Sequence[int]) -> Optional[ConvSpec]:
  """The spec of a `conv_general_dilated` equation whose kernel is a view.

  Args:
    params: the equation's parameters.
    rhs_perm: the kernel view's axis permutation (view axis i is leaf axis
      `rhs_perm[i]`).

  Returns:
    The spec in the kernel leaf's axes, or None when the block does not
    apply (`batch_group_count > 1`, which only gradients of convolutions use).
  """
  if params.get("batch_group_count", 1) != 1:
    return None
  numbers = params["dimension_numbers"]
  padding = params["padding"]
  if isinstance(padding, str):
    return None
  spatial = len(numbers.lhs_spec) - 2
  return ConvSpec(
      window_strides=tuple(params["window_strides"]),
      padding=tuple((int(lo), int(hi)) for lo, hi in padding),
      lhs_dilation=tuple(params.get("lhs_dilation") or (1,) * spatial),
      rhs_dilation=tuple(params.get("rhs_dilation") or (1,) * spatial),
      lhs_spec=tuple(numbers.lhs_spec),
      rhs_spec=tuple(rhs_perm[a] for a in numbers.rhs_spec),
      out_spec=tuple(numbers.out_spec),
      groups=int(params["feature_group_count"]))


def spec_from_args(x_shape: Sequence[int], w_shape: Sequence[int],
                   **conv_args: Any) -> ConvSpec:
  """The spec of `lax.conv_general_dilated(x, w, **conv_args)` (for `register_conv`).

  Args:
    x_shape: the input's shape.
    w_shape: the kernel's shape.
    **conv_args: `window_strides`, `padding` (a string or pairs),
      `lhs_dilation`, `rhs_dilation`, `dimension_numbers`,
      `feature_group_count`, as `lax.conv_general_dilated` takes them.

  Returns:
    The canonical spec.
  """
  unknown = set(conv_args) - {"window_strides", "padding", "lhs_dilation", "rhs_dilation",
                              "dimension_numbers", "feature_group_count", "precision",
                              "preferred_element_type"}
  if unknown:
    raise ValueError(
        f"register_conv: unsupported convolution arguments {sorted(unknown)}. The KFC "
        "block takes window_strides, padding, lhs_dilation, rhs_dilation, "
        "dimension_numbers, feature_group_count, precision and preferred_element_type; "
        "leave other convolutions untagged (their kernels get the diagonal fallback).")
  spatial = len(x_shape) - 2
  numbers = lax.conv_dimension_numbers(tuple(x_shape), tuple(w_shape),
                                       conv_args.get("dimension_numbers"))
  strides = tuple(conv_args.get("window_strides") or (1,) * spatial)
  lhs_dilation = tuple(conv_args.get("lhs_dilation") or (1,) * spatial)
  rhs_dilation = tuple(conv_args.get("rhs_dilation") or (1,) * spatial)
  padding = conv_args.get("padding", "VALID")
  if isinstance(padding, str):
    in_spatial = [(x_shape[a] - 1) * d + 1 for a, d in zip(numbers.lhs_spec[2:], lhs_dilation)]
    window = [(w_shape[a] - 1) * d + 1 for a, d in zip(numbers.rhs_spec[2:], rhs_dilation)]
    padding = lax.padtype_to_pads(in_spatial, window, strides, padding)
  return ConvSpec(strides, tuple((int(lo), int(hi)) for lo, hi in padding), lhs_dilation,
                  rhs_dilation, tuple(numbers.lhs_spec), tuple(numbers.rhs_spec),
                  tuple(numbers.out_spec), int(conv_args.get("feature_group_count", 1)))


def _patches(x: Array, spec: ConvSpec, kernel_shape: Sequence[int]) -> Array:
  """Input patches, shape `(rows, in · kernel size)`, rows = examples x locations."""
  spatial = len(spec.window_strides)
  numbers = lax.ConvDimensionNumbers(  # patches out as (batch, spatial..., features)
      lhs_spec=spec.lhs_spec, rhs_spec=tuple(range(spatial + 2)),
      out_spec=(0, spatial + 1) + tuple(range(1, spatial + 1)))
  patches = lax.conv_general_dilated_patches(
      x, filter_shape=tuple(kernel_shape[a] for a in spec.kernel_spatial),
      window_strides=spec.window_strides, padding=spec.padding,
      lhs_dilation=spec.lhs_dilation, rhs_dilation=spec.rhs_dilation,
      dimension_numbers=numbers, precision=lax.Precision.HIGHEST)
  return patches.reshape(-1, patches.shape[-1])


def _patch_moments(x: Array, spec: ConvSpec, kernel_shape: Sequence[int],
                   weight: Optional[Array] = None) -> tuple[Array, Array]:
  """Sums over rows of `p p^T` per group, shape `(groups, d, d)`, and of `p`.

  With `weight` (one per example, a masked loss's), each example's rows are
  weighted by it in both sums.
  """
  groups = spec.groups

  def moments(x_chunk, w_chunk):
    p = _patches(x_chunk, spec, kernel_shape)
    p = p.reshape(p.shape[0], groups, -1)
    weighted = p if w_chunk is None else (  # rows are examples x locations
        p * jnp.repeat(w_chunk, p.shape[0] // w_chunk.shape[0])[:, None, None])
    return sharding.einsum("rgi,rgj->gij", weighted, p), jnp.sum(weighted, axis=0)

  batch_axis = spec.lhs_spec[0]
  n = x.shape[batch_axis]
  per_example = (math.prod(x.shape) // n * math.prod(spec.lhs_dilation)  # generous: bytes of
                 * math.prod(kernel_shape[a] for a in spec.kernel_spatial) * 4)  # its patches
  chunks = min(n, max(1, math.ceil(n * per_example / PATCH_BYTES)))
  if chunks == 1:
    return moments(x, weight)
  size = math.ceil(n / chunks)
  x = jnp.moveaxis(x, batch_axis, 0)
  x = jnp.pad(x, [(0, size * chunks - n)] + [(0, 0)] * (x.ndim - 1))  # zero examples add 0
  x = x.reshape((chunks, size) + x.shape[1:])
  x = jnp.moveaxis(x, 1, batch_axis + 1)
  if weight is not None:
    weight = jnp.pad(weight, (0, size * chunks - n)).reshape(chunks, size)
  squares, sums = lax.map(lambda chunk: moments(*chunk), (x, weight))
  return jnp.sum(squares, axis=0), jnp.sum(sums, axis=0)


def _kernel_matrix(kernel: Array, spec: ConvSpec) -> Array:
  """The kernel as per-group matrices `(groups, in/groups · kernel size, out/groups)`."""
  order = (spec.rhs_spec[1],) + spec.kernel_spatial + (spec.rhs_spec[0],)
  matrix = jnp.transpose(kernel, order)
  matrix = matrix.reshape(-1, spec.groups, kernel.shape[spec.rhs_spec[0]] // spec.groups)
  return jnp.moveaxis(matrix, 1, 0)


def _kernel_from_matrix(matrix: Array, spec: ConvSpec, shape: Sequence[int]) -> Array:
  order = (spec.rhs_spec[1],) + spec.kernel_spatial + (spec.rhs_spec[0],)
  kernel = jnp.moveaxis(matrix, 0, 1).reshape(tuple(shape[a] for a in order))
  return jnp.transpose(kernel, [order.index(a) for a in range(len(shape))])


def gradient_matrix(layer: Layer, grads: Sequence[Array], dtype: Any) -> Array:
  """The gradients as per-group matrices `[∇W_j; ∇b_j]`, `(groups, d[+1], out/groups)`.

  Args:
    layer: the convolution (`tracing.Layer`), with its `ConvSpec` in option "conv".
    grads: the kernel's gradient, and the bias's when the layer has one.
    dtype: the matrices' dtype.

  Returns:
    Each group's kernel gradient as a matrix (input features and kernel
    positions in the rows, as the patches lay them out), with the bias's
    as a last row when the layer has one.
  """
  spec: ConvSpec = layer.option("conv")
  v = _kernel_matrix(grads[0].astype(dtype), spec)
  if layer.option("bias"):
    v = jnp.concatenate([v, grads[1].astype(dtype).reshape(spec.groups, 1, -1)], axis=1)
  return v


def split_matrix(layer: Layer, u: Array, grads: Sequence[Array]) -> tuple[Array, ...]:
  """Splits per-group matrices laid out as `gradient_matrix`'s back into the parameters.

  Args:
    layer: the convolution (`tracing.Layer`).
    u: `(groups, d[+1], out/groups)`.
    grads: the gradients of the layer's parameters: the shapes and dtypes to
      give the pieces.

  Returns:
    The kernel, and the bias when the layer has one, shaped and typed as
    `grads`.
  """
  spec: ConvSpec = layer.option("conv")
  kernel_rows = u.shape[1] - (1 if layer.option("bias") else 0)
  out = (_kernel_from_matrix(u[:, :kernel_rows], spec, grads[0].shape).astype(grads[0].dtype),)
  if layer.option("bias"):
    out += (u[:, -1].reshape(grads[1].shape).astype(grads[1].dtype),)
  return out


def patch_rows(layer: Layer, x: Array, dtype: Any) -> Array:
  """The patches of one input, per group, with a trailing 1 for a bias.

  Args:
    layer: the convolution (`tracing.Layer`).
    x: its input.
    dtype: the rows' dtype.

  Returns:
    `(examples x locations, groups, d[+1])`, the rows in the order of the
    output derivatives' `output_rows`.
  """
  spec: ConvSpec = layer.option("conv")
  p = _patches(x.astype(dtype), spec, layer.params[0].shape)
  p = p.reshape(p.shape[0], spec.groups, -1)
  if layer.option("bias"):
    p = jnp.concatenate([p, jnp.ones(p.shape[:-1] + (1,), p.dtype)], axis=-1)
  return p


def output_rows(layer: Layer, g: Array, dtype: Any) -> Array:
  """The output derivatives of one use as rows per group.

  Args:
    layer: the convolution (`tracing.Layer`).
    g: the output derivatives, `(K, *out_shape)`.
    dtype: the rows' dtype.

  Returns:
    `(K, examples x locations, groups, out/groups)`.
  """
  spec: ConvSpec = layer.option("conv")
  order = (0, 1 + spec.out_spec[0], *(1 + a for a in spec.out_spec[2:]), 1 + spec.out_spec[1])
  g = jnp.transpose(g.astype(dtype), order)  # examples, locations as the patches', features
  return g.reshape(g.shape[0], -1, spec.groups, g.shape[-1] // spec.groups)


class ConvBlock(Block):
  """Kronecker-factored block of a convolution, one per feature group."""

  roles = ("kernel", "bias")
  needs = "activations"
  kronecker = True

  def statistics(self, layer: Layer, captures: Captures) -> dict[str, Array]:
    """Returns per-group `A` (patch second moments) and `G` of this batch.

    Args:
      layer: the layer (`tracing.Layer`), with its `ConvSpec` in option "conv".
      captures: its inputs and output derivatives, one entry per use.

    Returns:
      `{"A": (groups, d[+1], d[+1]), "G": (groups, out/groups, out/groups)}`.
    """
    spec: ConvSpec = layer.option("conv")
    kernel_shape = layer.params[0].shape
    dtype = captures.dtype
    groups = spec.groups
    squares, sums, g_cov, rows = 0.0, 0.0, 0.0, 0
    for x, g in zip(captures.inputs, captures.output_grads):
      # With a masked loss, each example's patches weighted by its mean term weight.
      weight = row_weights(captures.weights, (x.shape[spec.lhs_spec[0]],), dtype)
      square, total = _patch_moments(x.astype(dtype), spec, kernel_shape, weight)
      squares, sums = squares + square, sums + total
      rows += math.prod(g.shape[1:]) // g.shape[1 + spec.out_spec[1]]
      g = jnp.moveaxis(g.astype(dtype), 1 + spec.out_spec[1], -1)
      g = g.reshape(-1, groups, g.shape[-1] // groups)
      g_cov = g_cov + sharding.einsum("rgi,rgj->gij", g, g)
    a = squares / rows
    if layer.option("bias"):
      a = with_bias_moments(a, sums / rows)
    return {"A": a, "G": g_cov}

  def refresh(self, layer: Layer, factors: dict[str, Array], damping: Damping,
              method: str = "cholesky") -> dict[str, Array]:
    """Returns each group's damped factor inverses (factored Tikhonov with π).

    Args:
      layer: the layer (`tracing.Layer`).
      factors: the per-group `A` and `G`, averaged over batches.
      damping: λ.
      method: how to invert each damped factor (`linalg.damped_inverse`).

    Returns:
      `{"A_inv", "G_inv", "pi"}` as for a dense layer
      (`base.kronecker_inverses`), each with a leading group axis.
    """
    return jax.vmap(lambda a, g: kronecker_inverses(a, g, damping, method))(
        factors["A"], factors["G"])

  def precondition(self, layer: Layer, inverse: dict[str, Array],
                   grads: Sequence[Array]) -> tuple[Array, ...]:
    """Returns `A_j^{-1} [∇W_j; ∇b_j] G_j^{-1}` per group j, as kernel and bias.

    Args:
      layer: the layer (`tracing.Layer`), with its `ConvSpec` in option "conv".
      inverse: the per-group damped inverses `A_inv` and `G_inv` (`refresh`).
      grads: the kernel's gradient, and the bias's when the layer has one.

    Returns:
      The preconditioned kernel gradient, and bias gradient if any, shaped
      and typed as `grads`.
    """
    v = gradient_matrix(layer, grads, inverse["A_inv"].dtype)
    return split_matrix(layer, inverse["A_inv"] @ v @ inverse["G_inv"], grads)

  @override
  def describe(self, layer: Layer) -> str:
    spec: ConvSpec = layer.option("conv")
    shape = layer.params[0].shape
    fan_in = shape[spec.rhs_spec[1]] * math.prod(shape[a] for a in spec.kernel_spatial)
    a = fan_in + (1 if layer.option("bias") else 0)
    out = shape[spec.rhs_spec[0]] // spec.groups
    per = f" per group, {spec.groups} groups" if spec.groups > 1 else ""
    return f"A {a}x{a}, G {out}x{out}{per}"


BLOCK = ConvBlock()
