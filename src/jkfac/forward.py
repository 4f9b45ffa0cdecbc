# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The estimator's one forward pass, with zero perturbations on every layer output.

`forward` evaluates a traced program (`interpret.run`) with a zero array
added to each layer use's output and keeps the VJP of that single pass.
Its two pullbacks are the loss gradient (cotangent 1 on the loss: the
parameters' gradient) and the curvature pass (cotangents on the registered
losses' predictions: the perturbations' gradient is every layer's output
derivative `g`, and nothing else is needed, so under `jit` no parameter
gradient is computed for it).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jkfac import interpret
from jkfac.layers import Program

Array = jax.Array


class Pass(NamedTuple):
  """What one forward pass gives.

  Attributes:
    loss: the loss's value.
    aux: the loss function's auxiliary output (None without `has_aux`).
    grads: the parameters' gradient (flat), or None when not asked for.
    inputs: use id -> the captured layer inputs.
    predictions: per registered loss, its prediction.
    targets: per registered loss, its targets and mask.
    backward: cotangents on the predictions, `(K, *prediction)` per loss ->
      use id -> the layer outputs' derivatives, `(K, *out)`.
  """
  loss: Array
  aux: Any
  grads: Optional[list[Array]]
  inputs: dict[int, Array]
  predictions: list[Array]
  targets: list[Any]
  backward: Callable[[list[Array]], dict[int, Array]]


def forward(program: Program, flat_params: list[Array], flat_args: list[Array],
            has_aux: bool, dtype: Any, with_grads: bool) -> Pass:
  """One forward pass of `program`, its captures and its pullbacks.

  Args:
    program: the traced loss function.
    flat_params: the parameters' leaves.
    flat_args: the other arguments' leaves.
    has_aux: whether the loss function returns `(loss, aux)`.
    dtype: the perturbations' (and so the output derivatives') dtype.
    with_grads: whether to compute the parameters' gradient too.

  Returns:
    The `Pass`.
  """
  perturbations = {u.id: jnp.zeros(u.out_shape, dtype) for uses in program.uses for u in uses}

  def run(p, perts):
    result = interpret.run(program.plan, list(p) + list(flat_args), perts)
    out = jax.tree.unflatten(program.out_tree, result.outputs)
    loss, aux = out if has_aux else (out, None)
    preds = [result.predictions[l.id][0] for l in program.losses]
    targets = [result.predictions[l.id][1:] for l in program.losses]  # with masks
    return (loss, preds), (aux, result.inputs, targets)

  if with_grads:
    (loss, preds), vjp_fn, (aux, inputs, targets) = jax.vjp(
        run, flat_params, perturbations, has_aux=True)
    zero_preds = [jnp.zeros_like(p) for p in preds]
    grads = vjp_fn((jnp.ones_like(loss), zero_preds))[0]
    pullback = lambda cots: vjp_fn((jnp.zeros_like(loss), cots))[1]
  else:
    (loss, preds), vjp_fn, (aux, inputs, targets) = jax.vjp(
        lambda perts: run(flat_params, perts), perturbations, has_aux=True)
    grads = None
    pullback = lambda cots: vjp_fn((jnp.zeros_like(loss), cots))[0]

  def backward(cotangents: list[Array]) -> dict[int, Array]:
    if cotangents[0].shape[0] == 1:
      return jax.tree.map(lambda g: g[None], pullback([c[0] for c in cotangents]))
    return jax.vmap(pullback)(cotangents)

  return Pass(loss, aux, grads, inputs, preds, targets, backward)
