# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The K-FAC preconditioner as an optax transform, and the whole optimizer.

`scale_by_kfac` keeps exponential moving averages of each layer's factors,
recomputes their damped inverses every `inverse_every` updates inside the
compiled step (`lax.cond` on the step count: one compilation, no Python
branching), and preconditions each layer's gradient. `kfac` chains it with
momentum and the learning rate, like optax's aliases.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P
from typing_extensions import TypeAliasType

from jkfac import (adaptive, blocks, distributed, linalg, sharding, state_layout, tridiagonal,
                   trust_region)
from jkfac.adaptive import QuadraticModelState, scale_by_quadratic_model, value_at
from jkfac.estimator import Estimator
from jkfac.statistics import Statistics

Array = jax.Array
STRUCTURES = ("block_diagonal", "block_tridiagonal")
ScalarOrSchedule = TypeAliasType("ScalarOrSchedule", Union[float, Array, optax.Schedule])
"""A number, a scalar `jax.Array`, or an optax schedule (a function of the step count)."""


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
  """
  count: Array
  factors: dict[str, dict[str, Array]]
  inverses: dict[str, dict[str, Array]]
  damping: Array
  skipped: Array
  nonfinite_grads: Array
  failed_refreshes: Array
  last_refresh: Array


def _python_number(value: Any) -> Optional[float]:
  """`value` as a float when it is a concrete number (not None, a schedule or a tracer)."""
  if value is None or callable(value) or isinstance(value, jax.core.Tracer):
    return None
  return float(value)


def _check_numbers(checks: list[tuple[Any, Callable[[float], bool], str]]) -> None:
  """Raises `message.format(value)` for the first concrete `value` not `ok`."""
  for value, ok, message in checks:
    number = _python_number(value)
    if number is not None and not ok(number):
      raise ValueError(message.format(value))


def _initial_value(value: Any) -> Optional[float]:
  """A number, or a schedule's value at update 0, as a float (None if traced)."""
  if callable(value):
    value = value(jnp.zeros([], jnp.int32))
  return _python_number(value)


def _check_estimator(est: Any, where: str) -> None:
  if not isinstance(est, Estimator):
    raise TypeError(f"{where}: est must be the estimator made by jkfac.estimator, got "
                    f"{type(est).__name__}. Build it first: est = jkfac.estimator(loss_fn, "
                    f"params, *batch), then jkfac.{where}(est, ...).")


def _check_state(state: Any, expected: type, where: str) -> None:
  if not isinstance(state, expected):
    raise TypeError(f"{where}: the state is a {type(state).__name__}, not this transform's "
                    f"{expected.__name__}. Pass the state this optimizer made: "
                    "opt_state = tx.init(params), then opt_state from its previous update.")


