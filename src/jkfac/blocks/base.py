# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The interface every curvature block implements."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp

from jkfac import linalg, sharding
from jkfac.damping import Damping

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Captures:
  """What the estimator hands a block for one batch.

  Attributes:
    uses: the layer's uses (`tracing.Use`), one per place it is applied.
    inputs: per use, the layer input `x`.
    output_grads: per use, the output derivatives, shape `(K, *out_shape)`:
      K backward passes (sampled targets, or the columns of the loss's Fisher
      square root in mode "exact"), already scaled so that the output-side
      factor is `sum_k sum_rows g g^T`.
    gradient_moment: for blocks that need per-example gradients, the sum
      over examples of `block.gradient_moment` of each example's gradients
      (already scaled the same way), else None.
    dtype: the factor dtype.
    weights: None, or the weights of the loss's terms when it is masked
      (mean 1, shaped as the terms: `(batch,)` or `(batch, positions)`):
      input-side statistics weigh each row by its term's weight
      (`row_weights`), so that masked examples and tokens contribute
      nothing; the output derivatives already carry them.
  """
  uses: Sequence[Any]
  inputs: Sequence[Array] = ()
  output_grads: Sequence[Array] = ()
  gradient_moment: Optional[Array] = None
  dtype: Any = jnp.float32
  weights: Optional[Array] = None


def row_weights(weights: Optional[Array], rows_shape: Sequence[int], dtype: Any
                ) -> Optional[Array]:
  """The weights of a layer's rows (examples, positions), from the terms' weights.

  Args:
    weights: `Captures.weights` (None: unweighted).
    rows_shape: the shape of the layer's rows, examples first (`(batch,)`,
      `(batch, positions)`, a convolution's `(batch, height, width)`).
    dtype: the factor dtype.

  Returns:
    None without weights; the weights broadcast over `rows_shape` when the
    rows' leading axes are the terms' (a token mask on a layer over the
    tokens) or their flattening (`(batch * positions, ...)` rows); else
    each example's mean weight broadcast over its rows when the rows start
    with the examples; else None (rows that are not the loss's examples,
    whose statistics stay unweighted).
  """
  if weights is None:
    return None
  rows_shape = tuple(rows_shape)
  terms = weights.shape
  if rows_shape and rows_shape[0] == weights.size and len(terms) > 1:
    weights = weights.reshape(-1)  # the terms flattened into rows, (batch * positions, ...)
  elif rows_shape[:len(terms)] != terms:
    if not rows_shape or rows_shape[0] != terms[0]:
      return None
    weights = jnp.mean(weights.reshape(terms[0], -1), axis=1)
  weights = weights.reshape(weights.shape + (1,) * (len(rows_shape) - weights.ndim))
  return jnp.broadcast_to(weights, rows_shape).astype(dtype)


def with_bias_moments(second_moment: Array, mean: Array) -> Array:
  """`[[M, m], [m^T, 1]]`: the second moment of `[a; 1]` from those of `a`.

  Args:
    second_moment: `M = mean(a a^T)`, shape `(..., d, d)`.
    mean: `m = mean(a)`, shape `(..., d)`.

  Returns:
    Shape `(..., d + 1, d + 1)`.
  """
  # Under Explicit axes, a mean over the rows of a tensor-parallel layer's input is
  # sharded over its features: the factor is kept whole.
  second_moment, mean = sharding.gathered(second_moment), sharding.gathered(mean)
  column = mean[..., :, None]
  corner = jnp.ones(mean.shape[:-1] + (1, 1), mean.dtype)
  return jnp.concatenate([jnp.concatenate([second_moment, column], axis=-1),
                          jnp.concatenate([jnp.swapaxes(column, -1, -2), corner], axis=-1)],
                         axis=-2)


