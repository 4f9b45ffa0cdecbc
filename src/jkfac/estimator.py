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
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jkfac import blocks, interpret, losses, tracing, tridiagonal
from jkfac.blocks import dense

Array = jax.Array
MODES = ("fisher", "empirical", "exact")
_ids = itertools.count()


@jax.tree_util.register_pytree_node_class
class Statistics:
  """One batch's curvature statistics, as returned by `est`.

  Attributes:
    factors: layer name -> that layer's factors for this batch.
    estimator_id: which estimator made them (static, checked by the transform).
    extras: anything else a transform needs, keyed by name:
      `"curvature"`, a `jax.tree_util.Partial` taking a list of vectors
      (pytrees shaped as the parameters) and returning their Gram matrix
      `v_i^T F v_j` under the exact Fisher of the batch; `"loss_at"`, a
      `Partial` giving the loss at other parameters, both on the batch's
      first `curvature_fraction` (the whole batch by default, as in K-FAC
      section 7); and `"loss"`, the batch's loss.
  """

  def __init__(self, factors: dict[str, dict[str, Array]], estimator_id: int,
               extras: Optional[dict[str, Any]] = None):
    self.factors = factors
    self.estimator_id = estimator_id
    self.extras = {} if extras is None else extras

  def tree_flatten(self):
    return (self.factors, self.extras), self.estimator_id

  @classmethod
  def tree_unflatten(cls, estimator_id, children):
    return cls(children[0], estimator_id, children[1])

  def __repr__(self) -> str:
    shapes = jax.tree_util.tree_map(lambda x: tuple(x.shape), self.factors)
    return f"Statistics(estimator={self.estimator_id}, factors={shapes})"


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
               curvature_fraction: float = 1.0, factor_dtype: Any = None):
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
    self.id = next(_ids)
    leaves, self.params_tree = jax.tree_util.tree_flatten(params)
    self._param_shapes = [(tuple(jnp.shape(x)), jnp.result_type(x)) for x in leaves]
    inexact = [d for _, d in self._param_shapes if jnp.issubdtype(d, jnp.inexact)]
    self.factor_dtype = resolve_factor_dtype(factor_dtype, inexact)
    self._programs: dict[Any, tracing.Program] = {}
    program = tracing.trace(loss_fn, params, args, has_aux, overrides=self.overrides,
                            weight_sharing=weight_sharing)
    _check_nonempty(program)
    flat_args, args_tree = jax.tree_util.tree_flatten(tuple(args))
    self._programs[_signature(leaves, flat_args, args_tree)] = program
    self.layers = program.layers
    self.uses = program.uses
    self.losses = program.losses
    self.chains: tuple[tuple[int, ...], ...] = ()
    self._compiled = jax.jit(self._evaluate)

  # --- the pure function -------------------------------------------------

  def __call__(self, params: Any, *args: Any, rng: Optional[Array] = None):
    """Returns `(loss, grads, stats)` (`((loss, aux), grads, stats)` with has_aux).

    Args:
      params: the parameters, with the structure given at set-up.
      *args: the other arguments of the loss function (the batch).
      rng: a PRNG key; required in mode `"fisher"` (targets are sampled).

    Returns:
      The loss (and aux), its gradient with the structure of `params`, and
      this batch's `Statistics`.
    """
    flat_params = self.check_params(params, "est(params, ...)")
    self._check_call(flat_params, args, rng)
    if _all_concrete_arrays((params, args, rng)):
      # Called outside jit: one compiled program rather than every operation
      # dispatched on its own (tens of times faster on small models).
      return self._compiled(params, *args, rng=rng)
    return self._evaluate(params, *args, rng=rng)

  def _evaluate(self, params: Any, *args: Any, rng: Optional[Array] = None):
    """`__call__` after its checks, traceable."""
    flat_params = jax.tree_util.tree_leaves(params)
    flat_args, args_tree = jax.tree_util.tree_flatten(tuple(args))
    program = self._program(flat_params, flat_args, args_tree)
    (loss, aux), grads, inputs, preds, targets, backward = self._forward(
        program, flat_params, flat_args, with_grads=True)
    stats_program, stats_args = program, flat_args
    if self.stats_fraction < 1.0:
      stats_args = self._subset(program, flat_args, self.stats_fraction, "stats_fraction")
      stats_program = self._program(flat_params, stats_args, args_tree)
      _, _, inputs, preds, targets, backward = self._forward(
          stats_program, flat_params, stats_args, with_grads=False)
    cotangents = self._cotangents(stats_program, preds, targets, rng)
    output_grads = backward(cotangents)
    moments = self._gradient_moments(stats_program, flat_params, stats_args, args_tree,
                                     cotangents)
    factors = self._factors(stats_program.uses, inputs, output_grads, moments)
    grads = jax.tree_util.tree_unflatten(self.params_tree, grads)
    value = (loss, aux) if self.has_aux else loss
    extras = {
        "loss": jax.lax.stop_gradient(loss),
        **self._quadratic_model_extras(program, flat_params, flat_args, args_tree),
    }
    return value, grads, Statistics(factors, self.id, extras)

  def _factors(self, uses: Sequence[tuple[tracing.Use, ...]], inputs: dict[int, Array],
               output_grads: dict[int, Array], moments: dict[str, Array]
               ) -> dict[str, dict[str, Array]]:
    """Every block's statistics, and the chains' cross moments when requested."""
    factors = {}
    for layer, layer_uses in zip(self.layers, uses):
      captures = blocks.Captures(
          uses=layer_uses,
          inputs=[inputs[u.id] for u in layer_uses],
          output_grads=[output_grads[u.id] for u in layer_uses],
          gradient_moment=moments.get(layer.name),
          dtype=self.factor_dtype)
      factors[layer.name] = blocks.for_layer(layer).statistics(layer, captures)
    for chain in self.chains:
      for i, j in zip(chain[:-1], chain[1:]):
        ids = [uses[i][0].id, uses[j][0].id]
        factors[self.layers[i].name].update(tridiagonal.cross_moments(
            self.layers[i], self.layers[j], [inputs[k] for k in ids],
            [output_grads[k] for k in ids], self.factor_dtype))
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
    return self.chains

  def _loss_at(self, program: tracing.Program, flat_args: list[Array], params: Any) -> Array:
    """The loss of this batch at other parameters (one forward pass)."""
    flat_params = self.check_params(params, "the loss at new parameters")
    result = interpret.run(program.plan, list(flat_params) + list(flat_args), {})
    out = jax.tree_util.tree_unflatten(program.out_tree, result.outputs)
    return out[0] if self.has_aux else out

  def _forward(self, program: tracing.Program, flat_params: list[Array],
               flat_args: list[Array], with_grads: bool):
    """One forward pass; returns its outputs, captures and backward functions."""
    perturbations = {u.id: jnp.zeros(u.out_shape, self.factor_dtype)
                     for uses in program.uses for u in uses}

    def forward(p, perts):
      result = interpret.run(program.plan, list(p) + list(flat_args), perts)
      out = jax.tree_util.tree_unflatten(program.out_tree, result.outputs)
      loss, aux = out if self.has_aux else (out, None)
      preds = [result.predictions[l.id][0] for l in program.losses]
      targets = [result.predictions[l.id][1] for l in program.losses]
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
        return jax.tree_util.tree_map(lambda g: g[None], pullback([c[0] for c in cotangents]))
      return jax.vmap(pullback)(cotangents)

    return (loss, aux), grads, inputs, preds, targets, backward

  def _cotangents(self, program: tracing.Program, preds: list[Array],
                  targets: list[Array], rng: Optional[Array]) -> list[Array]:
    """Per loss, the curvature pass's cotangents, shape `(K, *prediction)`."""
    cots = []
    for index, (loss, pred, target) in enumerate(zip(program.losses, preds, targets)):
      dist = losses.DISTRIBUTIONS[loss.distribution]
      pred = jax.lax.stop_gradient(pred)
      scale = math.sqrt(loss.weight / loss.num_examples)
      if self.mode == "empirical":
        cot = dist.nll_grad(pred, target)[None]
      elif self.mode == "exact":
        cot = dist.fisher_sqrt(pred)
      else:
        keys = jax.random.split(jax.random.fold_in(rng, index), self.fisher_samples)
        cot = jax.vmap(lambda k: dist.nll_grad(pred, dist.sample(k, pred)))(keys)
        scale /= math.sqrt(self.fisher_samples)
      cots.append((scale * cot).astype(pred.dtype))
    if self.mode == "exact" and len(cots) > 1:  # one backward pass per column, per loss
      total = sum(c.shape[0] for c in cots)
      offsets = itertools.accumulate([0] + [c.shape[0] for c in cots])
      cots = [jnp.zeros((total,) + c.shape[1:], c.dtype).at[o:o + c.shape[0]].set(c)
              for c, o in zip(cots, offsets)]
    return cots

  def _curvature_gram(self, program: tracing.Program,
                      flat_params: list[Array], flat_args: list[Array],
                      vectors: Sequence[Any]) -> Array:
    """`M[i, j] = v_i^T F v_j` for the exact Fisher of this batch's mean loss.

    F is the Fisher (equal to the generalised Gauss-Newton matrix for these
    losses) of the registered predictive distributions, `J^T H J` averaged
    over examples and weighted as the losses are: one linearisation of the
    network's predictions, one forward-mode product per vector, never a
    matrix formed (K-FAC section 7).

    Args:
      program: the traced program of this batch's shapes.
      flat_params: the parameters' leaves.
      flat_args: the batch's leaves.
      vectors: pytrees with the parameters' structure.

    Returns:
      The Gram matrix, shape `(len(vectors), len(vectors))`, factor dtype.
    """
    def predictions(p):
      result = interpret.run(program.plan, list(p) + list(flat_args), {})
      return [result.predictions[l.id][0] for l in program.losses]

    preds, linear = jax.linearize(predictions, list(flat_params))
    # With parameters of a narrower range than float32 (float16), each vector
    # is divided by a power of two near its largest entry before the product
    # runs in the parameters' dtype, so that a long direction does not
    # overflow (exact: the product is linear); the Gram matrix is scaled back
    # in the factor dtype.
    narrow = any(jnp.issubdtype(p.dtype, jnp.floating)
                 and jnp.finfo(p.dtype).max < jnp.finfo(jnp.float32).max for p in flat_params)
    tangents, scales = [], []
    for v in vectors:
      leaves = self.check_params(v, "the curvature product's vector")
      power = jnp.ones([], self.factor_dtype)
      if narrow:
        peak = [jnp.max(jnp.abs(t)).astype(self.factor_dtype) for t in leaves if jnp.size(t)]
        _, exponent = jnp.frexp(jnp.max(jnp.stack(peak)) if peak else jnp.zeros([]))
        power = jnp.ldexp(power, exponent)
        leaves = [t.astype(self.factor_dtype) / power for t in leaves]
      scales.append(power)
      tangents.append(linear([t.astype(p.dtype) for t, p in zip(leaves, flat_params)]))
    size = len(vectors)
    gram = jnp.zeros((size, size), self.factor_dtype)
    for index, (loss, pred) in enumerate(zip(program.losses, preds)):
      dist = losses.DISTRIBUTIONS[loss.distribution]
      scale = loss.weight / loss.num_examples
      products = [dist.fisher_product(pred, t[index]) for t in tangents]
      rows = [[jnp.vdot(t[index].astype(self.factor_dtype), h.astype(self.factor_dtype))
               for h in products] for t in tangents]
      gram = gram + scale * jnp.array(rows, self.factor_dtype)
    scales = jnp.stack(scales)
    gram = gram * scales[:, None] * scales[None, :]
    return 0.5 * (gram + gram.T)

  def _gradient_moments(self, program: tracing.Program, flat_params: list[Array],
                        flat_args: list[Array], args_tree: Any,
                        cotangents: list[Array]) -> dict[str, Array]:
    """Per layer whose block needs them, sums of per-example gradient moments.

    Each example is differentiated on its own (a program traced for one
    example, vmapped over the batch), with the curvature pass's cotangents,
    with respect to those layers' parameters only.
    """
    layers = [l for l in self.layers if blocks.for_layer(l).needs == "per_example_gradients"]
    if not layers:
      return {}
    indices = [p.index for layer in layers for p in layer.params]
    n = _batch_size(program, f"the {layers[0].kind} block of {layers[0].name!r}")
    batched = [jnp.ndim(a) >= 1 and jnp.shape(a)[0] == n for a in flat_args]
    if not any(batched):
      names = ", ".join(repr(l.name) for l in layers)
      raise ValueError(
          f"The per-example gradients of the {layers[0].kind} block(s) of {names} need the "
          f"examples on the leading axis of the losses' predictions and of the batch "
          f"arguments, but the predictions' leading axis has size {n} and no argument of "
          "the loss function has that leading size (a vmapped ensemble whose outputs are "
          "(members, batch, ...), say). Put the batch axis first in the predictions "
          "(jax.vmap(..., out_axes=1) for an ensemble), or give these parameters another "
          f"block: jkfac.estimator(..., overrides={{{layers[0].name!r}: 'none'}}).")
    unit_args = [a[:1] if b else a for a, b in zip(flat_args, batched)]
    unit = self._program(flat_params, unit_args, args_tree)

    def one_example(example_args, example_cots):
      def predictions(chosen):
        full = list(flat_params)
        for i, value in zip(indices, chosen):
          full[i] = value
        result = interpret.run(unit.plan, full + list(example_args), {})
        return [result.predictions[l.id][0] for l in unit.losses]

      _, vjp_fn = jax.vjp(predictions, [flat_params[i] for i in indices])
      per_pass = dict(zip(indices, jax.vmap(lambda c: vjp_fn(c)[0])(example_cots)))
      return [blocks.for_layer(l).gradient_moment([per_pass[p.index] for p in l.params],
                                                 self.factor_dtype) for l in layers]

    split_args = [a[:, None] if b else a for a, b in zip(flat_args, batched)]
    split_cots = [jnp.moveaxis(c, 1, 0)[:, :, None] for c in cotangents]
    per_example = jax.vmap(one_example, in_axes=([0 if b else None for b in batched], 0))(
        split_args, split_cots)
    return {l.name: jnp.sum(m, axis=0) for l, m in zip(layers, per_example)}

  # --- helpers --------------------------------------------------------------

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
    leaves, tree = jax.tree_util.tree_flatten(params)
    if tree != self.params_tree:
      raise ValueError(
          f"{where}: the pytree does not match the parameters the estimator was "
          f"built with.\n  expected: {self.params_tree}\n  got:      {tree}\n"
          "Pass the same parameter structure as to jkfac.estimator, or build a new "
          "estimator for the new model.")
    for leaf, (shape, _), layer_path in zip(leaves, self._param_shapes, self._paths()):
      if tuple(jnp.shape(leaf)) != shape:
        raise ValueError(f"{where}: parameter {layer_path!r} has shape "
                         f"{tuple(jnp.shape(leaf))}, the estimator expects {shape}. Pass "
                         "arrays shaped as the parameters given to jkfac.estimator, or "
                         "build a new estimator for the new shapes.")
    return leaves

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
      params = jax.tree_util.tree_unflatten(self.params_tree, [_shape(x) for x in flat_params])
      args = jax.tree_util.tree_unflatten(args_tree, [_shape(x) for x in flat_args])
      self._programs[key] = tracing.trace(self.loss_fn, params, args, self.has_aux,
                                          reference=self.layers, overrides=self.overrides,
                                          weight_sharing=self.weight_sharing)
      _check_nonempty(self._programs[key])
    return self._programs[key]

  def _quadratic_model_extras(self, program: tracing.Program, flat_params: list[Array],
                              flat_args: list[Array], args_tree: Any) -> dict[str, Any]:
    """`"curvature"` and `"loss_at"` on the first `curvature_fraction` of the batch."""
    if self.curvature_fraction < 1.0:
      flat_args = self._subset(program, flat_args, self.curvature_fraction,
                               "curvature_fraction")
      program = self._program(flat_params, flat_args, args_tree)
    return {
        "curvature": jax.tree_util.Partial(functools.partial(self._curvature_gram, program),
                                           flat_params, flat_args),
        "loss_at": jax.tree_util.Partial(functools.partial(self._loss_at, program), flat_args),
    }

  def _subset(self, program: tracing.Program, flat_args: list[Array], fraction: float,
              option: str) -> list[Array]:
    """The first `fraction` of the batch (arguments with the batch's leading size)."""
    n = _batch_size(program, option)
    m = max(1, int(round(n * fraction)))
    return [a[:m] if jnp.ndim(a) >= 1 and jnp.shape(a)[0] == n else a for a in flat_args]

  def table(self) -> str:
    """The layer table: what every parameter is, and its factor shapes.

    Returns:
      Printable text: one row per layer (index, name, block kind, parameters,
      factors, how it was found), then the losses, the parameters left to
      the diagonal fallback block, and the block-tridiagonal chains if any.
    """
    rows = [("#", "layer", "kind", "parameters", "factors", "how")]
    for i, layer in enumerate(self.layers):
      params = ", ".join(f"{p.role or 'param'} {p.shape}" for p in layer.params)
      rows.append((str(i), layer.name, layer.kind, params,
                   blocks.for_layer(layer).describe(layer), layer.note))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [f"jkfac estimator (mode={self.mode!r}): {len(self.layers)} layers, "
             f"{len(self.losses)} loss(es)"]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()
              for r in rows]
    for loss in self.losses:
      lines.append(f"  loss: {loss.distribution}, prediction {loss.prediction_shape}, "
                   f"weight {loss.weight:g}")
    fallback = [l for l in self.layers if l.kind == "diagonal"]
    if fallback:
      lines.append("  parameters left to the diagonal fallback block:")
      lines += [f"    {l.name} {l.params[0].shape}: {l.note}" for l in fallback]
    else:
      lines.append("  no parameter is left to a fallback block.")
    if self.chains:
      lines.append(tridiagonal.describe(self.layers, self.chains))
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.table()

  def __repr__(self) -> str:
    return self.table()


