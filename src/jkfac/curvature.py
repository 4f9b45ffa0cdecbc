# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The quadratic model's curvature products and the loss at other parameters.

Both run on a batch's traced program, from the estimator's `Statistics`
(`extras["curvature"]`, `extras["loss_at"]`, as `jax.tree_util.Partial`):
`gram` is the exact Fisher's Gram matrix of a few vectors by forward-mode
products (K-FAC section 7); `loss_at` one forward pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp

from jkfac import interpret, losses, sharding, term_weights, tracing

if TYPE_CHECKING:  # the estimator imports this module
  from jkfac.estimator import Estimator

Array = jax.Array


def gram(est: Estimator, program: tracing.Program, flat_params: list[Array],
         flat_args: list[Array], vectors: Sequence[Any]) -> Array:
  """`M[i, j] = v_i^T F v_j` for the exact Fisher of this batch's mean loss.

  F is the Fisher (equal to the generalised Gauss-Newton matrix for these
  losses) of the registered predictive distributions, `J^T H J` averaged
  over examples and weighted as the losses are: one linearisation of the
  network's predictions, one forward-mode product per vector, never a
  matrix formed (K-FAC section 7).

  Args:
    est: the estimator (its parameters' layout and factor dtype).
    program: the traced program of this batch's shapes.
    flat_params: the parameters' leaves.
    flat_args: the batch's leaves.
    vectors: pytrees with the parameters' structure.

  Returns:
    The Gram matrix, shape `(len(vectors), len(vectors))`, factor dtype.
  """
  def predictions(p):  # and the losses' masks (None if unmasked), whose tangents are unused
    result = interpret.run(program.plan, list(p) + list(flat_args), {})
    return ([result.predictions[l.id][0] for l in program.losses],
            [jax.lax.stop_gradient(result.predictions[l.id][2]) for l in program.losses])

  (preds, masks), linear_with_masks = jax.linearize(predictions, list(flat_params))
  linear = lambda tangent: linear_with_masks(tangent)[0]
  # With parameters of a narrower range than float32 (float16), each vector
  # is divided by a power of two near its largest entry before the product
  # runs in the parameters' dtype, so that a long direction does not
  # overflow (exact: the product is linear); the Gram matrix is scaled back
  # in the factor dtype.
  narrow = any(jnp.issubdtype(p.dtype, jnp.floating)
               and jnp.finfo(p.dtype).max < jnp.finfo(jnp.float32).max for p in flat_params)
  tangents, scales = [], []
  for v in vectors:
    _, given = est.align(v, "the curvature product's vector", partial=True)
    leaves = [jnp.zeros_like(p) if g is None else g for g, p in zip(given, flat_params)]
    power = jnp.ones([], est.factor_dtype)
    if narrow:
      peak = [jnp.max(jnp.abs(t)).astype(est.factor_dtype) for t in leaves if jnp.size(t)]
      _, exponent = jnp.frexp(jnp.max(jnp.stack(peak)) if peak else jnp.zeros([]))
      power = jnp.ldexp(power, exponent)
      leaves = [t.astype(est.factor_dtype) / power for t in leaves]
    scales.append(power)
    tangents.append(linear([t.astype(p.dtype) for t, p in zip(leaves, flat_params)]))
  size = len(vectors)
  matrix = jnp.zeros((size, size), est.factor_dtype)
  for index, (loss, pred, mask) in enumerate(zip(program.losses, preds, masks)):
    dist = losses.DISTRIBUTIONS[loss.distribution]
    scale = loss.weight / loss.num_examples
    products = [dist.fisher_product(pred, t[index]) for t in tangents]
    weight = term_weights.term_weights(loss, mask)
    if weight is not None:
      products = [h * term_weights.over_outputs(weight, pred.ndim).astype(h.dtype) for h in products]
    rows = [[sharding.vdot(t[index].astype(est.factor_dtype), h.astype(est.factor_dtype))
             for h in products] for t in tangents]
    matrix = matrix + scale * jnp.array(rows, est.factor_dtype)
  scales = jnp.stack(scales)
  matrix = matrix * scales[:, None] * scales[None, :]
  return 0.5 * (matrix + matrix.T)


def loss_at(est: Estimator, program: tracing.Program, flat_params: list[Array],
            flat_args: list[Array], params: Any) -> Array:
  """The loss of this batch at other parameters (one forward pass).

  Args:
    est: the estimator.
    program: the traced program of this batch's shapes.
    flat_params: the parameters the statistics were computed at, flat.
    flat_args: the batch's leaves.
    params: the other parameters; those masked out (`optax.MaskedNode`: a
      transform that owns only some of them) keep the values of `flat_params`.

  Returns:
    The loss (without the aux of a `has_aux` loss function).
  """
  _, given = est.align(params, "the loss at new parameters", partial=True)
  new_params = [p if g is None else g for g, p in zip(given, flat_params)]
  result = interpret.run(program.plan, new_params + list(flat_args), {})
  out = jax.tree.unflatten(program.out_tree, result.outputs)
  return out[0] if est.has_aux else out