class Block(Protocol):
  """A curvature block: the Fisher approximation of one layer's parameters.

  Blocks are stateless objects, one instance per registry entry
  (`jkfac.blocks.REGISTRY`); what changes lives in the optimizer state, as
  two dicts per layer: the moving averages of its statistics (`factors`) and
  what its preconditioning needs (`inverses`). The life cycle of a layer's
  block, over training:

  1. `statistics`, in the estimator: this batch's factors from what it
     captured (inputs and output derivatives, or per-example gradients).
  2. `init`, once: which of those statistics the state keeps as moving
     averages (all of them by default), hence the state's shapes.
  3. Every update, the transform averages the kept statistics,
     `X ← ε X + (1 - ε) X_batch`; a block with `accumulates` also updates
     its own state from the batch (`accumulate`: EK-FAC's eigenvalues,
     measured in the eigenbasis of the last refresh).
  4. Every `inverse_every` updates, `refresh`: the inverses (or whatever
     `precondition` needs) from the averages, damped by a `Damping` value
     (not for inverse-free blocks, without `refreshes`).
  5. Every update, `precondition`: the gradients times the inverse.
  6. `describe` for the layer table; `diagnostics` for figures of its own.

  A block that needs per-example gradients also has `gradient_moment(grads,
  dtype)`, the moment of one example's gradients (per parameter, shape
  `(K, *shape)` for K curvature passes), which the estimator sums over
  examples into `Captures.gradient_moment`.

  Attributes:
    roles: the names of the parameters it owns, in order (`("kernel", "bias")`);
      the first is required, the others optional.
    needs: what the estimator captures for it: `"activations"` (layer inputs
      and output derivatives), `"per_example_gradients"` or `"nothing"`.
    kinds: the layer kinds it can be chosen for with `overrides=` (None:
      any layer; empty: only the kinds whose default block it is).
    kronecker: whether it is a Kronecker-factored block (`overrides=
      {...: "kronecker"}` keeps such a default block).
    accumulates: whether `accumulate` updates its state at every update.
    refreshes: whether the transform calls `refresh` (an inverse-free block
      keeps what `accumulate` makes, and `refresh` only gives its state's
      shapes).
    summable: whether a batch's statistics average over batches
      (`jkfac.MultiSteps` averages micro-batches' statistics).
  """
  roles: tuple[str, ...]
  needs: str
  kinds: Optional[tuple[str, ...]] = ()
  kronecker: bool = False
  accumulates: bool = False
  refreshes: bool = True
  summable: bool = True

  def assign(self, layer: Any, name: str, note: str) -> tuple[Any, ...]:
    """The layers this block preconditions when `overrides=` chooses it for `layer`.

    Called only for layers it may be chosen for (`kinds`).

    Args:
      layer: the layer found (`tracing.Layer`).
      name: the block's name in `jkfac.blocks.REGISTRY` (the choice).
      note: how the layer table explains the choice.

    Returns:
      The layers replacing it: by default the same layer, its `block`
      set to `name`; layers with no uses (`needs` not `"activations"`) when
      the block works from per-example gradients or from nothing.
    """
    return (dataclasses.replace(layer, block=name, note=note),)

  def choose(self, layer: Any, choice: str, note: str) -> Optional[Any]:
    """The layer, when its default block makes `choice` itself.

    A scale-and-shift layer's block computes a diagonal or full Fisher
    from its captures, cheaper than the per-example gradients the
    `"diagonal"` and `"full"` blocks need.

    Args:
      layer: a layer whose default block this is.
      choice: the `overrides=` choice (a name in `jkfac.blocks.REGISTRY`).
      note: how the layer table explains the choice.

    Returns:
      The layer with options that make this block compute `choice`, or
      None (the default) when the chosen block takes the layer.
    """
    del layer, choice, note
    return None

  def statistics(self, layer: Any, captures: Captures) -> dict[str, Array]:
    """This batch's statistics of a layer.

    Args:
      layer: the layer (`tracing.Layer`): its parameters and options.
      captures: what the estimator captured for it, as the block `needs`:
        inputs and output derivatives per use, or the summed per-example
        gradient moment.

    Returns:
      The statistics, name -> array in `captures.dtype` (`{"A": ..., "G": ...}`
      for a Kronecker block), with the same structure, shapes and dtypes for
      every batch.
    """
    ...

  def init(self, layer: Any, statistics: dict[str, Any]) -> dict[str, Any]:
    """The statistics the state keeps as moving averages (its `factors`).

    Args:
      layer: the layer (`tracing.Layer`).
      statistics: the shapes and dtypes of a batch's statistics
        (`jax.ShapeDtypeStruct`s, structured as `statistics` returns them).

    Returns:
      The entries of `statistics` to average over batches: all of them
      unless the block overrides this.
    """
    del layer
    return statistics

  def accumulate(self, layer: Any, inverses: dict[str, Array], batch: dict[str, Array],
                 decay: float, damping: Damping, device_mean: Callable[[Array], Array]
                 ) -> dict[str, Array]:
    """Updates the block's own state from a batch (blocks with `accumulates`).

    Called at every update with finite statistics, before a refresh (whose
    result replaces what this returns) and the preconditioning.

    Args:
      layer: the layer (`tracing.Layer`).
      inverses: what `refresh` returned (zeros before the first), as updated
        by the previous calls.
      batch: this batch's statistics, as `statistics` returned them.
      decay: the transform's moving-average decay.
      damping: the damping now (λ of this update).
      device_mean: the mean over the devices of an array computed from
        this device's batch (under `pmap`; the identity otherwise).

    Returns:
      The new `inverses`: unchanged unless the block overrides this.
    """
    del layer, batch, decay, damping, device_mean
    return inverses

  def refresh(self, layer: Any, factors: dict[str, Array], damping: Damping,
              method: str = "cholesky") -> dict[str, Array]:
    """What `precondition` needs, from the averaged factors: the damped inverses.

    Args:
      layer: the layer (`tracing.Layer`).
      factors: the factors averaged over batches, as `init` keeps them.
      damping: λ (`jkfac.damping.Damping`): the block approximates the
        inverse of `F + λ I`, applying it plainly or factored between its
        Kronecker factors.
      method: how to invert a damped symmetric factor, `"cholesky"` or
        `"eigh"` (`linalg.damped_inverse`); unused by blocks with no matrix
        to factorise.

    Returns:
      The inverses, name -> array (`{"A_inv": ..., "G_inv": ..., "pi": ...}`
      for a Kronecker block). The transform keeps its previous inverses when
      these are not finite.
    """
    ...

  def precondition(self, layer: Any, inverse: dict[str, Array],
                   grads: Sequence[Array]) -> tuple[Array, ...]:
    """The preconditioned gradients of a layer's parameters.

    Args:
      layer: the layer (`tracing.Layer`).
      inverse: what `refresh` (and `accumulate`) returned.
      grads: the gradients of the layer's parameters, in `layer.params` order.

    Returns:
      The inverse of the damped block applied to `grads`, one array per
      parameter, in the same order, shaped and typed as `grads`.
    """
    ...

  def describe(self, layer: Any) -> str:
    """The block's factors and their shapes, for the layer table (`Estimator.table`).

    Args:
      layer: the layer (`tracing.Layer`).

    Returns:
      A short description, such as `"A 785x785, G 10x10"`.
    """
    ...

  def diagnostics(self, layer: Any, inverse: dict[str, Array]) -> dict[str, Array]:
    """Figures of the block's own for `jkfac.diagnostics`.

    `jkfac.diagnostics` reports every block's damping, π, and its factors'
    traces and condition numbers; a block adds what only it knows.

    Args:
      layer: the layer (`tracing.Layer`).
      inverse: its inverses (whole, as `refresh` and `accumulate` made them).

    Returns:
      Name -> scalar array; none unless the block overrides this.
    """
    del layer, inverse
    return {}


