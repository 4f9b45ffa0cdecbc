# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The whole K-FAC optimizer: `kfac`.

`scale_by_kfac` (`jkfac.preconditioner`) chained with momentum and the
learning rate, like optax's aliases: fixed, inside the KL trust region
(`jkfac.trust_region`), or chosen at each step by the quadratic model
(`jkfac.adaptive`) with Levenberg-Marquardt damping.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jkfac import linalg, options, trust_region
from jkfac import damping as damping_lib
from jkfac.adaptive import QuadraticModelState, scale_by_quadratic_model, value_at
from jkfac.estimator import Estimator
from jkfac.options import ScalarOrSchedule
from jkfac.preconditioner import ScaleByKFACState, compiled_when_eager, scale_by_kfac
from jkfac.statistics import Statistics, check_stats

Array = jax.Array


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


ADAPTIVE_DAMPING = damping_lib.ADAPTIVE_DAMPING
FIXED_DAMPING = damping_lib.FIXED_DAMPING
MAX_DAMPING = damping_lib.MAX_DAMPING


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
         skip_non_finite: bool = True,
         layer_scales_every: Optional[int] = None,
         rho_on_next_batch: bool = False) -> optax.GradientTransformationExtraArgs:
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
  faster when it is far off (`jkfac.damping.levenberg_marquardt`): up by
  `ω^-k` at the k-th rise in a row (k ≤ 2) and 10-fold at a rejected step,
  down by up to 10-fold, to where the damping and the Fisher contribute
  equally to the model's curvature along the step, while the damping
  dominates it. ρ is measured at every step of the first `damping_interval`
  steps and after a rejection, then every `damping_interval` steps; each
  measurement costs one forward pass at the new parameters (two with
  `curvature_fraction < 1`: the loss before the step too). With
  `reject_steps`, a measured step whose loss rose or is not finite is not
  taken (no step, momentum kept), λ is multiplied by at least 10 and the
  inverses are recomputed with it: a trust-region method's rejection. With
  the momentum chosen too, a step between two measurements is also checked
  (and rejected the same way) when the model fell back to the direction
  alone or chose `|μ| ≥ 1`, where it is least to be trusted. The
  inverses are also recomputed early whenever λ has moved by more than a
  factor of 2 since their last refresh. Use it as any optax optimizer,
  passing `stats=` to `update` (and, to start the factors from more than
  the first update's statistics, `jkfac.burn_in` before it).

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
    reject_steps: with `adapt_damping`, reject a measured (or checked) step
      whose loss rose or is not finite (see above). False: every step is
      taken, as in the paper.
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
    layer_scales_every: None (the default), or T: with the quadratic model,
      scale each layer's part of the K-FAC direction by a factor re-chosen
      every T updates, the minimiser of the quadratic model over the span of
      the layers' parts (one more curvature product per layer at those
      updates; `jkfac.adaptive`). For models where K-FAC's blocks misjudge
      some layers' curvature many-fold, transformers above all (a value
      projection's outputs are mixed over the sequence by attention). The
      scales are in `opt_state.quadratic_model.layer_scales`, one per layer
      of `est.layers` in order (then one per parameter no layer owns).
    rho_on_next_batch: with `adapt_damping`, λ falls (`ρ > 3/4`) only if
      the previous step also decreased this update's batch, which it was not
      chosen on, by at least a quarter of its predicted decrease:
      `(h(θ) - h(θ - δ0)) / (M(δ0) - M(0)) > 1/4`, `h` this batch's loss
      (on `curvature_fraction` of it), `δ0` the previous step and `M` the
      model it was chosen by; otherwise λ stays (one more forward pass per
      measurement, at `θ - δ0`). On its own batch a step's ρ stays near 1
      even where the step fits that batch's noise, in directions the Fisher
      calls flat (the scale of weights before a LayerNorm): λ then falls to
      its floor and the steps grow along them (a small transformer's
      parameters' norm from 60 to 130-170 in 2,000 steps, with loss
      spikes). A step that only fits noise does not decrease another
      batch's loss, and λ stays where the model's steps still generalise.
      The next batch's ρ does not steer λ alone: for short steps it
      measures the gradient's signal-to-noise ratio rather than the
      model's fit and would raise λ without end. False (the default): the
      paper's rule, on the step's own batch.

  Returns:
    An `optax.GradientTransformationExtraArgs`.
  """
  options.check_estimator(est, "kfac")
  options.check_numbers([
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
      (layer_scales_every, lambda v: v >= 1 and v == int(v), "layer_scales_every must be a "
       "positive integer or None, got {}: the updates between two choices of the layers' "
       "scales; try 10, or None for none."),
  ])
  fixed_step = learning_rate is not None and momentum is not None
  if damping is None:
    damping = FIXED_DAMPING if fixed_step else ADAPTIVE_DAMPING
  rate = options.initial_value(learning_rate) if learning_rate is not None else None
  if rate is not None and not rate >= 0:
    raise ValueError(f"learning_rate must be non-negative, got {learning_rate}: kfac "
                     "negates it itself, like optax's aliases; pass a positive step size "
                     "(e.g. 0.1), or None to choose it by the quadratic model.")
  lam = options.initial_value(damping)
  if lam is not None and not lam >= 0:
    raise ValueError(f"damping must be positive, got {damping}: it is the λ of "
                     "(F + λI), l2_reg is added to it; try 1e-3 (or 1.0, the default, "
                     "when it is adapted).")
  if nesterov and (learning_rate is None or momentum is None):
    raise ValueError("nesterov=True needs a fixed learning_rate and momentum (the "
                     "quadratic model chooses its own step): pass both, or leave "
                     "nesterov=False.")
  if layer_scales_every is not None and learning_rate is not None and momentum is not None:
    raise ValueError("layer_scales_every chooses the layers' scales by the quadratic model: "
                     "leave learning_rate or momentum as None to use it.")
  if gamma_interval is not None and learning_rate is not None and momentum is not None:
    raise ValueError("gamma_interval re-chooses γ by the quadratic model: leave "
                     "learning_rate or momentum as None to use it.")
  preconditioner = scale_by_kfac(est, damping=damping_lib.with_l2(damping, l2_reg), decay=decay,
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
        optax.trace(decay=momentum, nesterov=nesterov) if options.python_number(momentum) != 0
        else optax.identity(),
        optax.scale_by_learning_rate(learning_rate))
    if clip is not None:  # the trust region reads the gradient Δ came from
      fixed = _passing_grads(fixed)
    return compiled_when_eager(_zero_step_if_not_finite(fixed) if skip_non_finite else fixed)
  adapting = adapt_damping and not callable(damping)
  model = scale_by_quadratic_model(est, damping, l2_reg, learning_rate, momentum, axis_name,
                                   layer_scales_every)
  zero = lambda: jnp.zeros([], jnp.int32)

  def init_fn(params: Any) -> KFACState:
    lam = value_at(damping, jnp.zeros([], jnp.int32)).astype(est.factor_dtype)
    return KFACState(preconditioner.init(params), model.init(params), lam,
                     jnp.full([], jnp.nan, est.factor_dtype), jnp.sqrt(lam + l2_reg),
                     zero(), zero(), jnp.full([], damping_interval, jnp.int32))

  def update_fn(grads: Any, state: KFACState, params: Any = None, *,
                stats: Optional[Statistics] = None, **extra_args):
    options.check_state(state, KFACState, "kfac.update")
    check_stats(stats, est, state.preconditioner.factors)
    if adapting and params is None:
      raise ValueError("kfac adapts its damping from the loss at the new parameters: "
                       "call tx.update(grads, opt_state, params, stats=stats) with params.")
    lam = state.damping if adapting else None
    count = state.preconditioner.count

    def candidate(damping_now, refresh_now):  # γ² = damping_now
      refresh_now = refresh_now | damping_lib.drifted(damping_now, state.preconditioner.damping)
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
        gammas = damping_lib.candidates(state.gamma, gamma_interval)
        outs = [candidate(gamma ** 2, True) for gamma in gammas]
        changes = jnp.stack([o[2].predicted_change for o in outs])
        best = jnp.argmin(jnp.where(jnp.isfinite(changes), changes, jnp.inf))
        pick = lambda *xs: jnp.where(best == 0, xs[0], jnp.where(best == 1, xs[1], xs[2]))
        chosen = jax.tree.map(pick, *outs)
        return chosen, pick(*gammas)

      (step, first, second), gamma = jax.lax.cond(
          (count + 1) % gamma_interval == 0, rechoose,
          lambda _: (candidate(state.gamma ** 2, False), state.gamma), None)
    if not adapting:
      return step, state._replace(preconditioner=first, quadratic_model=second, gamma=gamma)

    probing = count < state.measure_until
    measured = probing | ((count + 1) % damping_interval == 0)

    loss_at = stats.extras["loss_at"]
    loss_here = lambda: (stats.extras["loss"] if est.curvature_fraction == 1.0
                         else loss_at(params))

    def change_between(before, after):  # on the examples the quadratic model was built on
      change = after().astype(est.factor_dtype) - before().astype(est.factor_dtype)
      return change if axis_name is None else jax.lax.pmean(change, axis_name)

    def measure(_):  # this step on its own batch
      return change_between(loss_here, lambda: loss_at(optax.apply_updates(params, step)))

    def measure_previous(_):  # the previous step on this batch
      view, flat = est.align(params, "kfac.update(params)", partial=True)
      held = [i for i, p in enumerate(flat) if p is not None]
      before = view.rebuild({i: flat[i] - d for i, d in zip(
          held, state.quadratic_model.previous_update)})
      return change_between(lambda: loss_at(before), loss_here)

    checked = measured
    if reject_steps and momentum is None:
      # A step the model did not choose in its plane (it fell back to the direction
      # alone) or whose momentum reverses or exceeds the whole previous update is
      # checked too: on small batches those are where the model is least to be
      # trusted, and one of them can throw the parameters far off between two
      # measurements. Only a rejection adapts λ there.
      checked = measured | ((count > 0) & ((second.momentum == 0)
                                           | (jnp.abs(second.momentum) >= 1)))
    nothing = lambda *_: jnp.full([], jnp.nan, est.factor_dtype)
    change = jax.lax.cond(checked, measure, nothing, None)
    rho = change / second.predicted_change
    rejected = checked & (~jnp.isfinite(change) | (change > 0)) & reject_steps
    may_fall = True
    if rho_on_next_batch:
      # λ falls only if the previous step, when it was taken (not at the
      # first update, not after a rejection), also decreased this batch's loss.
      taken = (count > 0) & (state.measure_until != count + damping_interval)
      fresh = (jax.lax.cond(measured & taken, measure_previous, nothing, None)
               / state.quadratic_model.predicted_change)
      may_fall = ~taken | (fresh > 0.25)
    new_lam, streak = damping_lib.adapt(lam, state.damping_streak, rho, rejected,
                                        measured | rejected, probing, damping_interval,
                                        second.damping_share, min_damping, may_fall)
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

  return compiled_when_eager(optax.GradientTransformationExtraArgs(init_fn, update_fn))


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