def _check_options(damping, decay, inverse_every, inverse_warmup, inverse_method) -> None:
  if inverse_method not in linalg.METHODS:
    raise ValueError(f"inverse_method must be one of {linalg.METHODS}, got {inverse_method!r}: "
                     "'cholesky' (the default, fastest) or 'eigh' (eigendecompositions).")
  lam = _initial_value(damping)
  if lam is not None and not lam > 0.0:
    got = f"a schedule whose value at update 0 is {lam}" if callable(damping) else damping
    raise ValueError(f"damping must be positive, got {got}. It is the λ of (F + λI); try "
                     "1e-3 and adjust (jkfac.kfac can adapt it), and keep a schedule's "
                     "values positive.")
  _check_numbers([
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
      batch alone.
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
  _check_estimator(est, "scale_by_kfac")
  _check_options(damping, decay, inverse_every, inverse_warmup, inverse_method)
  if structure not in STRUCTURES:
    raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}.")
  if shard_state and (mesh is None or axis_name is not None):
    raise ValueError("shard_state=True splits the state over the devices of `mesh` under "
                     "sharded jit: pass mesh=jax.make_mesh(...) (the mesh the step runs "
                     "on), without axis_name (under pmap/shard_map the state is already "
                     "per device).")
  stored_on = mesh if shard_state else None
  chains = est.request_cross_moments() if structure == "block_tridiagonal" else ()
  chain_layers = [[est.layers[i] for i in chain] for chain in chains]
  in_chain = {layer.name for chain in chain_layers for layer in chain}
  layers = [layer for layer in est.layers if layer.name not in in_chain]
  block_of = {layer.name: blocks.for_layer(layer) for layer in layers}

  def owned(present: tuple[bool, ...], where: str) -> set[str]:
    """The names of the layers whose parameters a (partitioned) pytree holds."""
    names = set()
    for group in [[layer] for layer in layers] + chain_layers:
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
                            zero, zero)

  def logical_shapes(names: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The factors' and inverses' shapes of the layers `names`, unpadded."""
    factor_shapes = {name: shapes for name, shapes in jax.eval_shape(est.zero_factors).items()
                     if name in names}
    lam = jax.ShapeDtypeStruct((), est.factor_dtype)
    return factor_shapes, jax.eval_shape(_inverses, factor_shapes, lam)

  def _inverses(factors, lam, spread_over=None):
    # Work items: a layer, a chain, or, spread over D devices, a stack's layers
    # in up to D contiguous pieces (so that one deep stack is shared out too).
    devices = 1 if spread_over is None else distributed.axis_size(spread_over)
    items = []  # (owners, piece of the stack or None, function)
    for layer in layers:
      if layer.name in factors:
        for piece in _stack_pieces(layer.stack, devices):
          items.append(([layer], piece, lambda layer=layer, piece=piece: [
              _layer_inverse(layer, factors[layer.name], lam, piece)]))
    items += [(chain, None, lambda chain=chain: tridiagonal.inverses(
        [factors[l.name] for l in chain], lam, inverse_method))
              for chain in chain_layers if chain[0].name in factors]
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

  def _layer_inverse(layer, layer_factors, lam, piece):
    """A layer's inverses, or those of the stack's layers `piece` = (start, stop)."""
    if piece is None:
      return block_of[layer.name].inverse(layer, layer_factors, lam, inverse_method)
    part = dataclasses.replace(layer, stack=(piece[1] - piece[0],) + layer.stack[1:])
    return blocks.for_layer(part).inverse(part, _piece_of(layer_factors, piece), lam,
                                          inverse_method)

  def update_fn(updates: Any, state: ScaleByKFACState, params: Any = None, *,
                stats: Optional[Statistics] = None, damping_now: Optional[Array] = None,
                refresh_now: Any = False, **unused_extra_args):
    where = "scale_by_kfac.update(grads, ...)"
    _check_state(state, ScaleByKFACState, "scale_by_kfac.update")
    batch = _check_stats(stats, est, state.factors)
    grads_view, flat_grads = est.align(updates, where, partial=True)
    if owned(grads_view.present, where) != set(state.factors):
      raise ValueError(
          f"{where}: the gradient holds other parameters than those given to "
          "scale_by_kfac.init (optax.MaskedNode in other places). Pass the same "
          "partition of the parameters to init and update.")
    count = optax.safe_int32_increment(state.count)
    epsilon = jnp.minimum(1.0 - 1.0 / count.astype(est.factor_dtype), decay)
    finite = linalg.all_finite(batch)
    if axis_name is not None:  # every device skips the same batches
      finite = jax.lax.pmin(finite.astype(jnp.int32), axis_name) > 0
    factor_shapes, inverse_shapes = (logical_shapes(state.factors) if stored_on is not None
                                     else (state.factors, state.inverses))
    factors = state_layout.keep(jax.tree.map(
        lambda old, new: jnp.where(finite, epsilon * old + (1.0 - epsilon) * new, old),
        state.factors, state_layout.store(batch, stored_on)), factor_shapes, stored_on)
    lam = value_at(damping if damping_now is None else damping_now,
                   state.count).astype(est.factor_dtype)
    refresh = (state.count % inverse_every == 0) | (state.count < inverse_warmup) | refresh_now

    def recompute(_):
      whole = state_layout.load(factors, factor_shapes)
      if axis_name is not None:
        fresh = _inverses(jax.lax.pmean(whole, axis_name), lam,
                          axis_name if spread_inverses else None)
      elif mesh is not None and spread_inverses:
        axes = tuple(mesh.axis_names)
        fresh = jax.shard_map(lambda f, l: _inverses(f, l, axes), mesh=mesh,
                              in_specs=(P(), P()), out_specs=P(),
                              check_vma=False)(whole, lam)
      else:
        fresh = _inverses(whole, lam)
      ok = linalg.all_finite(fresh)
      fresh = state_layout.store(fresh, stored_on)
      return jax.lax.cond(ok, lambda: (fresh, lam, count, state.failed_refreshes),
                          lambda: (state.inverses, state.damping, state.last_refresh,
                                   state.failed_refreshes + 1))

    inverses, used_damping, last_refresh, failed_refreshes = jax.lax.cond(
        refresh, recompute, lambda _: (state.inverses, state.damping, state.last_refresh,
                                       state.failed_refreshes), None)
    inverses = state_layout.keep(inverses, inverse_shapes, stored_on)
    whole_inverses = state_layout.load(inverses, inverse_shapes)
    # Under Explicit axes, sharded gradients (FSDP) are gathered for the
    # layer's products with its replicated inverses; updates sharded as they were.
    new_flat = list(flat_grads)
    gathered = lambda layer: [sharding.gathered(flat_grads[p.index]) for p in layer.params]
    for layer in layers:
      if layer.name not in factors:
        continue
      preconditioned = block_of[layer.name].precondition(layer, whole_inverses[layer.name],
                                                         gathered(layer))
      for p, g in zip(layer.params, preconditioned):
        new_flat[p.index] = sharding.like(g, flat_grads[p.index])
    for chain in chain_layers:
      if chain[0].name not in factors:
        continue
      preconditioned = tridiagonal.precondition_layers(
          chain, [whole_inverses[l.name] for l in chain],
          [gathered(layer) for layer in chain])
      for layer, layer_grads in zip(chain, preconditioned):
        for p, g in zip(layer.params, layer_grads):
          new_flat[p.index] = sharding.like(g, flat_grads[p.index])
    new_updates = grads_view.rebuild(new_flat)
    new_state = ScaleByKFACState(
        count, factors, inverses, used_damping, state.skipped + (~finite).astype(jnp.int32),
        state.nonfinite_grads + (~linalg.all_finite(flat_grads)).astype(jnp.int32),
        failed_refreshes, last_refresh)
    return new_updates, new_state

  return _compiled_when_eager(optax.GradientTransformationExtraArgs(init_fn, update_fn))


def _compiled_when_eager(tx: optax.GradientTransformationExtraArgs
                         ) -> optax.GradientTransformationExtraArgs:
  """`tx`, its update run as one compiled program when called outside `jit`.

  Called eagerly (concrete arrays, as in a notebook's loop or nnx's eager
  `optimizer.update`), the update would otherwise dispatch and compile each
  of its hundreds of operations on its own; inside `jit`, or with an extra
  argument that is not an array (a callable), it runs as written.
  """
  compiled = jax.jit(tx.update)

  def update_fn(updates, state, params=None, **extra_args):
    leaves = jax.tree.leaves((updates, state, params, extra_args))
    if all(isinstance(x, (jax.Array, np.ndarray)) and not isinstance(x, jax.core.Tracer)
           for x in leaves):
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
  if mesh is not None:
    return state_layout.zeros(shapes, mesh)
  return jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype)), shapes)


def _check_stats(stats: Any, est: Estimator, factors: dict[str, Any]) -> dict[str, Any]:
  """Checks `stats`; returns their factors of the layers the state keeps."""
  if stats is None:
    raise ValueError(
        "scale_by_kfac.update needs the curvature statistics of this batch: call "
        "tx.update(grads, opt_state, params, stats=stats) with the stats returned "
        "by `loss, grads, stats = est(params, batch, rng=key)`.")
  if not isinstance(stats, Statistics):
    raise TypeError(f"stats must be the Statistics returned by the estimator, got "
                    f"{type(stats).__name__}: pass the third value of `loss, grads, stats = "
                    "est(params, batch, rng=key)` as tx.update(..., stats=stats).")
  if stats.estimator_id != est.id:
    raise ValueError(
        f"stats come from another estimator (id {stats.estimator_id}) than the one "
        f"this transform was built with (id {est.id}). Build the optimizer with the "
        "estimator you call in the training step: jkfac.kfac(est, ...).")
  batch = {name: stats.factors.get(name) for name in factors}
  if jax.tree.structure(batch) != jax.tree.structure(factors):
    raise ValueError(
        "stats do not have the factors this transform keeps. A transform with "
        "structure='block_tridiagonal' needs cross moments the estimator computes only "
        "once such a transform is built: build the optimizer before tracing (jitting) "
        "the training step, and the optimizer state with tx.init after that.")
  return batch


class KFACState(NamedTuple):
  """State of `kfac` with a learning rate or momentum from the quadratic model.

  Attributes:
    preconditioner: the `scale_by_kfac` state.
    quadratic_model: the `scale_by_quadratic_model` state (α, μ and the
      predicted change of the last update, for logging).
    damping: the λ in use (adapted by the Levenberg-Marquardt rule).
    reduction_ratio: the last ρ (NaN until one is measured).
    gamma: the factored Tikhonov strength γ of the inverses (`γ² = λ + η`
      unless re-chosen every `gamma_interval` steps).
    rejected_steps: steps rejected because the loss rose or was not finite
      at the new parameters (int32; each was replaced by no step).
    damping_streak: the consecutive moves of λ the same way (int32; positive
      up, negative down): a run whose λ keeps rising shows it here.
    measure_until: ρ is measured at every update while the count is below
      this (int32): the first `damping_interval` updates and as many after
      each rejection.
  """
  preconditioner: ScaleByKFACState
  quadratic_model: QuadraticModelState
  damping: Array
  reduction_ratio: Array
  gamma: Array
  rejected_steps: Array
  damping_streak: Array
  measure_until: Array


ADAPTIVE_DAMPING = 1.0
"""`kfac`'s default initial λ with the quadratic model (adapted from there)."""
FIXED_DAMPING = 3e-3
"""`kfac`'s default λ with a fixed learning rate and momentum."""
_DAMPING_DRIFT = 2.0
"""The inverses are refreshed early when their damping is off by this factor."""


def kfac(est: Estimator, learning_rate: Optional[ScalarOrSchedule] = None,
         momentum: Optional[ScalarOrSchedule] = None,
         damping: Optional[ScalarOrSchedule] = None, *,
         adapt_damping: bool = True, damping_interval: int = 5,
         min_damping: float = 1e-8, gamma_interval: Optional[int] = None,
         reject_steps: bool = True, kl_clip: Optional[float] = 1e-2,
         nesterov: bool = False, l2_reg: float = 0.0, decay: float = 0.95,
         inverse_every: int = 20, inverse_warmup: int = 3,
         inverse_method: str = "cholesky", structure: str = "block_diagonal",
         axis_name: Optional[str] = None, spread_inverses: bool = True,
         mesh: Optional[jax.sharding.Mesh] = None, shard_state: bool = False,
         skip_non_finite: bool = True) -> optax.GradientTransformationExtraArgs:
  """K-FAC: the preconditioner, then momentum and the learning rate.

  With both `learning_rate` and `momentum` given, this is
  `optax.chain(scale_by_kfac(...), scale_by_kl_clip(...), optax.trace(momentum),
  scale(-learning_rate))`: K-FAC with a fixed step inside a trust region
  (see `kl_clip`).

  With either left as None (the default), it is chosen at every step by
  minimising the quadratic model of the loss over the K-FAC direction and
  the previous update (Martens & Grosse, section 7; see
  `scale_by_quadratic_model`), and, with `adapt_damping`, λ follows the
  Levenberg-Marquardt rule (section 6.5) from the reduction ratio
  `ρ = (h(θ + δ) - h(θ)) / (M(δ) - M(0))`: λ rises when `ρ < 1/4`, falls when
  `ρ > 3/4`, by `ω = (19/20)^steps` since the last measurement; it moves
  faster when it is far off (`jkfac.adaptive.levenberg_marquardt`): up by
  `ω^-k` at the k-th rise in a row (k ≤ 2) and 10-fold at a rejected step,
  down by up to 10-fold, to where the damping and the Fisher contribute
  equally to the model's curvature along the step, while the damping
  dominates it. ρ is measured at every step of the first `damping_interval`
  steps and after a rejection, then every `damping_interval` steps; each
  measurement costs one forward pass at the new parameters (two with
  `curvature_fraction < 1`: the loss before the step too). With
  `reject_steps`, a measured step whose loss rose or is not finite is not
  taken (no step, momentum kept), λ is multiplied by at least 10 and the
  inverses are recomputed with it: a trust-region method's rejection. The
  inverses are also recomputed early whenever λ has moved by more than a
  factor of 2 since their last refresh. Use it as any optax optimizer,
  passing `stats=` to `update`.

  Args:
    est: the estimator.
    learning_rate: a float or an optax schedule; None: from the quadratic model.
    momentum: heavy-ball momentum (a float, 0 for none, or a schedule); None:
      from the quadratic model.
    damping: λ, the Tikhonov damping of `F + λI`: a float or a schedule;
      with the quadratic model and `adapt_damping`, a float, the initial
      value of the adapted λ. None (the default): 1.0 (`ADAPTIVE_DAMPING`)
      with the quadratic model, 3e-3 (`FIXED_DAMPING`) with a fixed learning
      rate and momentum. Start the adapted λ in [1e-3, 10]; outside it the
      adaptive optimizer still trains: from a λ too small, the first steps
      are rejected and λ rises 10-fold at each; from a λ too large, the
      damping dominates the curvature and λ falls up to 10-fold a step at
      first. A fixed λ too small makes the direction follow the noise of the
      factors' smallest eigenvalues (the trust region then shortens it); a
      fixed λ too large makes K-FAC a slow gradient descent with step
      `learning_rate / λ` (at 1.0, a learning rate of 0.01 barely moves a
      classifier in 30 steps).
    adapt_damping: adapt λ by the Levenberg-Marquardt rule (quadratic-model
      mode only).
    damping_interval: T1, the steps between two measurements of ρ (after
      the first T1 steps, where every step is measured).
    min_damping: the floor of the adapted λ. With normalisation layers, whose
      scale-invariant weights leave the Fisher singular, keep λ + η away from
      0 (a floor, or the paper's `l2_reg`), or the quadratic model's momentum
      can run away along the flat directions.
    gamma_interval: T2: re-choose the inverses' damping γ every this many
      steps among `{ω2 γ, γ, γ/ω2}`, `ω2 = sqrt(19/20)^T2`, keeping the one
      whose update the quadratic model predicts to decrease the loss most
      (section 6.6; the paper's T2 is 20): three inverse refreshes at those
      steps. None (the default): `γ = sqrt(λ + η)` always. Needs the
      quadratic model (`learning_rate` or `momentum` None).
    reject_steps: with `adapt_damping`, reject a measured step whose loss
      rose or is not finite (see above). False: every step is taken, as in
      the paper.
    kl_clip: with a fixed `learning_rate`, the trust region's bound κ on
      `(learning_rate / (1 - momentum))² Δ^T ∇h / n`, the update's predicted
      change in KL per predicted variable (`Δ^T ∇h = Δ^T F̆ Δ` under the
      damped K-FAC curvature; `n` the variables the registered losses
      predict per term: 1 for a classifier, 784 for an autoencoder summing
      784 pixels; `jkfac.scale_by_kl_clip`): a longer preconditioned
      gradient `Δ` is shortened to the bound before momentum. The default
      1e-2 keeps learning rates 0.01 to 0.3 with momentum 0.9 from
      diverging on MLPs, convnets, ResNets, RNNs and transformers
      (`tests/test_zoo.py`) and speeds the MNIST autoencoder's fixed run up
      (its early steps are shortened). Costs one inner product per update.
      None: no trust region. With a fixed learning rate and the momentum
      from the quadratic model, the bound takes μ = 0. Unused when the
      learning rate comes from the quadratic model.
    nesterov: use Nesterov momentum (fixed learning rate and momentum only).
    l2_reg: η, the coefficient of an L2 term `η/2 |θ|²` already in the loss;
      added to the damping, as in the paper's `γ = sqrt(λ + η)`.
    decay: factor moving-average decay (see `scale_by_kfac`).
    inverse_every: inverse refresh period, in updates.
    inverse_warmup: refresh at every one of the first this many updates.
    inverse_method: `"cholesky"` or `"eigh"` (see `scale_by_kfac`).
    structure: the inverse's block structure (see `scale_by_kfac`).
    axis_name: under `pmap`, the mapped axis (see `scale_by_kfac`); the
      quadratic model's products and ρ are averaged over it too.
    spread_inverses: with `axis_name` or `mesh`, spread the inverses over the
      devices (see `scale_by_kfac`).
    mesh: under sharded `jit`, the mesh whose devices share the inverse work
      (see `scale_by_kfac`).
    shard_state: with `mesh`, split the factors and inverses over its
      devices (see `scale_by_kfac`).
    skip_non_finite: with a fixed learning rate and momentum, a step whose
      gradient or update is not finite is replaced by a zero step and the
      momentum is kept as it was (the state keeps the chain's structure; the
      preconditioner counts such steps in `nonfinite_grads`). False: such a
      step is passed on, as optax optimizers do (`optax.apply_if_finite`
      can then skip it). The quadratic-model optimizer always takes a zero
      step on a non-finite direction or gradient.

  Returns:
    An `optax.GradientTransformationExtraArgs`.
  """
  _check_estimator(est, "kfac")
  _check_numbers([
      (momentum, lambda v: 0 <= v < 1, "momentum must be in [0, 1), got {}: the decay of "
       "the previous update; try 0.9, 0 for none, or None to choose it by the quadratic "
       "model."),
      (l2_reg, lambda v: v >= 0, "l2_reg must be non-negative, got {}: the η of an η/2 "
       "|θ|² term already in the loss (0 if there is none; the paper uses 1e-5)."),
      (damping_interval, lambda v: v >= 1 and v == int(v), "damping_interval must be a "
       "positive integer, got {}: the updates between two adaptations of λ; try 5 (the "
       "default)."),
      (gamma_interval, lambda v: v >= 1 and v == int(v), "gamma_interval must be a "
       "positive integer or None, got {}: try 20 (the paper's T2), or None to keep "
       "γ = sqrt(λ + η)."),
      (min_damping, lambda v: v > 0, "min_damping must be positive, got {}: the floor of "
       "the adapted λ; try 1e-8 (the default), or more with normalisation layers."),
      (kl_clip, lambda v: v > 0, "kl_clip must be positive or None, got {}: the bound on "
       "the update's predicted KL change; try 1e-2, or None for no trust region."),
  ])
  fixed_step = learning_rate is not None and momentum is not None
  if damping is None:
    damping = FIXED_DAMPING if fixed_step else ADAPTIVE_DAMPING
  rate = _initial_value(learning_rate) if learning_rate is not None else None
  if rate is not None and not rate >= 0:
    raise ValueError(f"learning_rate must be non-negative, got {learning_rate}: kfac "
                     "negates it itself, like optax's aliases; pass a positive step size "
                     "(e.g. 0.1), or None to choose it by the quadratic model.")
  lam = _initial_value(damping)
  if lam is not None and not lam >= 0:
    raise ValueError(f"damping must be positive, got {damping}: it is the λ of "
                     "(F + λI), l2_reg is added to it; try 1e-3 (or 1.0, the default, "
                     "when it is adapted).")
  if nesterov and (learning_rate is None or momentum is None):
    raise ValueError("nesterov=True needs a fixed learning_rate and momentum (the "
                     "quadratic model chooses its own step): pass both, or leave "
                     "nesterov=False.")
  if gamma_interval is not None and learning_rate is not None and momentum is not None:
    raise ValueError("gamma_interval re-chooses γ by the quadratic model: leave "
                     "learning_rate or momentum as None to use it.")
  with_l2 = lambda lam: ((lambda count: value_at(lam, count) + l2_reg) if callable(lam)
                         else lam + l2_reg)
  preconditioner = scale_by_kfac(est, damping=with_l2(damping), decay=decay,
                                 inverse_every=inverse_every, inverse_warmup=inverse_warmup,
                                 inverse_method=inverse_method, structure=structure,
                                 axis_name=axis_name, spread_inverses=spread_inverses,
                                 mesh=mesh, shard_state=shard_state)
  clip = (trust_region.scale_by_kl_clip(kl_clip, learning_rate,
                                        0.0 if momentum is None else momentum,
                                        trust_region.predicted_variables(est.losses))
          if kl_clip is not None and learning_rate is not None else None)
  if fixed_step:
    fixed = optax.chain(
        preconditioner,
        clip or optax.identity(),
        optax.trace(decay=momentum, nesterov=nesterov) if _python_number(momentum) != 0
        else optax.identity(),
        optax.scale_by_learning_rate(learning_rate))
    if clip is not None:  # the trust region reads the gradient Δ came from
      fixed = _passing_grads(fixed)
    return _compiled_when_eager(_zero_step_if_not_finite(fixed) if skip_non_finite else fixed)
  adapting = adapt_damping and not callable(damping)
  model = scale_by_quadratic_model(est, damping, l2_reg, learning_rate, momentum, axis_name)
  omega2 = math.sqrt(19.0 / 20.0) ** (gamma_interval or 1)
  zero = lambda: jnp.zeros([], jnp.int32)

  def init_fn(params: Any) -> KFACState:
    lam = value_at(damping, jnp.zeros([], jnp.int32)).astype(est.factor_dtype)
    return KFACState(preconditioner.init(params), model.init(params), lam,
                     jnp.full([], jnp.nan, est.factor_dtype), jnp.sqrt(lam + l2_reg),
                     zero(), zero(), jnp.full([], damping_interval, jnp.int32))

  def update_fn(grads: Any, state: KFACState, params: Any = None, *,
                stats: Optional[Statistics] = None, **extra_args):
    _check_state(state, KFACState, "kfac.update")
    _check_stats(stats, est, state.preconditioner.factors)
    if adapting and params is None:
      raise ValueError("kfac adapts its damping from the loss at the new parameters: "
                       "call tx.update(grads, opt_state, params, stats=stats) with params.")
    lam = state.damping if adapting else None
    count = state.preconditioner.count

    def candidate(damping_now, refresh_now):  # γ² = damping_now
      # Refreshed early when the inverses' damping is off by _DAMPING_DRIFT.
      drift = damping_now / state.preconditioner.damping
      refresh_now = refresh_now | (drift > _DAMPING_DRIFT) | (drift < 1.0 / _DAMPING_DRIFT)
      # The direction stays at least as wide as the factors until α scales it:
      # with half-precision parameters F̆^{-1}∇h can exceed float16's range.
      wide = jax.tree.map(lambda g: g.astype(jnp.promote_types(g.dtype, est.factor_dtype)),
                          grads)
      direction, first = preconditioner.update(
          wide, state.preconditioner, params, stats=stats, refresh_now=refresh_now,
          damping_now=damping_now)
      if clip is not None:  # a fixed α with the momentum from the model
        direction, _ = clip.update(direction, trust_region.KLClipState(count, jnp.ones([])),
                                    grads=wide)
      step, second = model.update(direction, state.quadratic_model, params, stats=stats,
                                  grads=grads, count=count, damping_now=lam)
      return step, first, second

    if gamma_interval is None:
      lam_now = lam if adapting else value_at(damping, count).astype(est.factor_dtype)
      gamma = jnp.sqrt(lam_now + l2_reg)
      step, first, second = candidate(gamma ** 2, False)
    else:
      def rechoose(_):  # section 6.6: the γ whose update the quadratic model prefers
        outs = [candidate((state.gamma * f) ** 2, True) for f in (omega2, 1.0, 1.0 / omega2)]
        changes = jnp.stack([o[2].predicted_change for o in outs])
        best = jnp.argmin(jnp.where(jnp.isfinite(changes), changes, jnp.inf))
        pick = lambda *xs: jnp.where(best == 0, xs[0], jnp.where(best == 1, xs[1], xs[2]))
        chosen = jax.tree.map(pick, *outs)
        return chosen, pick(*[state.gamma * f for f in (omega2, 1.0, 1.0 / omega2)])

      (step, first, second), gamma = jax.lax.cond(
          (count + 1) % gamma_interval == 0, rechoose,
          lambda _: (candidate(state.gamma ** 2, False), state.gamma), None)
    if not adapting:
      return step, state._replace(preconditioner=first, quadratic_model=second, gamma=gamma)

    probing = count < state.measure_until
    measured = probing | ((count + 1) % damping_interval == 0)

    def measure(_):  # on the examples the quadratic model was built on
      loss_at = stats.extras["loss_at"]
      old_loss = stats.extras["loss"] if est.curvature_fraction == 1.0 else loss_at(params)
      new_loss = loss_at(optax.apply_updates(params, step))  # subtracted in the factor dtype
      change = new_loss.astype(est.factor_dtype) - old_loss.astype(est.factor_dtype)
      if axis_name is not None:
        change = jax.lax.pmean(change, axis_name)
      return change

    change = jax.lax.cond(measured, measure,
                          lambda _: jnp.full([], jnp.nan, est.factor_dtype), None)
    rho = change / second.predicted_change
    rejected = measured & (~jnp.isfinite(change) | (change > 0)) & reject_steps
    omega = jnp.where(probing, 19.0 / 20.0, (19.0 / 20.0) ** damping_interval).astype(lam.dtype)
    new_lam, streak = adaptive.levenberg_marquardt(lam, state.damping_streak, rho, rejected,
                                                   measured, omega, second.damping_share)
    new_lam = jnp.clip(new_lam, min_damping, _MAX_DAMPING).astype(lam.dtype)
    # A rejected step: no step, the momentum's previous update kept, and the
    # inverses damped with the raised λ (also γ, when it is re-chosen).
    step = jax.tree.map(lambda s: jnp.where(rejected, jnp.zeros_like(s), s), step)
    second = second._replace(previous_update=jax.tree.map(
        lambda new, old: jnp.where(rejected, old, new), second.previous_update,
        state.quadratic_model.previous_update))
    if gamma_interval is not None:
      gamma = jnp.where(rejected, jnp.maximum(gamma, jnp.sqrt(new_lam + l2_reg)), gamma)
    return step, KFACState(
        first, second, new_lam, jnp.where(jnp.isfinite(rho), rho, state.reduction_ratio),
        gamma, state.rejected_steps + rejected.astype(jnp.int32), streak,
        jnp.where(rejected, count + 1 + damping_interval, state.measure_until))

  return _compiled_when_eager(optax.GradientTransformationExtraArgs(init_fn, update_fn))


_MAX_DAMPING = 1e8


def _passing_grads(chain: optax.GradientTransformationExtraArgs
                   ) -> optax.GradientTransformationExtraArgs:
  """`chain`, given its input gradient also as the extra argument `grads=`."""

  def update_fn(grads, state, params=None, **extra_args):
    return chain.update(grads, state, params, grads=grads, **extra_args)

  return optax.GradientTransformationExtraArgs(chain.init, update_fn)


def _zero_step_if_not_finite(chain: optax.GradientTransformationExtraArgs
                             ) -> optax.GradientTransformationExtraArgs:
  """`chain` (preconditioner first), with a zero step where it is not finite.

  The state keeps `chain`'s structure. On a step whose gradient or update is
  not finite the update is zero and the states after the preconditioner
  (momentum, schedule count) stay as they were; the preconditioner's own
  state moves on (it has left non-finite statistics out and counted the
  gradient in `nonfinite_grads`).
  """

  def update_fn(grads, state, params=None, **extra_args):
    updates, new_state = chain.update(grads, state, params, **extra_args)
    finite = linalg.all_finite((grads, updates))
    updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
    rest = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                  tuple(new_state[1:]), tuple(state[1:]))
    return updates, (new_state[0],) + rest

  return optax.GradientTransformationExtraArgs(chain.init, update_fn)
