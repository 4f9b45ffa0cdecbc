# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""How a pytree a user passes lines up with the estimator's parameters.

The estimator is built with one parameter pytree, but the same parameters
reach it and its transforms in other wrappings, which all line up leaf by
leaf with the set-up's:

- flax nnx states, with each array in an `nnx.Variable` (`nnx.state(model)`,
  `nnx.grad`, what `nnx.Optimizer.init` passes) or pure (what
  `nnx.Optimizer.update` passes): a Variable is read as the array it holds;
- optax's partitions (`optax.multi_transform`, `optax.partition`,
  `optax.masked`) hand an inner transform the parameters with the ones it
  does not own replaced by `optax.MaskedNode()` (a leaf or a whole subtree).

A `View` records, for one given pytree, which of the estimator's leaves each
of its leaves is (`None` for a masked one), so that results computed per
estimator leaf go back into the given structure, Variables and masked nodes
included.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple, Optional, Sequence

import jax
import numpy as np
import optax

Array = jax.Array


class View(NamedTuple):
  """A pytree seen as the estimator's parameters.

  Attributes:
    treedef: the given pytree's structure, with masked nodes as leaves.
    indices: for each of its leaves, the estimator leaf it is, or None for
      an `optax.MaskedNode`.
    present: for each estimator leaf, whether the given pytree holds it.
  """
  treedef: Any
  indices: tuple[Optional[int], ...]
  present: tuple[bool, ...]

  def rebuild(self, values: Sequence[Any]) -> Any:
    """The given structure with the estimator leaves' new values.

    Args:
      values: one entry per estimator leaf (masked ones are not read).

    Returns:
      A pytree of the given structure: `values[i]` at estimator leaf `i`, an
      `optax.MaskedNode()` where the given pytree had one.
    """
    return jax.tree.unflatten(self.treedef, [
        optax.MaskedNode() if i is None else values[i] for i in self.indices])


def is_masked(x: Any) -> bool:
  """Whether `x` is optax's placeholder for a parameter a transform does not own.

  Args:
    x: a pytree node or leaf.

  Returns:
    Whether it is an `optax.MaskedNode`.
  """
  return isinstance(x, optax.MaskedNode)


def _is_variable(x: Any) -> bool:
  nnx = sys.modules.get("flax.nnx")  # without flax imported there is no Variable
  return nnx is not None and isinstance(x, nnx.Variable)


def unwrap(tree: Any) -> Any:
  """`tree` with every flax nnx Variable replaced by the array it holds.

  Args:
    tree: a pytree, possibly an nnx state.

  Returns:
    The same pytree without Variable nodes (unchanged if it has none).
  """
  return jax.tree.map(lambda x: jax.tree.leaves(x)[0] if _is_variable(x) else x, tree,
                      is_leaf=_is_variable)


def view(tree: Any, canonical: Any, where: str) -> tuple[View, list[Optional[Any]]]:
  """Lines `tree` up with the estimator's parameters.

  Args:
    tree: the pytree given (parameters, gradients, updates), possibly with
      nnx Variables and optax masked nodes.
    canonical: the structure of the estimator's parameters, Variables
      unwrapped (`jax.tree.structure(unwrap(params))`).
    where: the caller, for the error message.

  Returns:
    The `View`, and the leaves per estimator leaf (None where masked).

  Raises:
    ValueError: the pytree is not the estimator's parameters.
  """
  treedef = jax.tree.structure(tree, is_leaf=is_masked)
  reference = jax.tree.unflatten(canonical, range(canonical.num_leaves))
  pairs: list[tuple[Any, Any]] = []
  try:
    jax.tree.map(lambda given, ref: pairs.append((given, ref)), unwrap(tree), reference,
                 is_leaf=is_masked)
  except ValueError as e:
    raise ValueError(
        f"{where}: the pytree does not match the parameters the estimator was built "
        f"with.\n  expected: {canonical}\n  got:      {jax.tree.structure(unwrap(tree))}\n"
        "Pass the same parameter structure as to jkfac.estimator (nnx Variables and "
        "optax.MaskedNode in place of parameters are fine), or build a new estimator "
        "for the new model.") from e
  leaves: list[Optional[Any]] = [None] * canonical.num_leaves
  indices = []
  for given, ref in pairs:
    if is_masked(given):
      indices.append(None)
      continue
    if not isinstance(ref, int):
      raise ValueError(
          f"{where}: a leaf of the pytree stands where the estimator's parameters have "
          f"the subtree {jax.tree.map(lambda _: '*', ref)}. Pass the same parameter "
          "structure as to jkfac.estimator.")
    indices.append(ref)
    leaves[ref] = given
  present = tuple(leaf is not None for leaf in leaves)
  return View(treedef, tuple(indices), present), leaves


def check_leaves(tree: Any, where: str) -> None:
  """Refuses parameter leaves that are not arrays, naming `eqx.partition`.

  Args:
    tree: the parameters given to `jkfac.estimator`.
    where: the caller, for the error message.

  Raises:
    TypeError: a leaf is a function, a module or another Python object.
  """
  for path, leaf in jax.tree.flatten_with_path(unwrap(tree))[0]:
    if not (isinstance(leaf, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct,
                              int, float, complex)) or hasattr(leaf, "aval")):
      raise TypeError(
          f"{where}: parameter {jax.tree_util.keystr(path)!r} is "
          f"{type(leaf).__module__}.{type(leaf).__qualname__}, not an array: every leaf "
          "of the parameters must be an array. An equinox model holds functions and "
          "other static fields: split it with `params, static = eqx.partition(model, "
          "eqx.is_array)` (or eqx.is_inexact_array), pass `params` to jkfac, and rebuild "
          "the model in the loss with `eqx.combine(params, static)`.")


def all_concrete_arrays(tree: Any) -> bool:
  """Whether every leaf is a concrete array: no tracer, no Python value to keep static.

  Args:
    tree: a pytree (arguments about to be passed to a compiled function).

  Returns:
    True when `tree` can go to `jax.jit`'s compiled function as it is (a call
    outside `jit`, with arrays).
  """
  return all(isinstance(x, (jax.Array, np.ndarray)) and not isinstance(x, jax.core.Tracer)
             for x in jax.tree.leaves(tree))
