# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The K-FAC preconditioner as an optax transform: `scale_by_kfac`.

It keeps exponential moving averages of each layer's factors, recomputes
their damped inverses every `inverse_every` updates inside the compiled step
(`lax.cond` on the step count: one compilation, no Python branching), and
preconditions each layer's gradient. `jkfac.transform.kfac` chains it with
momentum and the learning rate, like optax's aliases.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from jkfac import (blocks, distributed, linalg, options, sharding, state_layout, trees,
                   tridiagonal)
from jkfac.adaptive import value_at
from jkfac.damping import Damping
from jkfac.estimator import Estimator
from jkfac.options import ScalarOrSchedule
from jkfac.statistics import Statistics, check_stats

Array = jax.Array
STRUCTURES = ("block_diagonal", "block_tridiagonal")


class ScaleByKFACState(NamedTuple):
  """State of `scale_by_kfac`.

  Attributes:
    count: updates made so far (int32).
    factors: layer name -> moving averages of its factors.
    inverses: layer name -> what its block needs to precondition (damped
      inverses, π), from the last refresh.
    damping: the damping λ in use at the last refresh.
    skipped: updates whose statistics were not finite and were left out of
      the moving averages (int32).
    nonfinite_grads: updates whose gradient was not finite (int32); the
      preconditioned update is then not finite either (`kfac` replaces it by
      a zero step; `optax.apply_if_finite` skips it).
    failed_refreshes: inverse refreshes whose result was not finite (a
      factorisation that failed or overflowed) and that kept the previous
      inverses instead (int32).
    last_refresh: the update count at the last successful refresh (int32;
      the inverses in use were computed from the factors of that update).
    burned_in: batches whose statistics `jkfac.burn_in` averaged into the
      factors before the first update (int32); their mean then counts as
      one update in the moving averages.
  """
  count: Array
  factors: dict[str, dict[str, Array]]
  inverses: dict[str, dict[str, Array]]
  damping: Array
  skipped: Array
  nonfinite_grads: Array
  failed_refreshes: Array
  last_refresh: Array
  burned_in: Array


def _check_options(damping, decay, inverse_every, inverse_warmup, inverse_method) -> None:
  if inverse_method not in linalg.METHODS:
    raise ValueError(f"inverse_method must be one of {linalg.METHODS}, got {inverse_method!r}: "
                     "'cholesky' (the default, fastest) or 'eigh' (eigendecompositions).")
  lam = options.initial_value(damping)
  if lam is not None and not lam > 0.0:
    got = f"a schedule whose value at update 0 is {lam}" if callable(damping) else damping
    raise ValueError(f"damping must be positive, got {got}. It is the λ of (F + λI); try "
                     "1e-3 and adjust (jkfac.kfac can adapt it), and keep a schedule's "
                     "values positive.")
  options.check_numbers([
      (decay, lambda v: 0.0 <= v < 1.0, "decay must be in [0, 1), got {}. It is the "
       "moving averages' ε: try 0.95 (the default); 0 uses each batch alone, 1 would "
       "never update the factors."),
      (inverse_every, lambda v: v >= 1 and v == int(v),
       "inverse_every must be a positive integer, got {}: the inverses are recomputed "
       "every this many updates; try 20 (the default), or 1 for every update."),
      (inverse_warmup, lambda v: v >= 0 and v == int(v),
       "inverse_warmup must be a non-negative integer, got {}: the number of first "
       "updates that all recompute the inverses; try 3 (the default) or 0."),
  ])


