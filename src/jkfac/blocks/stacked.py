# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Stacked layers: any block, once per slice of a stack of identical layers.

A parameter stacked along leading axes and sliced by `lax.scan` (scan over
layers: flax `nn.scan`, `nnx.scan`, haiku `hk.layer_stack`) or mapped by
`jax.vmap` (an ensemble) is a stack of layers, `Layer.stack` its leading
sizes. Each slice gets its own block of the layer's kind: factors with the
stack's leading axes (one `A`, `G` per layer of a dense stack), inverted by one
factorisation kernel per factor for the whole stack (not one kernel per layer)
and preconditioned batched. On accelerators the factorisations run batched
(`jax.vmap` of the block's `inverse`); on CPU, where each LAPACK call is one
matrix anyway, they run one slice after another in a loop (`jax.lax.map`):
XLA:CPU in jaxlib 0.10 deadlocks on a program holding a dozen or more batched
LAPACK calls on a 2-core machine, which a scanned transformer's inverses are.
The captured inputs and output derivatives of a stacked use carry the stack's
axes first (`tracing.Use.stack`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Sequence

import jax
from typing_extensions import override

from jkfac.blocks.base import Block, Captures
from jkfac.damping import Damping

if TYPE_CHECKING:  # jkfac.layers imports the blocks, through losses and tags
  from jkfac.layers import Layer

Array = jax.Array


def unstacked(layer: Any) -> Any:
  """One slice of a stacked layer: its parameters without the stack's axes.

  Args:
    layer: a `tracing.Layer` with a non-empty `stack`.

  Returns:
    The layer with each parameter's shape stripped of the leading stack
    axes and an empty `stack`.
  """
  depth = len(layer.stack)
  params = tuple(dataclasses.replace(p, shape=p.shape[depth:]) for p in layer.params)
  return dataclasses.replace(layer, params=params, stack=())


def unstacked_use(use: Any) -> Any:
  """One slice of a stacked use: its shapes and axes without the stack's.

  Args:
    use: a `tracing.Use` with `stack` leading stack axes.

  Returns:
    The use as one slice's block sees it (`stack` 0).
  """
  depth = use.stack
  return dataclasses.replace(use, x_axes=tuple(a - depth for a in use.x_axes),
                             out_axes=tuple(a - depth for a in use.out_axes),
                             x_shape=use.x_shape[depth:], out_shape=use.out_shape[depth:],
                             stack=0)


def _merge(x: Any, axis: int, depth: int) -> Any:
  """Merges the `depth` stack axes starting at `axis` into one."""
  if x is None:
    return None
  return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + depth:])


def _split(tree: Any, stack: tuple[int, ...], axis: int = 0) -> Any:
  """Splits a merged stack axis at `axis` back into the stack's axes."""
  return jax.tree.map(lambda x: x.reshape(x.shape[:axis] + stack + x.shape[axis + 1:]), tree)


