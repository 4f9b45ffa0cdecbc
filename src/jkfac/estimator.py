# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The one-pass estimator: loss, gradient and curvature statistics of a batch.

`estimator(loss_fn, params, *args)` traces the loss once (`tracing.trace`) and
returns `est`, a pure function. `est(params, *args, rng=key)` evaluates the
traced loss once, with a zero perturbation added to every layer output, and
keeps the VJP of that single forward pass. Two backward passes share it:

- the loss gradient (cotangent 1 on the loss), which gives `grads`;
- the curvature pass: cotangents on the registered losses' predictions equal
  to `sqrt(weight / examples)` times the gradient of the negative
  log-likelihood of sampled targets (mode `"fisher"`), of the data's targets
  (`"empirical"`), or the columns of the predictive distribution's Fisher
  square root (`"exact"`). Its gradient with respect to the perturbations is
  the per-example output derivative `g` of every layer; nothing else is
  needed from it, so under `jit` no weight gradient is computed for it.

Each curvature block turns the captured inputs and the `g`s into this batch's
factors (`stats`), which `scale_by_kfac` averages over time and inverts.
"""

from __future__ import annotations

import functools
import itertools
import os
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from jkfac import (blocks, cotangents, curvature, interpret, layer_table, per_example,
                   sharding, term_weights, tracing, trees, tridiagonal)
from jkfac import batch_axes as batching
from jkfac.statistics import Statistics
from jkfac.blocks import dense

Array = jax.Array
MODES = ("fisher", "empirical", "exact")
_ids = itertools.count()


class Estimator:
  """Computes `(loss, grads, stats)` of a batch in one forward pass.

  Made by `jkfac.estimator`; see there. Attributes: `layers` (the layer table,
  graph order, fallbacks last), `losses`, `mode`, `id`, `chains` (the layer
  indices of the block-tridiagonal chains, once requested), `factor_dtype`
  (the dtype of the statistics and of everything the transforms derive from
  them).
  """

  def __init__(self, loss_fn: Callable[..., Any], params: Any, args: Sequence[Any],
               mode: str, has_aux: bool, stats_fraction: float, fisher_samples: int,
               overrides: Optional[dict[str, str]] = None, weight_sharing: str = "expand",
               curvature_fraction: float = 1.0, factor_dtype: Any = None,
               batch_axes: Any = None):
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}: 'fisher' samples "
                       "targets from the model (the true Fisher, the default), "
                       "'empirical' uses the data's targets, 'exact' the expectation.")
    for name, fraction in (("stats_fraction", stats_fraction),
                           ("curvature_fraction", curvature_fraction)):
      if not 0.0 < fraction <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {fraction}: the fraction of the "
                         "batch used, e.g. 0.125 for its first eighth, 1 for all of it.")
    if weight_sharing not in dense.WEIGHT_SHARING:
      raise ValueError(f"weight_sharing must be one of {dense.WEIGHT_SHARING}, got "
                       f"{weight_sharing!r}: 'expand' (every row an example, the "
                       "default) or 'reduce' (rows aggregated per example).")
    if not hasattr(fisher_samples, "__index__") or fisher_samples < 1:  # an int
      raise ValueError(f"fisher_samples must be a positive integer (targets sampled per "
                       f"example), got {fisher_samples!r}; use 1 (the default) or more.")
    self.loss_fn = loss_fn
    self.mode = mode
    self.has_aux = has_aux
    self.stats_fraction = stats_fraction
    self.curvature_fraction = curvature_fraction
    self.fisher_samples = fisher_samples
    self.overrides = dict(overrides or {})
    self.weight_sharing = weight_sharing
    self._num_args = len(args)
    self.batch_axes = batching.check(batch_axes, args)
    self.id = next(_ids)
    trees.check_leaves(params, "jkfac.estimator(loss_fn, params, ...)")
    leaves, self.params_tree = jax.tree.flatten(params)
    self.canonical_tree = jax.tree.structure(trees.unwrap(params))
    self._param_shapes = [(tuple(jnp.shape(x)), jnp.result_type(x)) for x in leaves]
    inexact = [d for _, d in self._param_shapes if jnp.issubdtype(d, jnp.inexact)]
    self.factor_dtype = resolve_factor_dtype(factor_dtype, inexact)
    self._programs: dict[Any, tracing.Program] = {}
    self._bound_functions: dict[Any, Callable[..., Any]] = {}
    program = tracing.trace(loss_fn, params, args, has_aux, overrides=self.overrides,
                            weight_sharing=weight_sharing)
    _check_nonempty(program)
    flat_args, args_tree = jax.tree.flatten(tuple(args))
    self._programs[_signature(leaves, flat_args, args_tree)] = program
    self.layers = program.layers
    self.uses = program.uses
    self.losses = program.losses
    self.chains: tuple[tuple[int, ...], ...] = ()
    self._factor_shapes: Optional[dict[str, Any]] = None
    self._compiled = jax.jit(self._evaluate)

  # --- the pure function -------------------------------------------------

  def __call__(self, params: Any, *args: Any, rng: Optional[Array] = None):
    """Returns `(loss, grads, stats)` (`((loss, aux), grads, stats)` with has_aux).

    Args:
      params: the parameters, with the structure given at set-up (a flax
        nnx state may hold them in Variables or not, either way).
      *args: the other arguments of the loss function (the batch).
      rng: a PRNG key; required in mode `"fisher"` (targets are sampled).

    Returns:
      The loss (and aux), its gradient with the structure of `params`, and
      this batch's `Statistics`.
    """
    params_view, flat_params = self.align(params, "est(params, ...)")
    self._check_call(flat_params, args, rng)
    try:
      if trees.all_concrete_arrays((flat_params, args, rng)):
        # Called outside jit: one compiled program rather than every operation
        # dispatched on its own (tens of times faster on small models).
        value, grads, stats = self._compiled(flat_params, *args, rng=rng)
      else:
        value, grads, stats = self._evaluate(flat_params, *args, rng=rng)
    except Exception as e:  # JAX's, under jax.set_mesh with Explicit axes
      if type(e).__name__ != "ShardingTypeError":
        raise
      raise ValueError(
          "est(params, ...): under a mesh with Explicit axes (jax.set_mesh), JAX could "
          f"not place a result of the model or of its gradient: {e}\nWhere the model "
          "contracts a sharded axis, give that product its out_sharding (or reshard an "
          "operand); JAX cannot yet differentiate some operations over an Explicit "
          "batch-sharded input (a convolution's kernel, and on JAX 0.8 a dense layer's: "
          "jax.grad fails the same way), so use Auto axes there: "
          "jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))."
      ) from e
    return value, params_view.rebuild(grads), stats

  def _evaluate(self, flat_params: list[Array], *args: Any, rng: Optional[Array] = None):
    """`__call__` after its checks, traceable; the gradient comes back flat."""
    flat_args, args_tree = jax.tree.flatten(tuple(args))
    program = self._program(flat_params, flat_args, args_tree)
    (loss, aux), grads, inputs, preds, targets, backward = self._forward(
        program, flat_params, flat_args, with_grads=True)
    stats_program, stats_args = program, flat_args
    if self.stats_fraction < 1.0:
      stats_args = self._subset(program, flat_args, args_tree, self.stats_fraction,
                                "stats_fraction")
      stats_program = self.sliced_program(flat_params, stats_args, args_tree,
                                          "stats_fraction")
      _, _, inputs, preds, targets, backward = self._forward(
          stats_program, flat_params, stats_args, with_grads=False)
    targets, masks = [t for t, _ in targets], [m for _, m in targets]
    weights = [term_weights.term_weights(l, m) for l, m in zip(stats_program.losses, masks)]
    cots = cotangents.cotangents(stats_program, preds, targets, weights, rng, self.mode,
                                 self.fisher_samples)
    output_grads = backward(cots)
    moments = per_example.gradient_moments(self, stats_program, flat_params, stats_args,
                                           args_tree, cots)
    factors = self._factors(stats_program.uses, inputs, output_grads, moments,
                            term_weights.row_side_weights(stats_program.losses, weights))
    value = (loss, aux) if self.has_aux else loss
    extras = {
        "loss": jax.lax.stop_gradient(loss),
        **self._quadratic_model_extras(program, flat_params, flat_args, args_tree),
    }
    return value, grads, Statistics(factors, self.id, extras)

  def _factors(self, uses: Sequence[tuple[tracing.Use, ...]], inputs: dict[int, Array],
               output_grads: dict[int, Array], moments: dict[str, Array],
               weights: Optional[Array] = None) -> dict[str, dict[str, Array]]:
    """Every block's statistics, and the chains' cross moments when requested."""
    factors = {}
    for layer, layer_uses in zip(self.layers, uses):
      captures = blocks.Captures(
          uses=layer_uses,
          inputs=[inputs[u.id] for u in layer_uses],
          output_grads=[output_grads[u.id] for u in layer_uses],
          gradient_moment=moments.get(layer.name),
          dtype=self.factor_dtype,
          weights=weights)
      factors[layer.name] = jax.tree.map(  # whole on every device (Explicit axes)
          sharding.gathered, blocks.for_layer(layer).statistics(layer, captures))
    for chain in self.chains:
      for i, j in zip(chain[:-1], chain[1:]):
        ids = [uses[i][0].id, uses[j][0].id]
        factors[self.layers[i].name].update(tridiagonal.cross_moments(
            self.layers[i], self.layers[j], [inputs[k] for k in ids],
            [output_grads[k] for k in ids], self.factor_dtype, weights))
    return factors

  def zero_factors(self) -> dict[str, dict[str, Array]]:
    """The statistics of zero captures: their structure, shapes and dtypes.

    Returns:
      Layer name -> its factors, structured as a batch's
      `Statistics.factors`, computed from all-zero captures; the transform
      reads only their shapes and dtypes (`jax.eval_shape`).
    """
    dtype = self.factor_dtype
    inputs = {u.id: jnp.zeros(u.x_shape, dtype) for uses in self.uses for u in uses}
    output_grads = {u.id: jnp.zeros((1,) + u.out_shape, dtype)
                    for uses in self.uses for u in uses}
    moments = {}
    for layer in self.layers:
      block = blocks.for_layer(layer)
      if block.needs == "per_example_gradients":
        moments[layer.name] = block.gradient_moment(
            [jnp.zeros((1,) + p.shape, dtype) for p in layer.params], dtype)
    return self._factors(self.uses, inputs, output_grads, moments)

  def factor_shapes(self) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
    """The shapes and dtypes of every layer's factors (`zero_factors`, traced once).

    Returns:
      Layer name -> its factors' `jax.ShapeDtypeStruct`s.
    """
    if self._factor_shapes is None:
      self._factor_shapes = jax.eval_shape(self.zero_factors)
    return self._factor_shapes

  def request_cross_moments(self) -> tuple[tuple[int, ...], ...]:
    """Makes the statistics include the cross moments of chains of dense layers.

    Called by `scale_by_kfac(est, structure="block_tridiagonal")` when it is
    built, before the training step is traced. Each chain is a maximal run of
    consecutive dense layers applied once to `(batch, features)` inputs
    (`tridiagonal.find_chains`); its layers get `"A_next"` and `"G_next"`
    factors, the cross moments with the next layer of the chain.

    Returns:
      The chains, as tuples of indices into `layers`.
    """
    self.chains = tridiagonal.find_chains(self.layers, self.uses)
    self._compiled = jax.jit(self._evaluate)  # the statistics' structure changed
    self._factor_shapes = None
    return self.chains

  def _forward(self, program: tracing.Program, flat_params: list[Array],
               flat_args: list[Array], with_grads: bool):
    """One forward pass; returns its outputs, captures and backward functions."""
    perturbations = {u.id: jnp.zeros(u.out_shape, self.factor_dtype)
                     for uses in program.uses for u in uses}

    def forward(p, perts):
      result = interpret.run(program.plan, list(p) + list(flat_args), perts)
      out = jax.tree.unflatten(program.out_tree, result.outputs)
      loss, aux = out if self.has_aux else (out, None)
      preds = [result.predictions[l.id][0] for l in program.losses]
      targets = [result.predictions[l.id][1:] for l in program.losses]  # with masks
      return (loss, preds), (aux, result.inputs, targets)

    if with_grads:
      (loss, preds), vjp_fn, (aux, inputs, targets) = jax.vjp(
          forward, flat_params, perturbations, has_aux=True)
      zero_preds = [jnp.zeros_like(p) for p in preds]
      grads = vjp_fn((jnp.ones_like(loss), zero_preds))[0]
      pullback = lambda cots: vjp_fn((jnp.zeros_like(loss), cots))[1]
    else:
      (loss, preds), vjp_fn, (aux, inputs, targets) = jax.vjp(
          lambda perts: forward(flat_params, perts), perturbations, has_aux=True)
      grads = None
      pullback = lambda cots: vjp_fn((jnp.zeros_like(loss), cots))[0]

    def backward(cotangents: list[Array]) -> dict[int, Array]:
      if cotangents[0].shape[0] == 1:
        return jax.tree.map(lambda g: g[None], pullback([c[0] for c in cotangents]))
      return jax.vmap(pullback)(cotangents)

    return (loss, aux), grads, inputs, preds, targets, backward

  def check_params(self, params: Any, where: str) -> list[Array]:
    """Flattens `params`, checking them against the set-up structure.

    Args:
      params: a pytree that should match the estimator's parameters.
      where: the caller, for the error message.

    Returns:
      The flat leaves.

    Raises:
      ValueError: the structure or a leaf's shape differs.
    """
    return self.align(params, where)[1]

  def align(self, tree: Any, where: str, partial: bool = False
            ) -> tuple[trees.View, list[Optional[Array]]]:
    """Lines a pytree up with the parameters (`jkfac.trees.view`), checking shapes.

    Args:
      tree: the parameters, or a pytree shaped as them (gradients, updates),
        as given at set-up or with flax nnx Variables added or removed.
      where: the caller, for the error message.
      partial: whether parameters may be masked out (`optax.MaskedNode`, as
        optax's partitions pass them to an inner transform).

    Returns:
      The view (to put results back into `tree`'s structure), and the leaves
      per parameter leaf (None where masked).

    Raises:
      ValueError: the structure or a leaf's shape differs, or a parameter is
        masked where none may be.
    """
    tree_view, leaves = trees.view(tree, self.canonical_tree, where)
    if not partial and not all(tree_view.present):
      raise ValueError(
          f"{where}: parameters are masked out (optax.MaskedNode); this needs all of "
          "them. Call the estimator with the whole model's parameters; only a transform "
          "(jkfac.kfac, scale_by_kfac) may be given a part of them, by optax's "
          "multi_transform, partition or masked.")
    for leaf, (shape, _), layer_path in zip(leaves, self._param_shapes, self._paths()):
      if leaf is not None and tuple(jnp.shape(leaf)) != shape:
        raise ValueError(f"{where}: parameter {layer_path!r} has shape "
                         f"{tuple(jnp.shape(leaf))}, the estimator expects {shape}. Pass "
                         "arrays shaped as the parameters given to jkfac.estimator, or "
                         "build a new estimator for the new shapes.")
    return tree_view, leaves

  def _check_call(self, flat_params: list[Array], args: Sequence[Any], rng: Any) -> None:
    """`est(params, *args, rng=key)`: the set-up's dtypes and arguments, a key."""
    for leaf, (_, dtype), layer_path in zip(flat_params, self._param_shapes, self._paths()):
      if jnp.result_type(leaf) != dtype:
        raise ValueError(
            f"est(params, ...): parameter {layer_path!r} has dtype {jnp.result_type(leaf)}, "
            f"the estimator was built with {dtype}. Pass parameters of the set-up's dtypes, "
            "or build a new estimator (and optimizer) with the new ones: the factor dtype "
            "and the layer table follow the parameters given to jkfac.estimator.")
    if len(args) != self._num_args:
      raise ValueError(
          f"est(params, *args): got {len(args)} argument(s) after params, the estimator "
          f"was built with {self._num_args}. Pass the arguments given to jkfac.estimator "
          "(new shapes are fine), or build another estimator for another signature.")
    if self.mode != "fisher":
      return
    if rng is None:
      raise ValueError("mode='fisher' samples targets from the model: call "
                       "est(params, *args, rng=key) with a jax.random key.")
    dtype = getattr(rng, "dtype", None)
    if dtype is None or not (jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
                             or dtype == jnp.uint32):
      got = repr(rng) if dtype is None else f"an array of dtype {dtype}"
      raise TypeError(f"rng must be a jax.random key, got {got}. Pass "
                      "rng=jax.random.key(seed) (or jax.random.PRNGKey(seed)), a new one "
                      "each step: jax.random.fold_in(key, step).")

  def _paths(self) -> list[str]:
    paths = {p.index: p.path for layer in self.layers for p in layer.params}
    return [paths.get(i, f"leaf {i}") for i in range(len(self._param_shapes))]

  def _program(self, flat_params: list[Array], flat_args: list[Any],
               args_tree: Any) -> tracing.Program:
    """The traced program for these argument shapes (traced on first use)."""
    key = _signature(flat_params, flat_args, args_tree)
    if key not in self._programs:
      params = jax.tree.unflatten(self.params_tree, [_shape(x) for x in flat_params])
      args = jax.tree.unflatten(args_tree, [_shape(x) for x in flat_args])
      self._programs[key] = tracing.trace(self.loss_fn, params, args, self.has_aux,
                                          reference=self.layers, overrides=self.overrides,
                                          weight_sharing=self.weight_sharing)
      _check_nonempty(self._programs[key])
    return self._programs[key]

  def _quadratic_model_extras(self, program: tracing.Program, flat_params: list[Array],
                              flat_args: list[Array], args_tree: Any) -> dict[str, Any]:
    """`"curvature"` and `"loss_at"` on the first `curvature_fraction` of the batch."""
    if self.curvature_fraction < 1.0:
      flat_args = self._subset(program, flat_args, args_tree, self.curvature_fraction,
                               "curvature_fraction")
      program = self.sliced_program(flat_params, flat_args, args_tree, "curvature_fraction")
    return {
        "curvature": jax.tree_util.Partial(self._bound(curvature.gram, program),
                                           flat_params, flat_args),
        "loss_at": jax.tree_util.Partial(self._bound(curvature.loss_at, program),
                                         flat_params, flat_args),
    }

  def _bound(self, function: Callable[..., Any], program: tracing.Program
             ) -> Callable[..., Any]:
    """`function` with this estimator and `program` bound, one object per pair.

    A `Partial`'s function is static: the same object for the same program
    keeps a jitted `tx.update` from tracing again at each call.
    """
    key = (function, id(program))
    if key not in self._bound_functions:
      self._bound_functions[key] = functools.partial(function, self, program)
    return self._bound_functions[key]

  def _subset(self, program: tracing.Program, flat_args: list[Array], args_tree: Any,
              fraction: float, option: str) -> list[Array]:
    """The first `fraction` of the batch, sliced along the batch axes."""
    n = batching.batch_size(program, option)
    axes = batching.leaf_axes(self.batch_axes, flat_args, args_tree, n)
    return batching.sliced(flat_args, axes, max(1, int(round(n * fraction))))

  def sliced_program(self, flat_params: list[Array], flat_args: list[Array],
                     args_tree: Any, option: str) -> tracing.Program:
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
      return self._program(flat_params, flat_args, args_tree)
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

  def table(self) -> str:
    """The layer table (`jkfac.layer_table.table`).

    Returns:
      Printable text: a row per layer, then the losses, the fallbacks and
      the block-tridiagonal chains.
    """
    return layer_table.table(self.layers, self.losses, self.mode, self.chains)

  def __str__(self) -> str:
    return self.table()

  def __repr__(self) -> str:
    return self.table()


def _raised_by_jkfac(error: BaseException) -> bool:
  """Whether `error` was raised by jkfac's own code (its checks name their fix)."""
  frame = error.__traceback__
  while frame is not None and frame.tb_next is not None:
    frame = frame.tb_next
  return frame is not None and os.path.dirname(frame.tb_frame.f_code.co_filename) in (
      os.path.dirname(__file__), os.path.dirname(blocks.__file__))


def _shape(x: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))


def _signature(flat_params: Sequence[Any], flat_args: Sequence[Any], args_tree: Any) -> Any:
  """What a traced program depends on: the shapes, dtypes and the mesh in context.

  A model under `jax.set_mesh` may trace differently (FSDP's gathers, a
  tensor-parallel product's `out_sharding`), so an estimator built outside
  the mesh traces the loss again inside it.
  """
  avals = tuple((tuple(jnp.shape(x)), str(jnp.result_type(x)))
                for x in list(flat_params) + list(flat_args))
  return avals, args_tree, sharding.context_mesh()


def _check_nonempty(program: tracing.Program) -> None:
  for loss in program.losses:
    if loss.num_examples == 0:
      raise ValueError(f"The {loss.distribution} loss has prediction shape "
                       f"{loss.prediction_shape}: the batch is empty. Pass at least one "
                       "example.")


def resolve_factor_dtype(factor_dtype: Any, param_dtypes: Sequence[Any]) -> Any:
  """The factor dtype: the one asked for, checked, or the parameters' default.

  Args:
    factor_dtype: None, or the dtype asked for (`jnp.float32`, `jnp.float64`).
    param_dtypes: the dtypes of the inexact parameters.

  Returns:
    float32 or float64 (None: float32, or the widest parameter dtype if wider).

  Raises:
    ValueError: a dtype other than float32 or float64, or float64 without
      `jax_enable_x64`.
  """
  if factor_dtype is None:
    return jnp.result_type(jnp.float32, *param_dtypes)
  try:
    dtype = jnp.dtype(factor_dtype)
  except TypeError as e:
    raise ValueError(f"factor_dtype must be jnp.float32 or jnp.float64 (or None), got "
                     f"{factor_dtype!r}.") from e
  if dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(
        f"factor_dtype={dtype.name} is not supported: factors and their inverses in half "
        "precision lose the moving averages' small (1 - decay) increments (8 or 11 "
        "significant bits), float16 underflows the output derivatives' second moments, "
        "and a Cholesky factorisation of a damped factor needs more digits than that. "
        "Keep the parameters in half precision and leave factor_dtype=None (float32): "
        "the statistics are accumulated in float32 and the updates come back in the "
        "parameters' dtype.")
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
    raise ValueError(f"factor_dtype must be jnp.float32 or jnp.float64 (or None), got "
                     f"{dtype.name}.")
  if dtype == jnp.float64 and not jax.config.read("jax_enable_x64"):
    raise ValueError(
        "factor_dtype=float64 needs 64-bit JAX: call "
        "jax.config.update('jax_enable_x64', True) at start-up (or set "
        "JAX_ENABLE_X64=1), or use factor_dtype=jnp.float32.")
  return dtype


def estimator(loss_fn: Callable[..., Any], params: Any, *args: Any, mode: str = "fisher",
              has_aux: bool = False, stats_fraction: float = 1.0,
              fisher_samples: int = 1,
              overrides: Optional[dict[str, str]] = None,
              weight_sharing: str = "expand",
              curvature_fraction: float = 1.0,
              factor_dtype: Any = None,
              batch_axes: Any = None,
              batch_argnums: Optional[Sequence[int]] = None) -> Estimator:
  """Traces `loss_fn` once and returns the one-pass estimator `est`.

  The loss function computes its value with a jkfac loss
  (`softmax_cross_entropy`, `sigmoid_cross_entropy`, `squared_error`) or
  registers its predictive distribution; dense layers are found
  automatically and other layers can be tagged (`register_dense`, ...).

  Args:
    loss_fn: `loss_fn(params, *args) -> loss` (or `(loss, aux)`), the batch mean.
    params: example parameters (arrays or `jax.ShapeDtypeStruct`s).
    *args: example arguments (the batch), with the shapes `est` will see; other
      shapes are traced again on first use and must give the same layers.
    mode: `"fisher"` (targets sampled from the model's predictive
      distribution: the true Fisher, K-FAC section 5), `"empirical"` (the
      data's targets), or `"exact"` (the exact expectation, one backward pass
      per output dimension: affordable for modest output sizes).
    has_aux: whether `loss_fn` returns `(loss, aux)`.
    stats_fraction: the fraction of the batch (its first examples) whose
      statistics are computed, at the cost of one more forward pass over that
      fraction (the paper uses 1/8). The batched arguments are sliced: those
      `batch_axes` or `batch_argnums` say, or by default every argument leaf
      whose leading axis has the batch's size.
    fisher_samples: targets sampled per example in mode `"fisher"`.
    overrides: per-layer block choices, `{pattern: choice}` with `fnmatch`
      patterns of layer names or parameter paths and choices `"kronecker"`,
      `"diagonal"`, `"full"` (scale-and-shift layers) or `"none"` (see
      `jkfac.overrides`).
    weight_sharing: how dense layers applied over extra axes (sequence
      positions) or several times are approximated: `"expand"` (every row an
      example) or `"reduce"` (rows aggregated per example), the two K-FAC
      variants of Eschenhagen et al. (2023); see `jkfac.blocks.dense`.
    curvature_fraction: the fraction of the batch (its first examples) on
      which `stats.extras["curvature"]` computes exact curvature products
      for the quadratic model of `jkfac.kfac` (a forward pass and one
      forward-mode product per vector); 1, the paper's choice, by default.
    factor_dtype: the dtype of the statistics, and of everything derived
      from them in `scale_by_kfac` and `kfac` (moving averages, inverses,
      damping, the quadratic model, the reduction ratio). None (the
      default): float32, or float64 when a parameter is float64 (with
      `jax_enable_x64`). Else `jnp.float32`, or `jnp.float64` (which needs
      `jax_enable_x64`). Half precision is not offered: parameters may be
      bfloat16 or float16 (the forward and backward passes then run in that
      dtype), but activations and output derivatives are cast to the factor
      dtype before their outer products are summed, and preconditioned
      updates come back in each parameter's own dtype.
    batch_axes: which arguments after `params` hold the batch, and along
      which axis, as `jax.vmap`'s `in_axes`: one entry per argument (an
      int, None for an unbatched one, or a pytree prefix of the argument),
      or one int for all. `stats_fraction`, `curvature_fraction` and the
      per-example passes of the diagonal and full blocks slice only these.
      None (the default): every argument leaf whose leading axis has the
      batch's size (the losses' predictions' leading size), which also
      slices state that merely has that size (a BatchNorm's `batch_stats`
      with as many features as examples); give the axes then.
    batch_argnums: a shorthand: the indices of the batched arguments after
      `params` (batched along axis 0); the others are not batched.

  Returns:
    The estimator: call it as `est(params, *args, rng=key)`; `print(est)`
    shows the layer table.
  """
  if batch_argnums is not None:
    if batch_axes is not None:
      raise ValueError("Pass batch_axes or batch_argnums, not both.")
    numbers = (batch_argnums,) if isinstance(batch_argnums, int) else tuple(batch_argnums)
    if any(not isinstance(i, int) or not 0 <= i < len(args) for i in numbers):
      raise ValueError(f"batch_argnums must be indices into the {len(args)} argument(s) "
                       f"after params, got {batch_argnums!r}.")
    batch_axes = tuple(0 if i in numbers else None for i in range(len(args)))
  return Estimator(loss_fn, params, args, mode, has_aux, stats_fraction, fisher_samples,
                   overrides, weight_sharing, curvature_fraction, factor_dtype, batch_axes)
