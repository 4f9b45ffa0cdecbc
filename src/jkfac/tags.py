# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Curvature tags: primitives that mark layers and losses in the traced graph.

A tag is the identity on its first operand. Its other operands (a layer's
input and parameters, a loss's targets) ride along so that `jax.make_jaxpr`
of the user's loss shows them next to the tagged value. Tags survive `jit`,
`vmap`, `grad`, `remat` and `scan`: their derivative is the identity on the
first operand and zero on the others, their batching rule moves every batch
axis to the front, and they lower to nothing.

Dense and convolution layers do not need tags: `jkfac.estimator` finds them in
the graph. Tags are for layers it cannot recognise and for users who compute
a loss value themselves.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

Array = jax.Array

LAYER_TAG_NAME = "jkfac_layer_tag"
LOSS_TAG_NAME = "jkfac_loss_tag"


def _make_tag_primitive(name: str) -> Primitive:
  """Returns an identity-on-first-operand primitive with all JAX rules."""
  prim = Primitive(name)

  def impl(tagged, *unused_operands, **unused_params):
    return tagged

  def abstract_eval(tagged, *unused_operands, **unused_params):
    return tagged

  def jvp(primals, tangents, **params):
    out = prim.bind(*primals, **params)
    return out, ad.instantiate_zeros(tangents[0])

  def batch(args, dims, **params):
    # An unbatched operand has dimension None (`batching.not_mapped`).
    args = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
    out_dim = None if dims[0] is None else 0
    return prim.bind(*args, **params), out_dim

  prim.def_impl(impl)
  prim.def_abstract_eval(abstract_eval)
  ad.primitive_jvps[prim] = jvp
  batching.primitive_batchers[prim] = batch
  mlir.register_lowering(
      prim, mlir.lower_fun(lambda tagged, *_, **__: tagged,
                           multiple_results=False))
  return prim


layer_tag_p = _make_tag_primitive(LAYER_TAG_NAME)
loss_tag_p = _make_tag_primitive(LOSS_TAG_NAME)


def _layer_tag(kind: str, y: Array, x: Array, params: tuple[Optional[Array], ...],
               **meta: Any) -> Array:
  present = tuple(p is not None for p in params)
  operands = [p for p in params if p is not None]
  return layer_tag_p.bind(y, x, *operands, kind=kind, present=present,
                          meta=tuple(sorted(meta.items())))


def register_dense(y: Array, x: Array, w: Array, b: Optional[Array] = None) -> Array:
  """Tags `y` as the output of a dense layer `y = x @ w + b`.

  Dense layers written with `@`, `jnp.dot`, `jnp.einsum` or `lax.dot_general`
  are found automatically; tag only layers computed some other way.

  Args:
    y: the layer's output, shape `(..., out)`.
    x: the layer's input, shape `(..., in)`, the same leading dimensions.
    w: the weight, shape `(in, out)`; a parameter leaf of the loss function.
    b: optional bias, shape `(out,)`; a parameter leaf.

  Returns:
    `y`, unchanged.
  """
  _check_dense(y, x, w, b)
  return _layer_tag("dense", y, x, (w, b), in_axes=(0,), out_axes=(1,))


def _check_dense(y, x, w, b) -> None:
  if w.ndim != 2:
    raise ValueError(f"register_dense: w must be 2-D (in, out), got shape {w.shape}. "
                     "Leave layers with other kernels untagged: `x @ w`, jnp.einsum and "
                     "lax.dot_general layers are found automatically.")
  if x.shape[-1:] != w.shape[:1] or y.shape != x.shape[:-1] + w.shape[1:]:
    raise ValueError(
        f"register_dense: shapes do not match y = x @ w + b: x {x.shape}, w "
        f"{w.shape}, y {y.shape}. x must be (..., in), w (in, out), y (..., out): pass "
        "the layer's own input, kernel and output (a kernel stored (out, in) is w.T, "
        "which is not a parameter leaf: leave that layer untagged).")
  if b is not None and b.shape != w.shape[1:]:
    raise ValueError(f"register_dense: b must have shape {w.shape[1:]} (w's output "
                     f"size), got {b.shape}. Pass the bias added to this layer's output.")


def register_conv(y: Array, x: Array, w: Array, b: Optional[Array] = None,
                  **conv_args: Any) -> Array:
  """Tags `y` as `lax.conv_general_dilated(x, w, **conv_args) + b`.

  Args:
    y: the convolution's output.
    x: its input.
    w: the kernel, a parameter leaf.
    b: optional bias over output channels, a parameter leaf.
    **conv_args: the keyword arguments of `lax.conv_general_dilated`
      (window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count).

  Returns:
    `y`, unchanged.
  """
  from jkfac.blocks import conv  # pylint: disable=g-import-not-at-top (a cycle otherwise)
  expected = _conv_output(x, w, conv_args)
  spec = conv.spec_from_args(x.shape, w.shape, **conv_args)
  if y.shape != expected.shape or (b is not None and b.shape != (w.shape[spec.rhs_spec[0]],)):
    raise ValueError(
        f"register_conv: shapes do not match y = conv(x, w) + b: x {x.shape}, w {w.shape}, "
        f"y {y.shape} (expected {expected.shape}), b {None if b is None else b.shape} "
        f"(expected ({w.shape[spec.rhs_spec[0]]},), the output channels). Pass the "
        "convolution's own input, kernel, output and keyword arguments.")
  return _layer_tag("conv", y, x, (w, b), conv=spec)


def _conv_output(x: Array, w: Array, conv_args: dict[str, Any]) -> jax.ShapeDtypeStruct:
  """The shape of `lax.conv_general_dilated(x, w, **conv_args)`, or a clear error."""
  try:
    return jax.eval_shape(lambda x, w: jax.lax.conv_general_dilated(x, w, **conv_args), x, w)
  except (TypeError, ValueError) as error:
    raise ValueError(
        f"register_conv: lax.conv_general_dilated(x, w, **conv_args) fails for x "
        f"{x.shape}, w {w.shape}, conv_args {conv_args}: {error}\nPass the "
        "convolution's own input, kernel and keyword arguments (window_strides and "
        "padding are required, as for lax.conv_general_dilated).") from error


def register_scale_and_shift(y: Array, x: Array, scale: Optional[Array] = None,
                             shift: Optional[Array] = None) -> Array:
  """Tags `y` as `x * scale + shift` (scale and shift broadcast over `x`).

  Normalisation layers (`x̂ * scale + shift`, flax's LayerNorm, RMSNorm,
  GroupNorm, BatchNorm) are found automatically; tag only others.

  Args:
    y: the output.
    x: the input.
    scale: optional scale, a parameter leaf with the trailing shape of `x`.
    shift: optional shift, a parameter leaf of the same shape.

  Returns:
    `y`, unchanged.
  """
  if scale is None and shift is None:
    raise ValueError("register_scale_and_shift needs a scale, a shift or both: pass "
                     "scale=..., shift=... (parameter leaves).")
  shapes = {p.shape for p in (scale, shift) if p is not None}
  shape = shapes.pop()
  if shapes or y.shape != x.shape or (shape and x.shape[x.ndim - len(shape):] != shape):
    raise ValueError(
        f"register_scale_and_shift: shapes do not match y = x * scale + shift: x {x.shape}, "
        f"y {y.shape}, scale {None if scale is None else scale.shape}, shift "
        f"{None if shift is None else shift.shape}. y must have x's shape, and scale and "
        "shift x's trailing shape (e.g. (features,) for x (batch, features)).")
  axes = tuple(range(x.ndim - len(shape), x.ndim))
  return _layer_tag("scale_and_shift", y, x, (scale, shift), axes=axes)


def loss_tag(prediction: Array, target: Array, *, distribution: str,
             weight: float = 1.0, mask: Optional[Array] = None) -> Array:
  """Registers `prediction` as the parameters of a predictive distribution.

  Args:
    prediction: logits (categorical, Bernoulli) or mean (Gaussian).
    target: the data's targets, shaped as the loss function expects.
    distribution: `"categorical"`, `"bernoulli"` or `"gaussian"`.
    weight: the coefficient of this loss in the total loss, so that the
      curvature of `weight * loss` is `weight` times the loss's curvature.
    mask: None, or the non-negative weights of the loss's terms, shaped as
      the prediction's leading axes (`jkfac.losses` checks and broadcasts
      it): the loss is `sum(mask * nll) / sum(mask)` over those terms.

  Returns:
    `prediction`, unchanged.
  """
  operands = (prediction, target) if mask is None else (prediction, target, mask)
  return loss_tag_p.bind(*operands, distribution=distribution,
                         weight=_static_weight(weight))


def _static_weight(weight: Any) -> float:
  """`weight` as a float: a concrete, finite, non-negative number."""
  if isinstance(weight, jax.core.Tracer):
    raise ValueError(
        f"Loss weight: got a traced array ({weight.aval}); the weight scales the "
        "registered curvature and must be known when the loss is traced. Pass a Python "
        "number (weight=0.5), not an array computed from the arguments.")
  value = float(weight)
  if not value >= 0.0 or value == float("inf"):
    raise ValueError(f"Loss weight must be a finite number >= 0, got {weight!r}. To "
                     "subtract a loss, change the model instead: a negative weight "
                     "makes the curvature negative.")
  return value