class Stacked(Block):
  """The block of a stack of layers: `block` vmapped over the stack's axes.

  Args:
    block: the block of one slice.
    stack: the stack's sizes (`Layer.stack`).
  """

  def __init__(self, block: Block, stack: tuple[int, ...]):
    self.block = block
    self.stack = tuple(stack)
    self.roles = block.roles
    self.needs = block.needs
    self.accumulates = block.accumulates
    self.refreshes = block.refreshes
    self.summable = block.summable

  @override
  def init(self, layer: Layer, statistics: dict[str, Any]) -> dict[str, Any]:
    depth = len(layer.stack)
    inner = {key: jax.ShapeDtypeStruct(s.shape[depth:], s.dtype) for key, s in statistics.items()}
    kept = self.block.init(unstacked(layer), inner)
    return {key: statistics[key] for key in kept}

  def _per_slice(self, layer: Layer, function: Any, *trees: Any) -> Any:
    """`function(one slice's layer, *slices)` over the stack, batched; stack axes leading."""
    inner, depth = unstacked(layer), len(layer.stack)
    merged = jax.tree.map(lambda x: _merge(x, 0, depth), trees)
    return _split(jax.vmap(lambda *slices: function(inner, *slices))(*merged), layer.stack)

  @override
  def accumulate(self, layer: Layer, inverses: dict[str, Array], batch: dict[str, Array],
                 decay: float, damping: Damping, device_mean: Any) -> dict[str, Array]:
    return self._per_slice(layer, lambda inner, inv, b: self.block.accumulate(
        inner, inv, b, decay, damping, device_mean), inverses, batch)

  @override
  def diagnostics(self, layer: Layer, inverse: dict[str, Array]) -> dict[str, Array]:
    figures = self._per_slice(layer, self.block.diagnostics, inverse)
    return jax.tree.map(lambda x: jax.numpy.max(x.reshape(-1)), figures)

  def statistics(self, layer: Layer, captures: Captures) -> dict[str, Array]:
    """Every slice's factors, stacked: leading axes `layer.stack`.

    Args:
      layer: the stacked layer (`tracing.Layer`).
      captures: its captures, the stack's axes leading in each input (after
        the curvature passes' axis in each output derivative).

    Returns:
      The block's factors with the stack's axes leading.
    """
    inner, depth = unstacked(layer), len(layer.stack)
    uses = [unstacked_use(u) for u in captures.uses]

    def one(inputs, output_grads, moment):
      return self.block.statistics(inner, dataclasses.replace(
          captures, uses=uses, inputs=inputs, output_grads=output_grads,
          gradient_moment=moment))

    inputs = [_merge(x, 0, depth) for x in captures.inputs]
    output_grads = [_merge(g, 1, depth) for g in captures.output_grads]
    moment = _merge(captures.gradient_moment, 0, depth)
    out = jax.vmap(one, in_axes=(0, 1, 0))(inputs, output_grads, moment)
    return _split(out, layer.stack)

  def gradient_moment(self, grads: Sequence[Array], dtype: Any) -> Array:
    """Each slice's moment of one example's gradients, the stack's axes leading.

    Args:
      grads: per parameter, shape `(K, *stack, *slice shape)`.
      dtype: the factor dtype.

    Returns:
      The block's moment of each slice, the stack's axes leading.
    """
    merged = [_merge(g, 1, len(self.stack)) for g in grads]
    out = jax.vmap(lambda gs: self.block.gradient_moment(gs, dtype), in_axes=1)(merged)
    return _split(out, self.stack)

  def refresh(self, layer: Layer, factors: dict[str, Array], damping: Damping,
              method: str = "cholesky") -> dict[str, Array]:
    """Every slice's inverses, by one factorisation kernel per factor.

    Args:
      layer: the stacked layer.
      factors: its factors, the stack's axes leading.
      damping: λ, shared by the slices.
      method: `"cholesky"` or `"eigh"`.

    Returns:
      The block's inverses with the stack's axes leading.
    """
    inner, depth = unstacked(layer), len(layer.stack)
    if not jax.tree.leaves(factors):  # a block that keeps no factors: its start, per slice
      start = self.block.refresh(inner, factors, damping, method)
      return jax.tree.map(lambda x: jax.numpy.broadcast_to(x, layer.stack + x.shape), start)
    merged = jax.tree.map(lambda x: _merge(x, 0, depth), factors)
    batch_size = 1 if jax.default_backend() == "cpu" else math.prod(layer.stack)
    out = jax.lax.map(lambda f: self.block.refresh(inner, f, damping, method), merged,
                      batch_size=batch_size)
    return _split(out, layer.stack)

  def precondition(self, layer: Layer, inverse: dict[str, Array],
                   grads: Sequence[Array]) -> tuple[Array, ...]:
    """Every slice's gradients preconditioned by its own inverses, batched.

    Args:
      layer: the stacked layer.
      inverse: its inverses, the stack's axes leading.
      grads: the gradients of its (stacked) parameters.

    Returns:
      The preconditioned gradients, shaped and typed as `grads`.
    """
    out = self._per_slice(layer, lambda inner, inv, g: tuple(
        self.block.precondition(inner, inv, g)), inverse, list(grads))
    return tuple(g.reshape(like.shape) for g, like in zip(out, grads))

  @override
  def describe(self, layer: Layer) -> str:
    count = math.prod(layer.stack)
    return f"{count} x ({self.block.describe(unstacked(layer))})"
