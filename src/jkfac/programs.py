# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The estimator's traced programs, one per argument signature, and slices of the batch.

The loss function is traced once per signature (`signature`: the shapes and
dtypes of the parameters and arguments, and the mesh in context) and checked
against the set-up's layer table (`tracing.trace`'s `reference`). The
statistics and the quadratic model's products may run on the first part of
the batch (`stats_fraction`, `curvature_fraction`): `subset` slices it along
the batch axes and `sliced` traces the program of the slice.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from jkfac import sharding, tracing
from jkfac import batch_axes as batching
from jkfac.layers import Layer, Program

Array = jax.Array


def signature(flat_params: Sequence[Any], flat_args: Sequence[Any], args_tree: Any) -> Any:
  """What a traced program depends on: the shapes, dtypes and the mesh in context.

  A model under `jax.set_mesh` may trace differently (FSDP's gathers, a
  tensor-parallel product's `out_sharding`), so an estimator built outside
  the mesh traces the loss again inside it.

  Args:
    flat_params: the parameters' leaves (arrays or shapes).
    flat_args: the other arguments' leaves.
    args_tree: their structure.

  Returns:
    A hashable key.
  """
  avals = tuple((tuple(jnp.shape(x)), str(jnp.result_type(x)))
                for x in list(flat_params) + list(flat_args))
  return avals, args_tree, sharding.context_mesh()


def check_nonempty(program: Program) -> None:
  """Refuses a program whose losses average over no example.

  Args:
    program: the traced program.

  Raises:
    ValueError: a loss's batch is empty.
  """
  for loss in program.losses:
    if loss.num_examples == 0:
      raise ValueError(f"The {loss.distribution} loss has prediction shape "
                       f"{loss.prediction_shape}: the batch is empty. Pass at least one "
                       "example.")


class Programs:
  """The traced programs of one loss function, cached by signature.

  Args:
    loss_fn: the loss function.
    params_tree: the parameters' tree structure.
    has_aux: whether it returns `(loss, aux)`.
    overrides: the per-layer block choices (`jkfac.overrides`).
    weight_sharing: `"expand"` or `"reduce"`.
    batch_axes: the checked batch axes (`batch_axes.check`), or None.
  """

  def __init__(self, loss_fn: Callable[..., Any], params_tree: Any, has_aux: bool,
               overrides: dict[str, str], weight_sharing: str, batch_axes: Any):
    self.loss_fn = loss_fn
    self.params_tree = params_tree
    self.has_aux = has_aux
    self.overrides = overrides
    self.weight_sharing = weight_sharing
    self.batch_axes = batch_axes
    self.layers: Optional[tuple[Layer, ...]] = None  # the set-up's, once traced
    self._cache: dict[Any, Program] = {}

  def get(self, flat_params: Sequence[Any], flat_args: Sequence[Any], args_tree: Any
          ) -> Program:
    """The traced program for these arguments' signature (traced on first use).

    Args:
      flat_params: the parameters' leaves (arrays or shapes).
      flat_args: the other arguments' leaves (arrays or shapes).
      args_tree: their structure.

    Returns:
      The program; the first one traced sets the layer table the others
      must reproduce.
    """
    key = signature(flat_params, flat_args, args_tree)
    if key not in self._cache:
      shape = lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
      params = jax.tree.unflatten(self.params_tree, [shape(x) for x in flat_params])
      args = jax.tree.unflatten(args_tree, [shape(x) for x in flat_args])
      program = tracing.trace(self.loss_fn, params, args, self.has_aux,
                              reference=self.layers, overrides=self.overrides,
                              weight_sharing=self.weight_sharing)
      check_nonempty(program)
      self._cache[key] = program
      if self.layers is None:
        self.layers = program.layers
    return self._cache[key]

  def subset(self, program: Program, flat_args: list[Array], args_tree: Any,
             fraction: float, option: str) -> list[Array]:
    """The first `fraction` of the batch, sliced along the batch axes.

    Args:
      program: the whole batch's program.
      flat_args: the batch's leaves.
      args_tree: their structure.
      fraction: the fraction kept, in (0, 1].
      option: what slices the batch, for error messages.

    Returns:
      The sliced leaves.
    """
    n = batching.batch_size(program, option)
    axes = batching.leaf_axes(self.batch_axes, flat_args, args_tree, n)
    return batching.sliced(flat_args, axes, max(1, int(round(n * fraction))))

  def sliced(self, flat_params: list[Array], flat_args: list[Any], args_tree: Any,
             option: str) -> Program:
    """The traced program of a slice of the batch.

    Args:
      flat_params: the parameters' leaves.
      flat_args: the sliced batch's leaves (arrays or shapes).
      args_tree: their structure.
      option: what slices the batch, for the error message.

    Returns:
      The program (traced on first use, then cached by shapes).

    Raises:
      ValueError: the user's loss function failed on the sliced arguments;
        the message names `batch_argnums` and `batch_axes`.
    """
    try:
      return self.get(flat_params, flat_args, args_tree)
    except Exception as e:  # an error from inside the user's model, on the sliced arguments
      if self.batch_axes is not None or _raised_by_jkfac(e):
        raise
      raise ValueError(
          f"{option} evaluates the loss on part of the batch, slicing every argument "
          "whose leading axis has the batch's size; the loss function failed on "
          f"the sliced arguments ({type(e).__name__}: {e}). An argument that merely has "
          "that size (a BatchNorm's batch_stats with as many features as examples, "
          "say) must not be sliced: say which arguments are batched, "
          "jkfac.estimator(..., batch_argnums=(1, 2)) (indices into the arguments after "
          "params) or batch_axes=(None, 0, 0) (vmap-style axes).") from e


def _raised_by_jkfac(error: BaseException) -> bool:
  """Whether `error` was raised by jkfac's own code (its checks name their fix)."""
  frame = error.__traceback__
  while frame is not None and frame.tb_next is not None:
    frame = frame.tb_next
  if frame is None:
    return False
  here = os.path.dirname(__file__)
  return os.path.dirname(frame.tb_frame.f_code.co_filename) in (
      here, os.path.join(here, "blocks"), os.path.join(here, "kinds"))
