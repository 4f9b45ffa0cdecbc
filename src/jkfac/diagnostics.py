# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Per-layer figures to log: damping, π, factor traces and conditioning, update norms.

`diagnostics(est, opt_state, updates)` reads them off the optimizer state
(any optax state holding a `scale_by_kfac` state: `kfac`'s, a chain,
`apply_if_finite`, ...) and returns arrays, so it can run inside or outside
`jit`; `format_diagnostics` prints them as a table. Condition numbers take one
symmetric eigendecomposition per factor (a refresh's worth of work): compute
them when you log, not at every step.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jkfac import blocks, state_layout
from jkfac.damping import Damping
from jkfac.estimator import Estimator
from jkfac.preconditioner import ScaleByKFACState, kept_shapes
from jkfac.transform import KFACState
from jkfac.trust_region import KLClipState

Array = jax.Array


class Diagnostics(NamedTuple):
  """What `diagnostics` returns.

  Attributes:
    overall: figures of the whole optimizer: `count` (updates so far),
      `steps_since_refresh`, `damping` (the λ of the inverses in use),
      `skipped` (non-finite statistics left out), `nonfinite_grads`,
      `failed_refreshes`; with `kfac`'s quadratic model also
      `adapted_damping` (the current Levenberg-Marquardt λ),
      `reduction_ratio` ρ, `learning_rate` α, `momentum` μ, `gamma`,
      `predicted_change`, `rejected_steps` (steps not taken because the
      loss rose) and `damping_streak` (consecutive moves of λ the same way,
      positive up: a run whose loss keeps rising shows a growing streak and
      rejections); with a fixed learning rate's trust region,
      `kl_clip_scale` (the factor ν of the last update, 1 inside the
      region); with `updates`, `update_norm`.
    layers: layer name -> its figures: the damping in use, `damping_A =
      π√λ` and `damping_G = √λ/π` with `pi` for Kronecker blocks, else
      `damping = λ`; for each factor `F` of the layer (`A`, `G`, `diag`,
      `full`), `trace_F` and `condition_F` (largest over smallest
      eigenvalue of the moving average, inf when singular), and
      `damped_condition_F`, the condition number of the damped factor the
      inverse was computed from (where the block keeps `F_inv`); for a stack
      of layers (or a grouped convolution's groups) the traces are summed
      and the condition numbers and `pi` are the largest of its layers'; with
      `updates`, `update_norm`, and with `grads`, `grad_norm`.
  """
  overall: dict[str, Array]
  layers: dict[str, dict[str, Array]]


def _find(tree: Any, kind: type) -> list[Any]:
  return [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, kind))
          if isinstance(x, kind)]


def _condition(values: Array) -> Array:
  """Largest over smallest of `values` along the last axis, inf if the smallest is ≤ 0."""
  high, low = jnp.max(values, axis=-1), jnp.min(values, axis=-1)
  return jnp.max(jnp.where(low > 0, high / jnp.where(low > 0, low, 1.0), jnp.inf))


def _is_matrix(key: str, factor: Array) -> bool:
  """Whether `factor` is a symmetric matrix (groups in leading axes), not a diagonal."""
  return not key.startswith("diag") and factor.ndim >= 2 and factor.shape[-1] == factor.shape[-2]


def _spectrum(key: str, factor: Array, stack: tuple[int, ...] = ()) -> Array:
  """Eigenvalues of a symmetric factor (per group), or a diagonal's entries (per
  layer of a stack of `stack` layers: the stack's axes lead)."""
  if _is_matrix(key, factor):
    return jnp.linalg.eigvalsh(factor)
  return factor.reshape(math.prod(stack), -1)


def _trace(key: str, factor: Array) -> Array:
  if _is_matrix(key, factor):
    return jnp.sum(jnp.trace(factor, axis1=-2, axis2=-1))
  return jnp.sum(factor)


def _norm(arrays: list[Array]) -> Array:
  return optax.tree_utils.tree_norm(optax.tree_utils.tree_cast(arrays, jnp.float32))


