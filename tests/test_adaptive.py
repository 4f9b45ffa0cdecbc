"""Curvature products and the quadratic-model learning rate and momentum."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import brute_force as bf
import jkfac
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
