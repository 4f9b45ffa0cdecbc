"""Curvature products and the quadratic-model learning rate and momentum."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import brute_force as bf
import jkfac
from test_scan import _ONCE  # in the newest-JAX suite only (CI time)
from jkfac import adaptive

KEY = jax.random.PRNGKey(0)
SIZES = (3, 5, 4)


def _exact_fisher(params, x, distribution):
  """F = mean_n J_n^T H_n J_n over the flattened parameters, densely."""
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  total = 0.0
  for n in range(x.shape[0]):
    jac = jax.jacobian(lambda f: bf.mlp_forward(unravel(f), x[n:n + 1])[0])(flat)
    z = bf.mlp_forward(params, x[n:n + 1])[0]
    total = total + jac.T @ bf.output_fisher(distribution, z) @ jac
  return total / x.shape[0], unravel


@pytest.mark.parametrize("distribution,stats_fraction", [
    ("categorical", 1.0), ("bernoulli", 1.0), ("gaussian", 1.0), ("categorical", 0.25)])
def test_curvature_products_equal_the_dense_exact_fisher(distribution, stats_fraction):
  # with stats_fraction < 1 the factors use a subset, the products the whole batch
  params = bf.mlp_params(KEY, SIZES)
  x, labels = bf.classification_data(8, SIZES[0], SIZES[-1])
  losses = {
      "categorical": (bf.ce_loss, labels),
      "bernoulli": (lambda p, x, t: jkfac.sigmoid_cross_entropy(bf.mlp_forward(p, x), t),
                    jax.nn.one_hot(labels, SIZES[-1], dtype=jnp.float64)),
      "gaussian": (lambda p, x, t: jkfac.squared_error(bf.mlp_forward(p, x), t),
                   jnp.zeros((8, SIZES[-1]), jnp.float64)),
  }
  loss_fn, targets = losses[distribution]
  est = jkfac.estimator(loss_fn, params, x, targets, stats_fraction=stats_fraction)
  _, _, stats = est(params, x, targets, rng=KEY)
  fisher, unravel = _exact_fisher(params, x, distribution)
  vectors = [unravel(jax.random.normal(jax.random.PRNGKey(i), (fisher.shape[0],), jnp.float64))
             for i in range(3)]
  gram = stats.extras["curvature"](vectors)
  flat = jnp.stack([jax.flatten_util.ravel_pytree(v)[0] for v in vectors])
  np.testing.assert_allclose(gram, flat @ fisher @ flat.T, rtol=1e-10, atol=1e-12)


def test_two_dimensional_solve_matches_brute_force():
  key1, key2 = jax.random.split(KEY)
  m = jax.random.normal(key1, (2, 2), jnp.float64)
  curvature = m @ m.T + 0.1 * jnp.eye(2)
  grad_dots = jax.random.normal(key2, (2,), jnp.float64)
  alpha, mu = adaptive.solve_coefficients(curvature, grad_dots)
  grid = jnp.linspace(-20, 20, 2001)
  a, b = jnp.meshgrid(grid, grid, indexing="ij")
  model = 0.5 * (curvature[0, 0] * a ** 2 + 2 * curvature[0, 1] * a * b
                 + curvature[1, 1] * b ** 2) + grad_dots[0] * a + grad_dots[1] * b
  best = jnp.unravel_index(jnp.argmin(model), model.shape)
  np.testing.assert_allclose([alpha, mu], [grid[best[0]], grid[best[1]]], atol=0.03)
  np.testing.assert_allclose(
      [alpha, mu], jnp.linalg.solve(curvature, -grad_dots), rtol=1e-10)
  # One of them fixed: the other minimises the model along its line.
  alpha_only, mu_fixed = adaptive.solve_coefficients(curvature, grad_dots, momentum=0.5)
  assert mu_fixed == 0.5
  np.testing.assert_allclose(alpha_only, -(grad_dots[0] + 0.5 * curvature[0, 1]) / curvature[0, 0])
  # No previous update: momentum 0, the one-dimensional rule.
  first = curvature.at[1, :].set(0.0).at[:, 1].set(0.0)
  alpha1, mu1 = adaptive.solve_coefficients(first, grad_dots)
  assert mu1 == 0.0
  np.testing.assert_allclose(alpha1, -grad_dots[0] / curvature[0, 0])


def _regression():
  kx, kw = jax.random.split(KEY)
  x = jax.random.normal(kx, (50, 4), jnp.float64) * jnp.array([1.0, 2.0, 0.3, 1.0]) + 0.5
  t = x @ jax.random.normal(kw, (4, 2), jnp.float64) + 0.1
  params = {"l0": {"w": jnp.zeros((4, 2), jnp.float64), "b": jnp.zeros(2, jnp.float64)}}
  loss_fn = lambda p, x, t: jkfac.squared_error(x @ p["l0"]["w"] + p["l0"]["b"], t)
  return params, x, t, loss_fn


def test_adaptive_learning_rate_is_one_on_linear_regression():
  params, x, t, loss_fn = _regression()
  est = jkfac.estimator(loss_fn, params, x, t, mode="exact")
  tx = jkfac.kfac(est, damping=1e-20)
  state = tx.init(params)
  _, grads, stats = est(params, x, t)
  updates, state = tx.update(grads, state, params, stats=stats)
  np.testing.assert_allclose(state.quadratic_model.learning_rate, 1.0, rtol=1e-6)
  assert state.quadratic_model.momentum == 0.0
  new = optax.apply_updates(params, updates)
  # The quadratic model is exact here: its predicted change is the real one.
  np.testing.assert_allclose(loss_fn(new, x, t) - loss_fn(params, x, t),
                             state.quadratic_model.predicted_change, rtol=1e-6)
  np.testing.assert_allclose(jax.grad(loss_fn)(new, x, t)["l0"]["w"], 0.0, atol=1e-8)


def test_adaptive_kfac_trains_and_compiles_once():
  params = bf.mlp_params(KEY, SIZES, dtype=jnp.float32)
  x, y = bf.classification_data(32, SIZES[0], SIZES[-1])
  x = x.astype(jnp.float32)
  est = jkfac.estimator(bf.ce_loss, params, x, y)
  tx = jkfac.kfac(est, damping=1e-2, inverse_every=3)
  params, state, losses, traces = bf.train_jitted(est, tx, params, (x, y), 15)
  assert traces == 1
  assert losses[-1] < 0.5 * losses[0]
  assert float(state.quadratic_model.learning_rate) > 0
  assert float(state.quadratic_model.predicted_change) < 0


def _run(loss_fn, params, args, steps, **kwargs):
  est = jkfac.estimator(loss_fn, params, *args, mode="exact")
  tx = jkfac.kfac(est, damping_interval=1, inverse_every=1, **kwargs)
  state = tx.init(params)
  history = []
  for _ in range(steps):
    _, grads, stats = est(params, *args)
    updates, state = tx.update(grads, state, params, stats=stats)
    params = optax.apply_updates(params, updates)
    history.append((float(state.damping), float(state.reduction_ratio)))
  return history


def test_damping_falls_when_the_quadratic_model_is_good():
  params, x, t, loss_fn = _regression()
  history = _run(loss_fn, params, (x, t), 3, damping=1.0)
  assert all(rho > 0.75 for _, rho in history)
  assert history[-1][0] < history[0][0] < 1.0


def test_damping_rises_when_steps_are_too_long():
  params = bf.mlp_params(KEY, (3, 8, 4), scale=3.0)
  x, y = bf.classification_data(40, 3, 4)
  x = 3.0 * x
  history = _run(bf.ce_loss, params, (x, y), 6, damping=1e-6)
  assert any(rho < 0.25 for _, rho in history)
  assert history[-1][0] > 1e-6


def test_gamma_is_rechosen_every_t2_steps_by_the_best_quadratic_model():
  params = bf.mlp_params(KEY, SIZES)
  x, y = bf.classification_data(32, SIZES[0], SIZES[-1])
  est = jkfac.estimator(bf.ce_loss, params, x, y, mode="exact")
  t2, lam0 = 3, 1e-2
  tx = jkfac.kfac(est, damping=lam0, gamma_interval=t2, inverse_every=50, inverse_warmup=1)
  state = tx.init(params)
  for _ in range(t2 - 1):
    _, grads, stats = est(params, x, y)
    updates, state = tx.update(grads, state, params, stats=stats)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(state.gamma, np.sqrt(lam0))  # not re-chosen yet
  _, grads, stats = est(params, x, y)
  updates, new_state = tx.update(grads, state, params, stats=stats)

  # Brute force: each candidate's update, from the same state, with fresh inverses.
  preconditioner = jkfac.scale_by_kfac(est, damping=lam0)
  model = jkfac.scale_by_quadratic_model(est, lam0)
  omega2 = np.sqrt(19 / 20) ** t2
  candidates = [state.gamma * omega2, state.gamma, state.gamma / omega2]
  changes, steps = [], []
  for gamma in candidates:
    direction, _ = preconditioner.update(grads, state.preconditioner, params, stats=stats,
                                         damping_now=gamma ** 2, refresh_now=True)
    step, qm = model.update(direction, state.quadratic_model, params, stats=stats,
                            grads=grads, damping_now=state.damping)
    changes.append(float(qm.predicted_change))
    steps.append(step)
  best = int(np.argmin(changes))
  assert len(set(np.round(changes, 12))) == 3  # the choice is not a tie
  assert best != 1  # γ moves here (a transform that never re-chooses fails)
  np.testing.assert_allclose(new_state.gamma, candidates[best], rtol=1e-12)
  np.testing.assert_allclose(new_state.quadratic_model.predicted_change, changes[best],
                             rtol=1e-10)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14),
                         updates, steps[best])


def test_gamma_interval_needs_the_quadratic_model():
  params = bf.mlp_params(KEY, SIZES)
  x, y = bf.classification_data(8, SIZES[0], SIZES[-1])
  est = jkfac.estimator(bf.ce_loss, params, x, y)
  with pytest.raises(ValueError, match="leave learning_rate or momentum as None"):
    jkfac.kfac(est, learning_rate=0.1, momentum=0.9, gamma_interval=20)
  with pytest.raises(ValueError, match="min_damping must be positive"):
    jkfac.kfac(est, min_damping=0.0)


@pytest.mark.parametrize("curvature,grad_dots,expected", [
    # Indefinite: the plane has no minimum; α alone along the K-FAC direction.
    ([[2.0, 3.0], [3.0, 1.0]], [-1.0, 0.5], (0.5, 0.0)),
    # Positive definite but |μ| > MAX_MOMENTUM: the model is not trusted along δ0.
    ([[1.0, 0.0], [0.0, 0.01]], [-1.0, 0.1], (1.0, 0.0)),
    # Ill-conditioned (δ0 nearly parallel to Δ).
    ([[1.0, 1.0 - 1e-9], [1.0 - 1e-9, 1.0]], [-1.0, -1.0], (1.0, 0.0)),
    # No positive curvature along the direction: no step.
    ([[-1.0, 0.0], [0.0, 1.0]], [-1.0, 0.0], (0.0, 0.0)),
])
def test_the_two_dimensional_solve_falls_back_to_the_direction_alone(curvature, grad_dots,
                                                                      expected):
  alpha, mu = adaptive.solve_coefficients(jnp.array(curvature, jnp.float64),
                                          jnp.array(grad_dots, jnp.float64))
  np.testing.assert_allclose([alpha, mu], expected, rtol=1e-12)
  # The same system without the guard's reason solves the plane.
  alpha, mu = adaptive.solve_coefficients(jnp.array([[2.0, 0.5], [0.5, 1.0]], jnp.float64),
                                          jnp.array([-1.0, -0.2], jnp.float64))
  assert mu != 0.0 and abs(float(mu)) <= adaptive.MAX_MOMENTUM


def test_levenberg_marquardt_moves_fast_when_far_off():
  lm = lambda lam, streak, rho, rejected=False, measured=True, share=0.1: [
      float(v) for v in adaptive.levenberg_marquardt(
          jnp.asarray(lam), jnp.asarray(streak, jnp.int32), jnp.asarray(rho),
          jnp.asarray(rejected), jnp.asarray(measured), jnp.asarray(0.5), jnp.asarray(share))]
  assert lm(1.0, 0, 0.9) == [0.5, -1]              # down: ω
  assert lm(1.0, -1, 0.9) == [0.5, -2]             # down again: ω (the paper's rule)
  assert lm(1.0, 0, 0.1) == [2.0, 1]               # up: 1/ω
  assert lm(1.0, 1, 0.1) == [4.0, 2]               # second rise in a row: 1/ω²
  assert lm(1.0, 2, 0.1) == [4.0, 3]               # capped at ω^-MAX_STREAK
  assert lm(1.0, -3, 0.1) == [2.0, 1]              # a turn starts again at 1/ω
  assert lm(1.0, 1, 0.5) == [1.0, 0]               # ρ in [1/4, 3/4]: λ kept, streak ends
  assert lm(1.0, 0, float("nan")) == [2.0, 1]      # a non-finite ρ raises λ
  assert lm(1.0, 0, -3.0, rejected=True) == [10.0, 1]
  assert lm(1.0, 0, 0.9, measured=False) == [1.0, 0]
  # The damping dominates the curvature along the step: down to the balance
  # point λ (1 - s) / s, by at least ω and at most 10-fold.
  np.testing.assert_allclose(lm(1.0, 0, 0.9, share=0.8)[0], 0.25)
  assert lm(1.0, 0, 0.9, share=0.6)[0] == 0.5
  np.testing.assert_allclose(lm(1.0, 0, 0.9, share=0.999)[0], 0.1)
  assert lm(1.0, 0, 0.1, share=0.999)[0] == 2.0    # but only when ρ says down


def _mlp_problem():
  params = bf.mlp_params(KEY, (3, 8, 4), scale=3.0)
  x, y = bf.classification_data(40, 3, 4)
  return params, 3.0 * x, y


def test_a_step_whose_loss_rises_is_rejected_and_the_damping_raised():
  params, x, y = _mlp_problem()
  est = jkfac.estimator(bf.ce_loss, params, x, y, mode="exact")
  tx = jkfac.kfac(est, damping=1e-8, inverse_every=100)
  state = tx.init(params)
  history = []
  for _ in range(12):
    loss, grads, stats = est(params, x, y)
    updates, new_state = tx.update(grads, state, params, stats=stats)
    new_params = optax.apply_updates(params, updates)
    rejected = int(new_state.rejected_steps) - int(state.rejected_steps)
    if rejected:
      # Nothing moves: parameters and the momentum's previous update.
      jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new_params, params)
      jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
                   new_state.quadratic_model.previous_update,
                   state.quadratic_model.previous_update)
      assert float(new_state.damping) >= 10 * float(state.damping)
      assert int(new_state.measure_until) == int(state.preconditioner.count) + 1 + 5
    else:  # a step taken never raised the loss (ρ measured at every step here)
      assert float(bf.ce_loss(new_params, x, y)) <= float(loss)
    history.append((rejected, float(new_state.damping)))
    params, state = new_params, new_state
  assert sum(r for r, _ in history) >= 1  # from λ = 1e-8 the first steps are too long
  assert history[0] == (1, 1e-7)
  # The inverses follow the raised λ at once: refreshed with it at the next step.
  assert float(state.preconditioner.damping) > 1e-6


def test_a_non_finite_loss_at_the_new_parameters_is_rejected():
  params, x, y = _mlp_problem()
  # The loss is finite at the parameters and overflows beyond them.
  def loss_fn(p, x, y):
    big = jnp.where(jnp.abs(p["l0"]["w"]).max() > 100.0, jnp.inf, 0.0)
    return bf.ce_loss(p, x, y) + big
  est = jkfac.estimator(loss_fn, params, x, y, mode="exact")
  tx = jkfac.kfac(est, damping=1e-8)
  state = tx.init(params)
  _, grads, stats = est(params, x, y)
  grads = jax.tree.map(lambda g: 1e6 * g, grads)  # a step far out
  updates, state = tx.update(grads, state, params, stats=stats)
  assert int(state.rejected_steps) == 1
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("damping", [1e-4, 1e-2, 1.0, 1e2])
def test_adaptive_kfac_trains_from_any_starting_damping(damping):
  params, x, y = _mlp_problem()
  x, params = x.astype(jnp.float32), jax.tree.map(lambda a: a.astype(jnp.float32), params)
  est = jkfac.estimator(bf.ce_loss, params, x, y)
  params, state, losses, _ = bf.train_jitted(est, jkfac.kfac(est, damping=damping), params,
                                             (x, y), 30)
  assert np.all(np.isfinite(losses)) and max(losses) <= 2 * losses[0]
  assert np.mean(losses[-5:]) < 0.7 * losses[0], losses


def test_rho_is_measured_at_every_step_at_first_then_every_interval():
  params, x, y = _mlp_problem()
  est = jkfac.estimator(bf.ce_loss, params, x, y, mode="exact")
  tx = jkfac.kfac(est, damping=10.0, damping_interval=4, reject_steps=False)
  state = tx.init(params)
  measured = []
  for _ in range(12):
    _, grads, stats = est(params, x, y)
    updates, new_state = tx.update(grads, state, params, stats=stats)
    measured.append(float(new_state.reduction_ratio) != float(state.reduction_ratio)
                    or int(new_state.damping_streak) != int(state.damping_streak))
    params, state = optax.apply_updates(params, updates), new_state
  assert measured == [True] * 4 + [False, False, False, True] * 2
  assert int(state.rejected_steps) == 0


def test_damping_share_is_the_damping_part_of_the_curvature_along_the_step():
  params, x, t, loss_fn = _regression()
  est = jkfac.estimator(loss_fn, params, x, t, mode="exact")
  lam = 0.5
  tx = jkfac.kfac(est, damping=lam, adapt_damping=False)
  _, grads, stats = est(params, x, t)
  updates, state = tx.update(grads, tx.init(params), params, stats=stats)
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  model = lambda f: x @ unravel(f)["l0"]["w"] + unravel(f)["l0"]["b"]
  jac = jax.jacobian(model)(flat).reshape(-1, flat.size)  # Gaussian: F = J^T J / n
  fisher = jac.T @ jac / x.shape[0]
  step = jax.flatten_util.ravel_pytree(updates)[0]
  damped = lam * step @ step
  np.testing.assert_allclose(state.quadratic_model.damping_share,
                             damped / (step @ fisher @ step + damped), rtol=1e-10)


# --------------------------------------------------------------------------- #
# Per-layer scales of the direction (layer_scales_every)
# --------------------------------------------------------------------------- #


def test_layer_scales_minimise_the_quadratic_model_over_the_layers_parts():
  key1, key2, key3 = jax.random.split(KEY, 3)
  m = jax.random.normal(key1, (3, 3), jnp.float64)
  gram = m @ m.T
  sizes = jax.random.uniform(key2, (3,), jnp.float64, 0.5, 2.0)
  scales_true = jnp.array([0.5, 2.0, 8.0], jnp.float64)
  matrix = gram + 0.1 * jnp.diag(sizes)
  grad_dots = -matrix @ scales_true  # so that the minimiser is scales_true
  scales = adaptive.solve_layer_scales(gram, grad_dots, sizes, 0.1, jnp.ones(3))
  np.testing.assert_allclose(scales, scales_true / 2.0, rtol=1e-5)  # geometric mean 2
  # A layer whose scale would be negative keeps its previous one; the bound holds.
  grad_dots = -matrix @ jnp.array([1.0, -1.0, 4.0])
  scales = adaptive.solve_layer_scales(gram, grad_dots, sizes, 0.1, jnp.full(3, 7.0))
  assert scales[1] == 7.0
  np.testing.assert_allclose(scales[jnp.array([0, 2])], [0.5, 2.0], rtol=1e-4)
  grad_dots = -matrix @ jnp.array([1.0, 1.0, 1e5])
  scales = adaptive.solve_layer_scales(gram, grad_dots, sizes, 0.1, jnp.ones(3))
  assert scales[2] == pytest.approx(adaptive.MAX_LAYER_SCALE)  # 2154 before the bound
  assert np.all((scales[:2] > 1e-2) & (scales[:2] < 0.05))  # 0.022 each (the ridge moves them)
  # A layer with no direction at all (zero row) spoils nothing.
  gram0 = gram.at[1].set(0.0).at[:, 1].set(0.0)
  sizes0 = sizes.at[1].set(0.0)
  matrix0 = gram0 + 0.1 * jnp.diag(sizes0)
  grad_dots0 = -(matrix0 @ scales_true).at[1].set(0.0)
  scales = adaptive.solve_layer_scales(gram0, grad_dots0, sizes0, 0.1, jnp.full(3, 3.0))
  assert scales[1] == 3.0
  np.testing.assert_allclose(scales[2] / scales[0], 16.0, rtol=1e-4)


def test_layer_scaled_step_is_the_exact_quadratic_models_minimiser_over_the_layers():
  # float64, mode "exact": the step at update 0 is α Σ_l s_l Δ_l with s the
  # minimiser over the layers' parts of the model built from the dense exact
  # Fisher, and it predicts at least the decrease of the unscaled step.
  params = bf.mlp_params(KEY, SIZES)
  x, labels = bf.classification_data(8, SIZES[0], SIZES[-1])
  est = jkfac.estimator(bf.ce_loss, params, x, labels, mode="exact")
  _, grads, stats = est(params, x, labels, rng=KEY)
  fisher, unravel = _exact_fisher(params, x, "categorical")
  flat_grad = jax.flatten_util.ravel_pytree(grads)[0]
  lam = 0.1
  outs = {}
  for every in (None, 1):
    tx = jkfac.kfac(est, damping=lam, adapt_damping=False, layer_scales_every=every)
    state = tx.init(params)
    step, state = tx.update(grads, state, params, stats=stats)
    outs[every] = (jax.flatten_util.ravel_pytree(step)[0], state.quadratic_model)
  kfac_only = jkfac.scale_by_kfac(est, damping=lam)
  direction, _ = kfac_only.update(grads, kfac_only.init(params), params, stats=stats)
  # each layer's part (kernel and bias) of the direction, flattened as the Fisher is
  parts = np.stack([
      -jax.flatten_util.ravel_pytree({name: jax.tree.map(
          lambda d, keep=(name == layer): d if keep else jnp.zeros_like(d), direction[name])
          for name in direction})[0] for layer in sorted(direction)])
  direction = parts.sum(axis=0)
  matrix = parts @ (fisher + lam * np.eye(len(direction))) @ parts.T
  scales = np.linalg.solve(matrix, -parts @ flat_grad)
  scales = scales / np.exp(np.mean(np.log(scales)))
  state = outs[1][1]
  np.testing.assert_allclose(state.layer_scales, scales, rtol=1e-6)
  scaled = scales @ parts
  alpha = -(flat_grad @ scaled) / (scaled @ (fisher + lam * np.eye(len(direction))) @ scaled)
  np.testing.assert_allclose(outs[1][0], alpha * scaled, rtol=1e-6, atol=1e-12)
  assert outs[None][1].layer_scales == ()
  assert state.predicted_change < outs[None][1].predicted_change


@_ONCE  # a flax model's training; the scales' solve and step are checked in both suites
def test_layer_scales_train_a_scanned_transformer_jitted():
  from test_scan import LM, _lm_loss  # a flax transformer, blocks stacked by nn.scan
  tokens = jax.random.randint(jax.random.PRNGKey(3), (4, 6), 0, 7)
  targets = jnp.roll(tokens, -1, axis=1)
  model = LM()
  params = model.init(KEY, tokens)["params"]
  est = jkfac.estimator(_lm_loss(model), params, tokens, targets)
  tx = jkfac.kfac(est, layer_scales_every=3)
  _, state, losses, _ = bf.train_jitted(est, tx, params, (tokens, targets), 12)
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
  scales = np.asarray(state.quadratic_model.layer_scales)
  assert scales.shape == (len(est.layers),) and np.all(scales > 0)
  assert not np.allclose(scales, 1.0)


def test_layer_scales_need_the_quadratic_model():
  params = bf.mlp_params(KEY, SIZES)
  x, labels = bf.classification_data(8, SIZES[0], SIZES[-1])
  est = jkfac.estimator(bf.ce_loss, params, x, labels)
  with pytest.raises(ValueError, match="layer_scales_every chooses the layers' scales"):
    jkfac.kfac(est, learning_rate=0.1, momentum=0.9, layer_scales_every=10)
  with pytest.raises(ValueError, match="layer_scales_every must be a positive integer"):
    jkfac.kfac(est, layer_scales_every=0)


def test_a_step_the_model_cannot_vouch_for_is_checked_between_measurements(monkeypatch):
  # The model's step replaced by a short one with momentum 1 (all of the
  # previous update) at every step: each is checked (ρ measured, a loss that
  # rose rejected), not only the first 5 and then every 5th.
  real = adaptive.solve_coefficients

  def momentum_one(curvature, grad_dots, learning_rate=None, momentum=None):
    alpha, _ = real(curvature, grad_dots, learning_rate, momentum)
    return 0.01 * alpha, jnp.where(curvature[1, 1] > 0, 1.0, 0.0)

  monkeypatch.setattr(adaptive, "solve_coefficients", momentum_one)
  params, x, t = _mlp_problem()
  est = jkfac.estimator(bf.ce_loss, params, x, t, mode="exact")
  tx = jkfac.kfac(est, damping=1e-3, damping_interval=5, inverse_every=1)
  state = tx.init(params)
  ratios = []
  for _ in range(9):  # regularly measured: the first 5 steps, then the 10th
    _, grads, stats = est(params, x, t)
    updates, state = tx.update(grads, state, params, stats=stats)
    params = optax.apply_updates(params, updates)
    ratios.append(float(state.reduction_ratio))
  assert int(state.rejected_steps) == 0
  assert np.all(np.diff(ratios) != 0), ratios  # a new ρ at every step


# --------------------------------------------------------------------------- #
# λ's rule checked on the next batch (rho_on_next_batch)
# --------------------------------------------------------------------------- #


def _damping_history(batches, steps, **kwargs):
  """λ after each of `steps` updates of the regression, cycling through `batches`."""
  params, x, t, loss_fn = _regression()
  est = jkfac.estimator(loss_fn, params, x, t, mode="exact")
  tx = jkfac.kfac(est, damping=1.0, damping_interval=1, inverse_every=1, **kwargs)
  state, history, pairs = tx.init(params), [], batches(x, t)
  for k in range(steps):
    _, grads, stats = est(params, *pairs[k % len(pairs)])
    updates, state = tx.update(grads, state, params, stats=stats)
    params = optax.apply_updates(params, updates)
    history.append(float(state.damping))
  return history, int(state.rejected_steps)


def test_rho_on_next_batch_is_the_papers_rule_when_the_batches_agree():
  # One batch throughout: the previous step decreases the next batch's loss as
  # much as predicted, so λ moves exactly as by the paper's rule.
  same = lambda x, t: [(x, t)]
  paper, _ = _damping_history(same, 6)
  checked, _ = _damping_history(same, 6, rho_on_next_batch=True)
  assert paper[-1] < 0.5  # λ falls here (a rule that never lets it fall fails)
  np.testing.assert_allclose(checked, paper, rtol=1e-12)


def test_rho_on_next_batch_keeps_damping_where_steps_do_not_generalise():
  # Two batches with opposite targets: each step fits its own batch (ρ ≈ 1
  # there, λ falls by the paper's rule) and raises the other's loss.
  opposite = lambda x, t: [(x, t), (x, -t)]
  paper, _ = _damping_history(opposite, 6)
  checked, rejected = _damping_history(opposite, 6, rho_on_next_batch=True)
  assert np.all(np.diff(paper) < 0) and paper[-1] < 0.8, paper
  assert rejected == 0 and checked[0] < 1.0  # the first update has no previous step
  assert checked[1:] == [checked[0]] * 5, checked


@_ONCE  # a flax model's training; the rule itself is checked in both suites
def test_rho_on_next_batch_trains_a_scanned_transformer_jitted():
  from test_scan import LM, _lm_loss  # a flax transformer, blocks stacked by nn.scan
  tokens = jax.random.randint(jax.random.PRNGKey(3), (4, 6), 0, 7)
  targets = jnp.roll(tokens, -1, axis=1)
  model = LM()
  params = model.init(KEY, tokens)["params"]
  est = jkfac.estimator(_lm_loss(model), params, tokens, targets, curvature_fraction=0.5)
  tx = jkfac.kfac(est, rho_on_next_batch=True)
  _, _, losses, traces = bf.train_jitted(est, tx, params, (tokens, targets), 12)
  assert traces == 1
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