def diagnostics(est: Estimator, opt_state: Any, updates: Any = None,
                grads: Any = None) -> Diagnostics:
  """Per-layer and overall figures of a jkfac optimizer state, to log.

  Args:
    est: the estimator the optimizer was built with.
    opt_state: the optimizer's state (of `jkfac.kfac`, `jkfac.scale_by_kfac`,
      or any optax transform containing one). Under `pmap`, one device's
      state (`jax.tree.map(lambda x: x[0], opt_state)`).
    updates: optionally, the updates `tx.update` returned, for their norms.
    grads: optionally, the gradients, for their norms.

  Returns:
    A `Diagnostics` of scalar arrays (see there).
  """
  states = _find(opt_state, ScaleByKFACState)
  if len(states) != 1:
    raise ValueError(f"diagnostics needs an optimizer state holding one jkfac "
                     f"scale_by_kfac state, found {len(states)}: pass the state of "
                     "jkfac.kfac(...) or of a chain containing jkfac.scale_by_kfac.")
  state = states[0]
  overall = {"count": state.count, "steps_since_refresh": state.count - state.last_refresh,
             "damping": state.damping, "skipped": state.skipped,
             "nonfinite_grads": state.nonfinite_grads,
             "failed_refreshes": state.failed_refreshes}
  for outer in _find(opt_state, KFACState):
    model = outer.quadratic_model
    overall.update(adapted_damping=outer.damping, reduction_ratio=outer.reduction_ratio,
                   learning_rate=model.learning_rate, momentum=model.momentum,
                   gamma=outer.gamma, predicted_change=model.predicted_change,
                   rejected_steps=outer.rejected_steps, damping_streak=outer.damping_streak)
  for clip in _find(opt_state, KLClipState):
    overall["kl_clip_scale"] = clip.scale
  flat = {name: None if tree is None else
          est.align(tree, f"diagnostics({name}=...)", partial=True)[1]
          for name, tree in (("updates", updates), ("grads", grads))}
  if flat["updates"] is not None:
    overall["update_norm"] = _norm([u for u in flat["updates"] if u is not None])

  layers = {}
  factor_shapes = kept_shapes(est, cross_moments=True)
  for layer in est.layers:
    if layer.name not in state.factors:  # another transform's, in an optax partition
      continue
    # A state split over devices (shard_state) stores padded arrays: `F_inv`
    # has `F`'s shape, π's padding (zeros) leaves its largest value.
    shapes = {key: factor_shapes[layer.name][key] for key in state.factors[layer.name]}
    factors = state_layout.load(state.factors[layer.name], shapes)
    inverse = {key: (state_layout.load(x, shapes[key[:-len("_inv")]])
                     if key.endswith("_inv") and key[:-len("_inv")] in shapes else x)
               for key, x in state.inverses[layer.name].items()}
    figures = {}
    if "pi" in inverse:  # factored Tikhonov: (A + π√λ I) ⊗ (G + √λ/π I)
      pi, root = jnp.max(inverse["pi"]), jnp.sqrt(state.damping)
      figures.update(pi=pi, damping_A=pi * root, damping_G=root / pi)
    else:
      figures["damping"] = state.damping
    for key, factor in factors.items():
      if key.endswith("_next"):  # block-tridiagonal cross moments
        continue
      figures[f"trace_{key}"] = _trace(key, factor)
      figures[f"condition_{key}"] = _condition(_spectrum(key, factor, layer.stack))
      if f"{key}_inv" in inverse:  # cond(M^{-1}) = cond(M)
        figures[f"damped_condition_{key}"] = _condition(
            _spectrum(key, inverse[f"{key}_inv"], layer.stack))
    if layer.block:  # a block chosen by overrides=, with figures of its own
      block = blocks.for_layer(layer)
      whole = state_layout.load(state.inverses[layer.name], jax.eval_shape(
          lambda f, layer=layer, block=block: block.refresh(layer, f, Damping(state.damping)),
          shapes))
      figures.update(block.diagnostics(layer, whole))
    for name, leaves in flat.items():
      if leaves is not None:
        figures[f"{name[:-1]}_norm"] = _norm([leaves[p.index] for p in layer.params])
    layers[layer.name] = figures
  return Diagnostics(overall, layers)


_OVERALL = ("count", "steps_since_refresh", "damping", "adapted_damping", "gamma",
            "reduction_ratio", "learning_rate", "momentum", "predicted_change",
            "rejected_steps", "damping_streak", "kl_clip_scale", "update_norm",
            "skipped", "nonfinite_grads", "failed_refreshes")
_FACTORS = ("A", "G", "diag", "full")
_FIGURES = ("damping", "trace", "condition", "damped_condition")


def _column_rank(column: str) -> tuple:
  """pi first, then each factor's figures (A, G, diag, full), then the norms."""
  if column in ("damping", "pi"):
    return (0, column)
  if column.endswith("_norm"):
    return (2, column)
  figure, _, factor = column.rpartition("_")
  return (1, _FACTORS.index(factor) if factor in _FACTORS else len(_FACTORS), factor,
          _FIGURES.index(figure) if figure in _FIGURES else len(_FIGURES))


def _number(value: Any) -> str:
  value = float(value)
  if math.isnan(value):
    return "-"
  return f"{value:.3g}" if abs(value) < 1e4 or math.isinf(value) else f"{value:.2e}"


def format_diagnostics(diag: Diagnostics, est: Optional[Estimator] = None) -> str:
  """`diagnostics`' figures as a text table, one row per layer.

  Args:
    diag: what `diagnostics` returned (concrete arrays: outside `jit`).
    est: optionally, the estimator, to show each layer's kind.

  Returns:
    The overall figures on one line, then the table.
  """
  overall = ", ".join(f"{k} {_number(diag.overall[k])}" for k in _OVERALL if k in diag.overall)
  columns = sorted({c for f in diag.layers.values() for c in f}, key=_column_rank)
  kinds = {l.name: l.kind for l in est.layers} if est is not None else {}
  rows = [["layer"] + (["kind"] if kinds else []) + columns]
  for name, figures in diag.layers.items():
    rows.append([name] + ([kinds[name]] if kinds else [])
                + [_number(figures[c]) if c in figures else "" for c in columns])
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
  return "\n".join([overall] + lines)