def scale_by_kfac(est: Estimator, *, damping: ScalarOrSchedule, decay: float = 0.95,
                  inverse_every: int = 20, inverse_warmup: int = 3,
                  inverse_method: str = "cholesky", structure: str = "block_diagonal",
                  axis_name: Optional[str] = None, spread_inverses: bool = True,
                  mesh: Optional[jax.sharding.Mesh] = None, shard_state: bool = False
                  ) -> optax.GradientTransformationExtraArgs:
  """Preconditions gradients with the Kronecker-factored Fisher inverse.

  Martens & Grosse (2015): section 4.2 (block-diagonal inverse), section 5
  (moving averages), section 6.3 (factored Tikhonov damping with π). No
  learning rate, momentum or clipping: chain those (or use `kfac`).

  `update(grads, state, params, *, stats)` takes the `stats` returned by the
  estimator with the same batch; an optional `damping_now=` overrides the
  damping (`kfac` passes its Levenberg-Marquardt λ this way) and
  `refresh_now=True` forces an inverse refresh.

  Args:
    est: the estimator (`jkfac.estimator`) whose statistics this consumes.
    damping: λ, a positive float or an optax schedule of the update count.
      Each Kronecker block is damped as `(A + π√λ I) ⊗ (G + √λ/π I)`, each
      diagonal block as `diag + λ`. The value at a refresh is used until the
      next one.
    decay: moving-average decay: `X ← ε X + (1 - ε) X_batch` with
      `ε = min(1 - 1/k, decay)` at the k-th update, so the first uses the
      batch alone (`ε = min(1 - 1/(k + 1), decay)` after `jkfac.burn_in`,
      whose statistics count as one update).
    inverse_every: recompute the damped inverses every this many updates.
    inverse_warmup: also recompute them at each of the first this many
      updates, while the averages still change fast (the paper does this).
    inverse_method: `"cholesky"` (the default, fastest) or `"eigh"` (a
      symmetric eigendecomposition); see `jkfac.linalg.damped_inverse`.
    structure: `"block_diagonal"` (section 4.2) or `"block_tridiagonal"`
      (section 4.3, `jkfac.tridiagonal`): chains of consecutive dense layers
      applied to `(batch, features)` get the tridiagonal inverse, the other
      layers stay block-diagonal (`print(est)` lists both). It makes the
      estimator also compute the chains' cross moments: build the transform
      before tracing the training step.
    axis_name: under `pmap` (or `shard_map`), the mapped axis. Each device
      keeps moving averages of its own statistics; since they are linear,
      they are averaged across devices only when the inverses are refreshed
      (the state's `factors` are each device's own). The gradients are
      yours to average, as with any optax transform.
    spread_inverses: with `axis_name` or `mesh`, each device computes the
      inverses of a share of the layers balanced by cubic cost, and the
      results are gathered (`jkfac.distributed.spread`), instead of every
      device computing all of them.
    mesh: under `jit` with the batch sharded over a `jax.sharding.Mesh` (no
      `axis_name` needed: the statistics are already those of the whole
      batch), the mesh whose devices share the inverse work, through a
      `shard_map` over all its axes at each refresh.
    shard_state: with `mesh`, split the state's factors and inverses over
      all the mesh's devices (each holds 1/D of them, padded to an even
      split: `jkfac.state_layout`; ZeRO's optimizer-state sharding) instead
      of every device holding them whole. Each update then gathers the
      inverses to precondition, and each refresh the factors; the updates
      are the same. For models whose factors crowd the devices' memory.

  Returns:
    An `optax.GradientTransformationExtraArgs`.
  """
  options.check_estimator(est, "scale_by_kfac")
  _check_options(damping, decay, inverse_every, inverse_warmup, inverse_method)
  if structure not in STRUCTURES:
    raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}.")
  if shard_state and (mesh is None or axis_name is not None):
    raise ValueError("shard_state=True splits the state over the devices of `mesh` under "
                     "sharded jit: pass mesh=jax.make_mesh(...) (the mesh the step runs "
                     "on), without axis_name (under pmap/shard_map the state is already "
                     "per device).")
  stored_on = mesh if shard_state else None
  tridiagonal_chains = structure == "block_tridiagonal"
  chains = est.request_cross_moments() if tridiagonal_chains else ()
  in_chain = {i for chain in chains for i in chain}
  layers = [layer for i, layer in enumerate(est.layers) if i not in in_chain]
  block_of = {layer.name: blocks.for_layer(layer) for layer in layers}
  # Every block as a block over a group of layers: a layer's own, or a chain's.
  groups = ([((layer,), blocks.OneLayer(block_of[layer.name])) for layer in layers]
            + [(tuple(est.layers[i] for i in chain), tridiagonal.CHAIN) for chain in chains])

  def owned(present: tuple[bool, ...], where: str) -> set[str]:
    """The names of the layers whose parameters a (partitioned) pytree holds."""
    names = set()
    for group, _ in groups:
      held = [present[p.index] for layer in group for p in layer.params]
      if all(held):
        names.update(layer.name for layer in group)
      elif any(held):
        what = (f"layer {group[0].name!r}" if len(group) == 1 else
                "the block-tridiagonal chain " + ", ".join(repr(l.name) for l in group))
        raise ValueError(
            f"{where}: {what} has parameters both inside and outside this transform's "
            "partition (optax.multi_transform, partition or masked): K-FAC "
            "preconditions a layer's parameters together. Label all of a layer's "
            "parameters alike" + ("." if len(group) == 1 else
                                  ", or use structure='block_diagonal'."))
    return names

  def init_fn(params: Any) -> ScaleByKFACState:
    where = "scale_by_kfac.init(params)"
    params_view, leaves = est.align(params, where, partial=True)
    names = owned(params_view.present, where)
    traced = any(isinstance(x, jax.core.Tracer) for x in leaves)
    factor_shapes, inverse_shapes = logical_shapes(names)
    damping0 = value_at(damping, jnp.zeros([], jnp.int32)).astype(est.factor_dtype)
    zero = jnp.zeros([], jnp.int32)
    return ScaleByKFACState(zero, _zeros(factor_shapes, traced, stored_on),
                            _zeros(inverse_shapes, traced, stored_on), damping0, zero, zero,
                            zero, zero, zero)

  @functools.lru_cache(maxsize=None)
  def partition_shapes(names: frozenset[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    factor_shapes = {name: shapes for name, shapes in
                     kept_shapes(est, tridiagonal_chains).items() if name in names}
    lam = jax.ShapeDtypeStruct((), est.factor_dtype)
    return factor_shapes, jax.eval_shape(_inverses, factor_shapes, lam)

  def logical_shapes(names: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The factors' and inverses' shapes of the layers `names`, unpadded."""
    return partition_shapes(frozenset(names))

  def _inverses(factors, lam, spread_over=None, refreshed_only=False):
    # Work items: a layer, a chain, or, spread over D devices, a stack's layers
    # in up to D contiguous pieces (so that one deep stack is shared out too).
    # Inverse-free blocks have none at a refresh (`refreshed_only`).
    devices = 1 if spread_over is None else distributed.axis_size(spread_over)
    items = []  # (owners, piece of the stack or None, function)
    for group, block in groups:
      if group[0].name not in factors or (refreshed_only and not block.refreshes):
        continue
      for piece in _stack_pieces(group[0].stack if len(group) == 1 else (), devices):
        items.append((group, piece, lambda group=group, block=block, piece=piece: (
            block.refresh(group, [factors[l.name] for l in group], Damping(lam),
                          inverse_method) if piece is None
            else [_piece_inverse(group[0], factors[group[0].name], lam, piece)])))
    functions = [f for _, _, f in items]
    if spread_over is not None:
      costs = [distributed.cubic_cost([_piece_of(factors[l.name], piece) for l in owners])
               for owners, piece, _ in items]
      results = distributed.spread(functions, costs, spread_over)
    else:
      results = [f() for f in functions]
    pieces: dict[str, list[Any]] = {}
    for (owners, _, _), result in zip(items, results):
      for l, inv in zip(owners, result):
        pieces.setdefault(l.name, []).append(inv)
    return {name: parts[0] if len(parts) == 1 else
            jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)
            for name, parts in pieces.items()}

  def _piece_inverse(layer, layer_factors, lam, piece):
    """The inverses of the stack's layers `piece` = (start, stop)."""
    part = dataclasses.replace(layer, stack=(piece[1] - piece[0],) + layer.stack[1:])
    return blocks.for_layer(part).refresh(part, _piece_of(layer_factors, piece), Damping(lam),
                                          inverse_method)

  def accumulate(stored, inverse_shapes, batch, finite, lam):
    """The inverses after the blocks that accumulate have seen a finite batch."""
    names = [name for name in stored if name in block_of and block_of[name].accumulates]
    if not names:
      return stored
    whole = state_layout.load({name: stored[name] for name in names},
                              {name: inverse_shapes[name] for name in names})
    device_mean = ((lambda x: jax.lax.pmean(x, axis_name)) if axis_name is not None
                   else (lambda x: x))
    layer_of = {layer.name: layer for layer in layers}
    new = {name: block_of[name].accumulate(layer_of[name], whole[name], batch[name], decay,
                                           Damping(lam), device_mean) for name in names}
    # A block's state moves only on finite statistics, and only to finite values.
    new = {name: jax.tree.map(
        lambda n, o, ok=finite & linalg.all_finite(new[name]): jnp.where(ok, n, o),
        new[name], whole[name]) for name in names}
    return {**stored, **state_layout.store(new, stored_on)}

  def update_fn(updates: Any, state: ScaleByKFACState, params: Any = None, *,
                stats: Optional[Statistics] = None, damping_now: Optional[Array] = None,
                refresh_now: Any = False, **unused_extra_args):
    where = "scale_by_kfac.update(grads, ...)"
    options.check_state(state, ScaleByKFACState, "scale_by_kfac.update")
    batch = check_stats(stats, est, state.factors)
    grads_view, flat_grads = est.align(updates, where, partial=True)
    if owned(grads_view.present, where) != set(state.factors):
      raise ValueError(
          f"{where}: the gradient holds other parameters than those given to "
          "scale_by_kfac.init (optax.MaskedNode in other places). Pass the same "
          "partition of the parameters to init and update.")
    count = optax.safe_int32_increment(state.count)
    updates_averaged = count + (state.burned_in > 0).astype(count.dtype)  # burn-in: one
    epsilon = jnp.minimum(1.0 - 1.0 / updates_averaged.astype(est.factor_dtype), decay)
    finite = linalg.all_finite(batch)
    if axis_name is not None:  # every device skips the same batches
      finite = jax.lax.pmin(finite.astype(jnp.int32), axis_name) > 0
    factor_shapes, inverse_shapes = (logical_shapes(state.factors) if stored_on is not None
                                     else (state.factors, state.inverses))
    averaged = {name: {key: batch[name][key] for key in kept} for name, kept in factor_shapes.items()}
    factors = state_layout.keep(jax.tree.map(
        lambda old, new: jnp.where(finite, epsilon * old + (1.0 - epsilon) * new, old),
        state.factors, state_layout.store(averaged, stored_on)), factor_shapes, stored_on)
    lam = value_at(damping if damping_now is None else damping_now,
                   state.count).astype(est.factor_dtype)
    accumulated = accumulate(state.inverses, inverse_shapes, batch, finite, lam)
    refresh = (state.count % inverse_every == 0) | (state.count < inverse_warmup) | refresh_now

    def recompute(_):
      whole = state_layout.load(factors, factor_shapes)
      if axis_name is not None:
        fresh = _inverses(jax.lax.pmean(whole, axis_name), lam,
                          axis_name if spread_inverses else None, True)
      elif mesh is not None and spread_inverses:
        axes = tuple(mesh.axis_names)
        fresh = jax.shard_map(lambda f, l: _inverses(f, l, axes, True), mesh=mesh,
                              in_specs=(P(), P()), out_specs=P(),
                              check_vma=False)(whole, lam)
      else:
        fresh = _inverses(whole, lam, refreshed_only=True)
      ok = linalg.all_finite(fresh)
      fresh = {**accumulated, **state_layout.store(fresh, stored_on)}
      return jax.lax.cond(ok, lambda: (fresh, lam, count, state.failed_refreshes),
                          lambda: (accumulated, state.damping, state.last_refresh,
                                   state.failed_refreshes + 1))

    inverses, used_damping, last_refresh, failed_refreshes = jax.lax.cond(
        refresh, recompute, lambda _: (accumulated, state.damping, state.last_refresh,
                                       state.failed_refreshes), None)
    inverses = state_layout.keep(inverses, inverse_shapes, stored_on)
    whole_inverses = state_layout.load(inverses, inverse_shapes)
    # Under Explicit axes, sharded gradients (FSDP) are gathered for the
    # layer's products with its replicated inverses; updates sharded as they were.
    new_flat = list(flat_grads)
    gathered = lambda layer: [sharding.gathered(flat_grads[p.index]) for p in layer.params]
    for group, block in groups:
      if group[0].name not in factors:
        continue
      preconditioned = block.precondition(group, [whole_inverses[l.name] for l in group],
                                          [gathered(layer) for layer in group])
      for layer, layer_grads in zip(group, preconditioned):
        for p, g in zip(layer.params, layer_grads):
          new_flat[p.index] = sharding.like(g, flat_grads[p.index])
    new_updates = grads_view.rebuild(new_flat)
    new_state = ScaleByKFACState(
        count, factors, inverses, used_damping, state.skipped + (~finite).astype(jnp.int32),
        state.nonfinite_grads + (~linalg.all_finite(flat_grads)).astype(jnp.int32),
        failed_refreshes, last_refresh, state.burned_in)
    return new_updates, new_state

  return compiled_when_eager(optax.GradientTransformationExtraArgs(init_fn, update_fn))


def compiled_when_eager(tx: optax.GradientTransformationExtraArgs
                        ) -> optax.GradientTransformationExtraArgs:
  """`tx`, its update run as one compiled program when called outside `jit`.

  Called eagerly (concrete arrays, as in a notebook's loop or nnx's eager
  `optimizer.update`), the update would otherwise dispatch and compile each
  of its hundreds of operations on its own; inside `jit`, or with an extra
  argument that is not an array (a callable), it runs as written.

  Args:
    tx: the transform.

  Returns:
    The same transform, its update compiled when called eagerly.
  """
  compiled = jax.jit(tx.update)

  def update_fn(updates, state, params=None, **extra_args):
    if trees.all_concrete_arrays((updates, state, params, extra_args)):
      return compiled(updates, state, params, **extra_args)
    return tx.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def _stack_pieces(stack: tuple[int, ...], devices: int) -> list[Optional[tuple[int, int]]]:
  """A stack's layers in up to `devices` contiguous pieces; `[None]` for no split."""
  if not stack or devices == 1 or stack[0] == 1:
    return [None]
  count = min(stack[0], devices)
  bounds = [round(i * stack[0] / count) for i in range(count + 1)]
  return list(zip(bounds[:-1], bounds[1:]))


def _piece_of(tree: Any, piece: Optional[tuple[int, int]]) -> Any:
  """The stack's layers `piece` of a stacked layer's factors (all of them for None)."""
  return tree if piece is None else jax.tree.map(lambda x: x[piece[0]:piece[1]], tree)


def _zeros(shapes: Any, traced: bool, mesh: Optional[jax.sharding.Mesh]) -> Any:
  """Zero arrays as the state stores them (split over `mesh` if given); made on
  the host outside `jit` (no kernel compiled per shape)."""
  if traced:
    return state_layout.store(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), mesh)
  return state_layout.zeros(shapes, mesh)


def kept_shapes(est: Estimator, cross_moments: bool = False
                ) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
  """The shapes of the factors a `scale_by_kfac` state keeps, per layer.

  Args:
    est: the estimator.
    cross_moments: whether the state keeps the block-tridiagonal chains'
      cross moments (`structure="block_tridiagonal"`).

  Returns:
    Layer name -> the moving averages its block keeps (`Block.init` of the
    shapes of its statistics, `Estimator.factor_shapes`), and with
    `cross_moments` those of its chain.
  """
  shapes = est.factor_shapes()
  kept = {}
  for layer in est.layers:
    own = {k: s for k, s in shapes[layer.name].items() if not k.endswith("_next")}
    kept[layer.name] = {**blocks.for_layer(layer).init(layer, own),
                        **{k: s for k, s in shapes[layer.name].items()
                           if cross_moments and k.endswith("_next")}}
  return kept
