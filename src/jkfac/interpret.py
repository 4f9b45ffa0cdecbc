# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Evaluates a traced loss with perturbed layer outputs and captured inputs.

`tracing` turns the user's jaxpr into a `Plan`: which variables are layer
outputs (they get a zero-valued perturbation added, whose gradient is the
per-example output derivative `g`), which are layer inputs (captured as `a`),
and which are the predictions and targets of registered losses. `run`
evaluates the plan with public JAX only: each equation is re-bound with
`primitive.bind`, and `jit`, `remat` and custom-derivative calls that contain
layers are evaluated inline (a `remat` stays a `jax.checkpoint`, so the
memory saving is kept), and a `scan` whose body holds layers stays a
`jax.lax.scan`: its layers' perturbations are scanned over with the inputs and
their captured inputs stacked with the outputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from jax.extend.core import Jaxpr, Literal, Var

Array = jax.Array

INLINE = "inline"
CHECKPOINT = "checkpoint"
SCAN = "scan"


@dataclasses.dataclass
class Plan:
  """What to do while evaluating one jaxpr.

  Attributes:
    jaxpr: the (open) jaxpr.
    consts: values of its constant variables.
    perturb: layer-output variable -> use id; the use's perturbation is added.
    capture: use id -> the variables whose (broadcast) product is that use's
      layer input, returned after evaluation: one variable for a dense or
      convolution layer, the multiplicands of a scale (`x̂` of a
      normalisation, never materialised by the model), none for a shift.
    concatenate: the use ids whose captured variables are concatenated
      along their last (feature) axis instead: the inputs `[x, h]` of a
      dense layer summing several products before one bias (an RNN cell).
    capture_column: use id -> the column of its captured variable's last
      axis that holds the input: the row ids of a lookup whose indices
      also give the (always 0) start along the table's features (an
      `eqx.nn.Embedding` vmapped over the batch).
    stack_layout: for a use of a stack of layers mapped by `jax.vmap` (an
      ensemble), use id -> (the stack's axes in its captured input, None
      for an input shared by the stack, which is broadcast; the stack's
      axes in its perturbed output; the stack's sizes). The perturbation
      arrives, and the input is returned, with the stack's axes leading
      (`tracing.Use`), wherever the model's arrays hold them.
    losses: (loss id, prediction, target and mask variables; None for no mask).
    nested: equation index -> (how to evaluate, plan of its inner jaxpr), for
      higher-order equations that contain layers or losses.
    scan_axis: for the plan of a `scan` body, use id -> the axis of that
      use's perturbation and captured input (as `run`'s caller sees them)
      that the scan iterates over (`tracing.Use`: 0 for a stacked layer,
      after the batch axis for weights shared over the iterations).
  """
  jaxpr: Jaxpr
  consts: list[Any]
  perturb: dict[Var, int] = dataclasses.field(default_factory=dict)
  capture: dict[int, tuple[Var, ...]] = dataclasses.field(default_factory=dict)
  concatenate: set[int] = dataclasses.field(default_factory=set)
  capture_column: dict[int, int] = dataclasses.field(default_factory=dict)
  stack_layout: dict[int, tuple[Optional[tuple[int, ...]], tuple[int, ...], tuple[int, ...]]] = (
      dataclasses.field(default_factory=dict))
  losses: list[tuple[int, Var, Var, Optional[Var]]] = dataclasses.field(default_factory=list)
  nested: dict[int, tuple[str, "Plan"]] = dataclasses.field(default_factory=dict)
  scan_axis: dict[int, int] = dataclasses.field(default_factory=dict)

  @property
  def active(self) -> bool:
    """Whether the plan perturbs, captures or has a loss (nested plans included).

    An inactive plan's jaxpr is evaluated as it is, not inline.
    """
    return bool(self.perturb or self.capture or self.losses or self.nested)


@dataclasses.dataclass
class Result:
  """What `run` returns: outputs, captured layer inputs, loss predictions.

  Attributes:
    outputs: the jaxpr's output values, one per output variable.
    inputs: use id -> the captured layer input of that use (None for a
      shift alone, which has none).
    predictions: loss id -> the loss's (prediction, target, mask), the mask
      None when the loss has none.
  """
  outputs: list[Array]
  inputs: dict[int, Array]
  predictions: dict[int, tuple[Array, Array, Optional[Array]]]


