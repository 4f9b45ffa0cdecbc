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
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from jkfac import (arguments, blocks, cotangents, curvature, layer_table, per_example,
                   programs, sharding, term_weights, tracing, trees, tridiagonal)
from jkfac import batch_axes as batching
from jkfac.arguments import MODES, resolve_factor_dtype  # noqa: F401  (jkfac.estimator.MODES)
from jkfac.forward import forward
from jkfac.statistics import Statistics

Array = jax.Array
_ids = itertools.count()


class Estimator:
  """Computes `(loss, grads, stats)` of a batch in one forward pass.

  Made by `jkfac.estimator`; see there. Attributes: `layers` (the layer table,
  graph order, fallbacks last), `losses`, `mode`, `id`, `chains` (the layer
  indices of the block-tridiagonal chains, once requested), `programs` (the
  traced programs per signature and of slices of the batch,
  `jkfac.programs.Programs`), `factor_dtype`
  (the dtype of the statistics and of everything the transforms derive from
  them).
  """

  def __init__(self, loss_fn: Callable[..., Any], params: Any, args: Sequence[Any],
               mode: str, has_aux: bool, stats_fraction: float, fisher_samples: int,
               overrides: Optional[dict[str, str]] = None, weight_sharing: str = "expand",
               curvature_fraction: float = 1.0, factor_dtype: Any = None,
               batch_axes: Any = None):
    arguments.check_options(mode, stats_fraction, curvature_fraction, weight_sharing,
                            fisher_samples)
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
    self.programs = programs.Programs(loss_fn, self.params_tree, has_aux, self.overrides,
                                       weight_sharing, self.batch_axes)
    self._bound_functions: dict[Any, Callable[..., Any]] = {}
    flat_args, args_tree = jax.tree.flatten(tuple(args))
    program = self.programs.get(leaves, flat_args, args_tree)
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
    program = self.programs.get(flat_params, flat_args, args_tree)
    whole = forward(program, flat_params, flat_args, self.has_aux, self.factor_dtype, True)
    stats_pass, stats_program, stats_args = whole, program, flat_args
    if self.stats_fraction < 1.0:
      stats_args = self.programs.subset(program, flat_args, args_tree, self.stats_fraction,
                                         "stats_fraction")
      stats_program = self.programs.sliced(flat_params, stats_args, args_tree,
                                          "stats_fraction")
      stats_pass = forward(stats_program, flat_params, stats_args, self.has_aux,
                           self.factor_dtype, False)
    targets = [t for t, _ in stats_pass.targets]
    masks = [m for _, m in stats_pass.targets]
    weights = [term_weights.term_weights(l, m) for l, m in zip(stats_program.losses, masks)]
    cots = cotangents.cotangents(stats_program, stats_pass.predictions, targets, weights, rng,
                                 self.mode, self.fisher_samples)
    output_grads = stats_pass.backward(cots)
    moments = per_example.gradient_moments(self, stats_program, flat_params, stats_args,
                                           args_tree, cots)
    factors = self._factors(stats_program.uses, stats_pass.inputs, output_grads, moments,
                            term_weights.row_side_weights(stats_program.losses, weights))
    value = (whole.loss, whole.aux) if self.has_aux else whole.loss
    extras = {
        "loss": jax.lax.stop_gradient(whole.loss),
        **self._quadratic_model_extras(program, flat_params, flat_args, args_tree),
    }
    return value, whole.grads, Statistics(factors, self.id, extras)

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
    return arguments.align(tree, self.canonical_tree, self._param_shapes, self._paths(),
                           where, partial)

  def _check_call(self, flat_params: list[Array], args: Sequence[Any], rng: Any) -> None:
    """`est(params, *args, rng=key)`: the set-up's dtypes and arguments, a key."""
    arguments.check_call(flat_params, args, rng, self._param_shapes, self._paths(),
                         self._num_args, self.mode)

  def _paths(self) -> list[str]:
    paths = {p.index: p.path for layer in self.layers for p in layer.params}
    return [paths.get(i, f"leaf {i}") for i in range(len(self._param_shapes))]

  def _quadratic_model_extras(self, program: tracing.Program, flat_params: list[Array],
                              flat_args: list[Array], args_tree: Any) -> dict[str, Any]:
    """`"curvature"` and `"loss_at"` on the first `curvature_fraction` of the batch."""
    if self.curvature_fraction < 1.0:
      flat_args = self.programs.subset(program, flat_args, args_tree,
                                        self.curvature_fraction, "curvature_fraction")
      program = self.programs.sliced(flat_params, flat_args, args_tree, "curvature_fraction")
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
  batch_axes = arguments.batch_axes_of(batch_axes, batch_argnums, len(args))
  return Estimator(loss_fn, params, args, mode, has_aux, stats_fraction, fisher_samples,
                   overrides, weight_sharing, curvature_fraction, factor_dtype, batch_axes)
