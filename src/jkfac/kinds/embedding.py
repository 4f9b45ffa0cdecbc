# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Embedding layers: a row lookup `table[ids]` of a 2-D parameter leaf (a `gather`).

`jnp.take`, indexing and flax `Embed` look rows up with a `gather` of
indices `(..., 1)`; `eqx.nn.Embedding` vmapped over the batch gathers with
indices `(..., 2)`, the second always 0. The layer's input is the ids, its
output the rows; it has no bias and no options.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from jkfac.kinds import views
from jkfac.layers import Use

NAME = "embedding"


class Options(NamedTuple):
  """An embedding layer carries no options (`jkfac.blocks.embedding` reads none)."""


def match(walker: views.WalkState, eqn: Any, ins: list[Any], frame: views.Frame) -> bool:
  """A row lookup `table[ids]` (`jnp.take`, indexing, flax `Embed`).

  Also the lookup of one id per example vmapped over the batch
  (`eqx.nn.Embedding`): indices `(..., 2)` start each slice at row `id`
  and feature 0, the slice a whole row, clamped, so the second index is
  always 0.

  Args:
    walker: the walk.
    eqn: the `gather` equation.
    ins: the views its operands hold.
    frame: the jaxpr's walk; its plan gets the layer's use.

  Returns:
    True: the walker does nothing more with the equation.
  """
  view, ids, out = ins[0], eqn.invars[1], eqn.outvars[0]
  numbers = eqn.params["dimension_numbers"]
  batching = tuple(getattr(numbers, "operand_batching_dims", ()))
  if not (isinstance(view, views.LeafView) and view.perm == (0, 1) and ins[1] is None
          and view.leaf not in walker.claimed and not batching
          and tuple(eqn.params["slice_sizes"]) == (1, walker.slice_shape(view)[1])):
    walker.record_consumers("gather", ins, [None])
    return True
  rank = out.aval.ndim
  column = None
  if (tuple(numbers.collapsed_slice_dims) == (0,) and tuple(numbers.start_index_map) == (0,)
      and tuple(numbers.offset_dims) == (rank - 1,)):
    x_shape = tuple(ids.aval.shape)
  elif (tuple(numbers.collapsed_slice_dims) == () and tuple(numbers.start_index_map) == (0, 1)
        and tuple(numbers.offset_dims) == (rank - 2, rank - 1) and ids.aval.shape[-1] == 2
        and eqn.params["mode"] in (jax.lax.GatherScatterMode.CLIP,
                                   jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)):
    x_shape, column = tuple(ids.aval.shape[:-1]), 0
  else:
    walker.record_consumers("gather", ins, [None])
    return True
  use = Use(walker.new_id(), x_axes=(len(x_shape) - 1,), out_axes=(rank - 1,),
            x_shape=x_shape, out_shape=tuple(out.aval.shape))
  plan = frame.plan
  plan.perturb[out] = use.id
  plan.capture[use.id] = (ids,)
  if column is not None:
    plan.capture_column[use.id] = column
  walker.matches.append(views.Match(NAME, (view.leaf,), use, (), "found",
                                    sliced_by=view.sliced_by))
  return True