def run(plan: Plan, args: list[Any], perturbations: Mapping[int, Array]) -> Result:
  """Evaluates `plan.jaxpr` on `args`.

  Args:
    plan: the plan, from `tracing`.
    args: flat input values, one per jaxpr input variable.
    perturbations: use id -> array added to that use's output; a use with no
      entry is not perturbed.

  Returns:
    The outputs, the captured inputs of every layer use in the plan (nested
    plans included) and the (prediction, target) pair of every loss.
  """
  env: dict[Var, Any] = {}

  def read(v):
    return v.val if isinstance(v, Literal) else env[v]

  for v, val in zip(plan.jaxpr.constvars, plan.consts):
    env[v] = val
  for v, val in zip(plan.jaxpr.invars, args):
    env[v] = val
  inputs: dict[int, Array] = {}
  predictions: dict[int, tuple[Array, Array]] = {}
  for index, eqn in enumerate(plan.jaxpr.eqns):
    invals = [read(v) for v in eqn.invars]
    if index in plan.nested:
      how, inner = plan.nested[index]
      inner_result = _run_nested(how, eqn, inner, invals, perturbations)
      outvals = inner_result.outputs
      inputs.update(inner_result.inputs)
      predictions.update(inner_result.predictions)
    else:
      subfuns, params = _bind_params(eqn)
      with eqn.ctx.manager:
        outvals = eqn.primitive.bind(*subfuns, *invals, **params)
      if not eqn.primitive.multiple_results:
        outvals = [outvals]
    for v, val in zip(eqn.outvars, outvals):
      use = plan.perturb.get(v)
      if use is not None and use in perturbations:
        perturbation = perturbations[use]
        if use in plan.stack_layout:
          _, axes, _ = plan.stack_layout[use]
          perturbation = jnp.moveaxis(perturbation, tuple(range(len(axes))), axes)
        val = val + perturbation.astype(val.dtype)
      env[v] = val
  for use, factors in plan.capture.items():
    values = [read(v) for v in factors]
    x = jnp.concatenate(values, axis=-1) if use in plan.concatenate else _product(values)
    if use in plan.capture_column:
      x = x[..., plan.capture_column[use]]
    if use in plan.stack_layout:
      axes, _, sizes = plan.stack_layout[use]
      x = (jnp.broadcast_to(x, sizes + x.shape) if axes is None
           else jnp.moveaxis(x, axes, tuple(range(len(axes)))))
    inputs[use] = x
  predictions.update({k: (read(p), read(t), None if m is None else read(m))
                      for k, p, t, m in plan.losses})
  return Result([read(v) for v in plan.jaxpr.outvars], inputs, predictions)


def _product(values: list[Array]) -> Any:
  """The broadcast product of `values`; None for none."""
  if not values:
    return None
  result = values[0]
  for value in values[1:]:
    result = result * value
  return result


def _run_nested(how: str, eqn, inner: Plan, invals: list[Any],
                perturbations: Mapping[int, Array]) -> Result:
  if how == INLINE:
    return run(inner, invals, perturbations)
  if how == CHECKPOINT:
    def body(args, perts):
      result = run(inner, args, perts)
      return result.outputs, result.inputs, result.predictions
    checkpointed = jax.checkpoint(body, prevent_cse=eqn.params.get("prevent_cse", True),
                                  policy=eqn.params.get("policy"))
    own = {u: p for u, p in perturbations.items() if u in used_ids(inner)}
    return Result(*checkpointed(invals, own))
  if how == SCAN:
    return _run_scan(eqn, inner, invals, perturbations)
  raise ValueError(f"Unknown nested evaluation {how!r}.")


def _run_scan(eqn, inner: Plan, invals: list[Any],
              perturbations: Mapping[int, Array]) -> Result:
  """A `scan` whose body holds layers: perturbations in, captured inputs out, per iteration."""
  params = eqn.params
  consts, num_carry = invals[:params["num_consts"]], params["num_carry"]
  init, xs = invals[len(consts):len(consts) + num_carry], invals[len(consts) + num_carry:]
  own = {u: jnp.moveaxis(p, inner.scan_axis[u], 0) for u, p in perturbations.items()
         if u in inner.scan_axis}

  def body(carry, sliced):
    x, perts = sliced
    result = run(inner, list(consts) + list(carry) + list(x), perts)
    return result.outputs[:num_carry], (result.outputs[num_carry:], result.inputs)

  carry, (ys, inputs) = jax.lax.scan(body, list(init), (list(xs), own),
                                     length=params["length"], reverse=params["reverse"],
                                     unroll=params["unroll"])
  inputs = {u: None if x is None else jnp.moveaxis(x, 0, inner.scan_axis[u])
            for u, x in inputs.items()}
  return Result(list(carry) + list(ys), inputs, {})


def _bind_params(eqn) -> tuple[list[Any], dict[str, Any]]:
  """`primitive.get_bind_params`, which returns (subfuns, params) up to JAX
  0.9 and params alone after."""
  bound = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(bound, tuple):
    return list(bound[0]), bound[1]
  return [], bound


def used_ids(plan: Plan) -> set[int]:
  """Every use id perturbed in a plan or its nested plans.

  Args:
    plan: the plan.

  Returns:
    The ids.
  """
  ids = set(plan.perturb.values())
  for _, inner in plan.nested.values():
    ids |= used_ids(inner)
  return ids