def _all_concrete_arrays(tree: Any) -> bool:
  """Whether every leaf is a concrete array (no tracer, no Python value to keep static)."""
  return all(isinstance(x, (jax.Array, np.ndarray)) and not isinstance(x, jax.core.Tracer)
             for x in jax.tree_util.tree_leaves(tree))


def _shape(x: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))


def _signature(flat_params: Sequence[Any], flat_args: Sequence[Any], args_tree: Any) -> Any:
  avals = tuple((tuple(jnp.shape(x)), str(jnp.result_type(x)))
                for x in list(flat_params) + list(flat_args))
  return avals, args_tree


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


def _batch_size(program: tracing.Program, what: str) -> int:
  sizes = {loss.prediction_shape[0] for loss in program.losses}
  if len(sizes) != 1:
    raise ValueError(f"{what} needs one batch size, but the losses' predictions have "
                     f"leading dimensions {sorted(sizes)}. Give every loss one "
                     "prediction per example of the batch (the same leading size).")
  return sizes.pop()


def estimator(loss_fn: Callable[..., Any], params: Any, *args: Any, mode: str = "fisher",
              has_aux: bool = False, stats_fraction: float = 1.0,
              fisher_samples: int = 1,
              overrides: Optional[dict[str, str]] = None,
              weight_sharing: str = "expand",
              curvature_fraction: float = 1.0,
              factor_dtype: Any = None) -> Estimator:
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
      fraction (the paper uses 1/8). Arguments whose leading axis is the batch
      size are sliced.
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

  Returns:
    The estimator: call it as `est(params, *args, rng=key)`; `print(est)`
    shows the layer table.
  """
  return Estimator(loss_fn, params, args, mode, has_aux, stats_fraction, fisher_samples,
                   overrides, weight_sharing, curvature_fraction, factor_dtype)
