# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Burn-in: the factors' averages started from more statistics than one update's.

K-FAC's moving averages start from the first update's statistics alone
(`ε = 0` at the first update). With statistics on a fraction of the batch
(`jkfac.estimator(..., stats_fraction=1/8)`) that is a few hundred samples:
the first inverses then follow the noise of a nearly rank-deficient factor.
`burn_in` averages the statistics of batches seen before the first update
into the factors; at the first update their mean counts as one update's
(`ε = 1/2` there, then `min(1 - 1/(k + 1), decay)`), so it weighs as much as
a batch but has the samples of all of them. kfac-jax calls this burn-in
(`num_burnin_steps`, 5 passes over the first batch in its examples):

    state = tx.init(params)
    for i in range(8):  # the first batch's eighths, one estimator pass each
      _, _, stats = est(params, jnp.roll(batch, -i * len(batch) // 8, axis=0), rng=k[i])
      state = jkfac.burn_in(state, stats)

Only the factors move: the inverses are computed from them at the first
update (which refreshes them), and the state of blocks that accumulate more
than factors (EK-FAC's eigenbasis scales, SINGD's factors) starts as usual.
"""

from __future__ import annotations

from typing import Any, TypeVar

import jax
import jax.numpy as jnp

from jkfac import linalg, state_layout
from jkfac.preconditioner import ScaleByKFACState
from jkfac.statistics import Statistics, kept_factors

State = TypeVar("State")


def burn_in(opt_state: State, stats: Statistics) -> State:
  """Averages one batch's statistics into the factors, before the first update.

  Each `scale_by_kfac` state in `opt_state` (that of `jkfac.kfac`, of
  `scale_by_kfac`, or of a chain or wrapper holding one) keeps the running
  mean of the batches given here as its factors' starting value; the first
  update counts that mean as one update in the moving averages (see
  `scale_by_kfac`'s `decay`). Statistics that are not finite are left out.
  Works eagerly and under `jit` or `pmap` (each device averages its own
  statistics, as the updates do).

  Args:
    opt_state: the optimizer state from `tx.init`, before any update. After
      an update the factors are the updates' moving averages and this
      leaves them as they are (raising a `ValueError` when that is known
      outside of tracing).
    stats: one batch's statistics, the third value of `est(params, batch,
      rng=key)`, from the estimator the optimizer was built with or any
      other of the same model (a `stats_fraction=1` one, say).

  Returns:
    `opt_state` with the factors and `burned_in` counts of its
    `scale_by_kfac` states updated.
  """
  if not isinstance(stats, Statistics):
    raise TypeError(f"jkfac.burn_in: stats must be the Statistics returned by the estimator, "
                    f"got {type(stats).__name__}: pass the third value of "
                    "`loss, grads, stats = est(params, batch, rng=key)`.")
  is_state = lambda x: isinstance(x, ScaleByKFACState)
  if not any(is_state(x) for x in jax.tree.leaves(opt_state, is_leaf=is_state)):
    raise ValueError("jkfac.burn_in: opt_state holds no K-FAC state: pass the state returned "
                     "by tx.init of jkfac.kfac or jkfac.scale_by_kfac (or of a chain holding "
                     "one).")
  return jax.tree.map(lambda x: _burn_in_one(x, stats) if is_state(x) else x, opt_state,
                      is_leaf=is_state)


def _burn_in_one(state: ScaleByKFACState, stats: Statistics) -> ScaleByKFACState:
  # The state's arrays may sit in wrappers that are pytree nodes (an
  # `nnx.Optimizer` keeps each in an `OptState` variable): compute on the
  # leaves and rebuild each field with its own structure.
  have = kept_factors(stats, state.factors)
  logical = {name: {key: have[name][key] for key in kept} for name, kept in state.factors.items()}
  stored = jax.tree.leaves(state.factors)
  (count,), (seen,) = jax.tree.leaves(state.count), jax.tree.leaves(state.burned_in)
  if not isinstance(count, jax.core.Tracer) and int(count) > 0:
    raise ValueError(
        f"jkfac.burn_in: the optimizer state has made {int(count)} updates; burn in "
        "before the first (its factors are now the updates' moving averages).")
  batch = [_padded_like(new, old, jax.tree_util.keystr(path))
           for (path, new), old in zip(jax.tree_util.tree_leaves_with_path(logical), stored)]
  take = (count == 0) & linalg.all_finite(batch)
  weight = 1.0 / (seen.astype(jnp.float32) + 1.0)
  factors = [jnp.where(take, old + (new.astype(old.dtype) - old) * weight.astype(old.dtype), old)
             for old, new in zip(stored, batch)]
  rebuilt = lambda field, leaves: jax.tree.unflatten(jax.tree.structure(field), leaves)
  return state._replace(factors=rebuilt(state.factors, factors),
                        burned_in=rebuilt(state.burned_in, [seen + take.astype(seen.dtype)]))


def _padded_like(new: jax.Array, stored: jax.Array, path: str) -> jax.Array:
  """A logical factor in the stored array's shape (padded where the state is split)."""
  split = (state_layout.padded_shape(new.shape, devices)
           for devices in range(2, max(stored.shape, default=1) + 1))
  if new.shape != stored.shape and stored.shape not in split:
    raise ValueError(f"jkfac.burn_in: the factor {path!r} has shape {new.shape} in the "
                     f"statistics but {stored.shape} in the optimizer state: pass statistics "
                     "of the model the optimizer was built for.")
  return state_layout.padded(new, stored.shape)