def per_parameter(layer: Any, kind: str, note: str) -> tuple[Any, ...]:
  """One layer per parameter of `layer`, of `kind`, with no uses.

  Args:
    layer: the layer (`tracing.Layer`).
    kind: the new layers' kind and block (`"diagonal"`, `"none"`).
    note: how the layer table explains them.

  Returns:
    A layer per parameter, named by its path, the parameter in role
    `"param"` (stacked parameters whole: a diagonal block per entry).
  """
  return tuple(type(layer)(p.path, kind, (dataclasses.replace(p, role="param"),), (), note)
               for p in layer.params)


def kronecker_inverses(a: Array, g: Array, damping: Damping, method: str = "cholesky"
                       ) -> dict[str, Array]:
  """Damped inverses of two Kronecker factors (factored Tikhonov, section 6.3).

  `(A + π√λ I)^{-1}` and `(G + √λ/π I)^{-1}`, so that their Kronecker product
  approximates `(A ⊗ G + λ I)^{-1}`.

  Args:
    a: the input-side factor `A`.
    g: the output-side factor `G`.
    damping: λ.
    method: how to invert (`linalg.damped_inverse`).

  Returns:
    `{"A_inv": ..., "G_inv": ..., "pi": π}`.
  """
  shift_a, shift_g, pi = damping.kronecker(a, g)
  return {"A_inv": linalg.damped_inverse(a, shift_a, method),
          "G_inv": linalg.damped_inverse(g, shift_g, method), "pi": pi}


def flatten(grads: Sequence[Array], dtype: Any) -> Array:
  """The parameters' gradients as one vector (in `layer.params` order).

  Args:
    grads: one array per parameter.
    dtype: the vector's dtype.

  Returns:
    Shape `(sum of sizes,)`.
  """
  return jnp.concatenate([g.astype(dtype).reshape(-1) for g in grads])


def unflatten(flat: Array, like: Sequence[Array]) -> tuple[Array, ...]:
  """Splits `flat` into arrays shaped and typed as `like` (inverse of `flatten`).

  Args:
    flat: a vector, as long as the sizes of `like` together.
    like: the arrays whose shapes and dtypes to give the pieces, in order.

  Returns:
    One array per entry of `like`, cast to its dtype.
  """
  out, start = [], 0
  for g in like:
    out.append(flat[start:start + g.size].reshape(g.shape).astype(g.dtype))
    start += g.size
  return tuple(out)
