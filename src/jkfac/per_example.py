# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Per-example gradient moments, for the blocks that need them (diagonal, full,
scale-and-shift): each example differentiated on its own."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from jkfac import blocks, interpret, tracing
from jkfac import batch_axes as batching

if TYPE_CHECKING:  # the estimator imports this module
  from jkfac.estimator import Estimator

Array = jax.Array


def gradient_moments(est: Estimator, program: tracing.Program, flat_params: list[Array],
                     flat_args: list[Array], args_tree: Any,
                     cotangents: list[Array]) -> dict[str, Array]:
  """Per layer whose block needs them, sums of per-example gradient moments.

  Each example is differentiated on its own (a program traced for one
  example, vmapped over the batch), with the curvature pass's cotangents,
  with respect to those layers' parameters only.

  Args:
    est: the estimator (its layers, batch axes and factor dtype).
    program: the traced program of the batch the statistics are taken on.
    flat_params: the parameters' leaves.
    flat_args: that batch's leaves.
    args_tree: their structure.
    cotangents: the curvature pass's cotangents per loss, `(K, *prediction)`.

  Returns:
    Layer name -> the sum over examples of its block's `gradient_moment`.
  """
  layers = [l for l in est.layers if blocks.for_layer(l).needs == "per_example_gradients"]
  if not layers:
    return {}
  indices = [p.index for layer in layers for p in layer.params]
  n = batching.batch_size(program, f"the {layers[0].kind} block of {layers[0].name!r}")
  axes = batching.leaf_axes(est.batch_axes, flat_args, args_tree, n)
  if all(axis is None for axis in axes):
    names = ", ".join(repr(l.name) for l in layers)
    raise ValueError(
        f"The per-example gradients of the {layers[0].kind} block(s) of {names} need the "
        f"examples on the leading axis of the losses' predictions and of the batch "
        f"arguments, but the predictions' leading axis has size {n} and no argument of "
        "the loss function has that leading size (a vmapped ensemble whose outputs are "
        "(members, batch, ...), say). Put the batch axis first in the predictions "
        "(jax.vmap(..., out_axes=1) for an ensemble), or give these parameters another "
        f"block: jkfac.estimator(..., overrides={{{layers[0].name!r}: 'none'}}).")
  unit_args = [a if axis is None else  # shapes only: no slice of a sharded batch
               jax.ShapeDtypeStruct(jnp.shape(a)[:axis] + (1,) + jnp.shape(a)[axis + 1:],
                                    jnp.result_type(a))
               for a, axis in zip(flat_args, axes)]
  unit = est.programs.sliced(flat_params, unit_args, args_tree,
                             f"The {layers[0].kind} block of {layers[0].name!r}")

  def one_example(example_args, example_cots):
    def predictions(chosen):
      full = list(flat_params)
      for i, value in zip(indices, chosen):
        full[i] = value
      result = interpret.run(unit.plan, full + list(example_args), {})
      return [result.predictions[l.id][0] for l in unit.losses]

    _, vjp_fn = jax.vjp(predictions, [flat_params[i] for i in indices])
    per_pass = dict(zip(indices, jax.vmap(lambda c: vjp_fn(c)[0])(example_cots)))
    return [blocks.for_layer(l).gradient_moment([per_pass[p.index] for p in l.params],
                                               est.factor_dtype) for l in layers]

  split_args = [a if axis is None else jnp.expand_dims(a, axis + 1)
                for a, axis in zip(flat_args, axes)]
  split_cots = [jnp.moveaxis(c, 1, 0)[:, :, None] for c in cotangents]
  per_example = jax.vmap(one_example, in_axes=(axes, 0))(split_args, split_cots)
  return {l.name: jnp.sum(m, axis=0) for l, m in zip(layers, per_example)}
