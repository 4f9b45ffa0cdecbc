"""SINGD (overrides "singd"): inverse-free factors against their dense formulas and K-FAC's inverse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brute_force as bf
import jkfac
from jkfac.blocks import singd
from test_conv import CASES, _kernel_matrix, _setup
from test_scan import _ONCE  # in the newest-JAX suite only (CI time)

KEY = jax.random.PRNGKey(0)
SIZES = (3, 5, 4)
N = 16


def _damped(a, g, lam):
  """Factored Tikhonov: `A + π√λ I`, `G + √λ/π I`."""
  pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
  return a + pi * np.sqrt(lam) * np.eye(len(a)), g + np.sqrt(lam) / pi * np.eye(len(g))


def _numpy_step(k, c, m_k, m_c, a, g, lam, rate, alpha=singd.MOMENTUM):
  """The IKFAC/SINGD update written out in numpy, on the damped factors."""
  d_k, d_c = len(k), len(c)
  a, g = _damped(a, g, lam)
  h_k, h_c = k.T @ a @ k, c.T @ g @ c
  m_k = alpha * m_k + (1 - alpha) / 2 * (np.trace(h_c) / d_c * h_k - np.eye(d_k))
  m_c = alpha * m_c + (1 - alpha) / 2 * (np.trace(h_k) / d_k * h_c - np.eye(d_c))
  k = k @ (np.eye(d_k) - rate / max(1.0, np.linalg.norm(m_k)) * m_k)
  c = c @ (np.eye(d_c) - rate / max(1.0, np.linalg.norm(m_c)) * m_c)
  return k, c, m_k, m_c


def test_updates_equal_the_dense_formulas():
  params = bf.mlp_params(KEY, SIZES)
  x, y = bf.classification_data(N, SIZES[0], SIZES[-1])
  est = jkfac.estimator(bf.ce_loss, params, x, y, overrides={"*": "singd"})
  assert [(l.kind, l.block) for l in est.layers] == [("dense", "singd")] * 2
  assert "SINGD (inverse-free): A 4x4, G 5x5" in str(est)
  lam, decay = 0.3, 0.8
  tx = jkfac.scale_by_kfac(est, damping=lam, decay=decay)
  state = tx.init(params)
  expected = {name: [np.eye(len(a)), np.eye(len(g)), np.zeros((len(a),) * 2),
                     np.zeros((len(g),) * 2)]
              for name, a, g in (("l0", [0] * 4, [0] * 5), ("l1", [0] * 6, [0] * 4))}
  for step in range(3):  # the factors move at every update; a batch of its own each
    _, grads, stats = est(params, x, y, rng=jax.random.PRNGKey(step))
    updates, state = tx.update(grads, state, params, stats=stats)
    for name in ("l0", "l1"):
      factors = stats.factors[name]
      expected[name] = list(_numpy_step(*expected[name], np.asarray(factors["A"]),
                                        np.asarray(factors["G"]), lam, 1 - decay))
      k, c = expected[name][:2]
      np.testing.assert_allclose(state.inverses[name]["K"] + np.eye(len(k)), k, rtol=1e-10,
                                 atol=1e-13)
      np.testing.assert_allclose(state.inverses[name]["C"] + np.eye(len(c)), c, rtol=1e-10,
                                 atol=1e-13)
      v = np.concatenate([grads[name]["w"], grads[name]["b"][None]], axis=0)
      u = k @ k.T @ v @ c @ c.T
      np.testing.assert_allclose(updates[name]["w"], u[:-1], rtol=1e-9, atol=1e-13)
      np.testing.assert_allclose(updates[name]["b"], u[-1], rtol=1e-9, atol=1e-13)
  assert state.factors == {"l0": {}, "l1": {}}  # nothing averaged, nothing inverted


@pytest.mark.parametrize("lam", [0.0, 1e-3])
def test_the_fixed_point_is_kfacs_damped_inverse_without_an_inverse(lam):
  """With constant factors, K K^T ⊗ C C^T converges to (A + π√λ I)^{-1} ⊗ (G + √λ/π I)^{-1},
  also for a singular A (an input that is always 0), once damped."""
  ka, kg = jax.random.split(KEY)
  a = jax.random.normal(ka, (4, 12), jnp.float64).at[0].set(0.0 if lam else 1.0)
  g = jax.random.normal(kg, (3, 9), jnp.float64)
  a, g = _damped(np.asarray(a @ a.T / 12), 1e-3 * np.asarray(g @ g.T / 9), lam)  # G ≪ A

  def body(_, state):
    return singd.factor_step(*state, jnp.asarray(a), jnp.asarray(g), 0.5)

  start = (jnp.eye(4), jnp.eye(3), jnp.zeros((4, 4)), jnp.zeros((3, 3)))
  k, c, m_k, m_c = jax.lax.fori_loop(0, 3000, body, start)
  assert float(jnp.abs(m_k).max()) < 1e-9 and float(jnp.abs(m_c).max()) < 1e-9
  np.testing.assert_allclose(np.kron(k @ k.T, c @ c.T), np.kron(np.linalg.inv(a),
                                                               np.linalg.inv(g)), rtol=1e-6)


@pytest.mark.parametrize("name", ["2d_grouped", "2d_nchw"])
def test_convolution_updates_equal_the_dense_formulas_per_group(name):
  case = CASES[name]
  params, x, y, numbers, groups, *_, loss_fn = _setup(case)
  est = jkfac.estimator(loss_fn, params, x, y, mode="empirical", overrides={"*": "singd"})
  lam, decay = 0.1, 0.5
  tx = jkfac.scale_by_kfac(est, damping=lam, decay=decay)
  _, grads, stats = est(params, x, y)
  updates, state = tx.update(grads, tx.init(params), params, stats=stats)
  layer = est.layers[0].name
  factors = stats.factors[layer]
  w_grad = _kernel_matrix(grads["k"], numbers)
  w_update = _kernel_matrix(updates["k"], numbers)
  per_in, per_out = w_grad.shape[0], case["out"] // groups
  for j in range(groups):
    a, g = np.asarray(factors["A"][j]), np.asarray(factors["G"][j])
    k, c, _, _ = _numpy_step(np.eye(len(a)), np.eye(len(g)), np.zeros((len(a),) * 2),
                             np.zeros((len(g),) * 2), a, g, lam, 1 - decay)
    outs = slice(j * per_out, (j + 1) * per_out)
    v = np.concatenate([w_grad[:, outs], np.asarray(grads["b"])[None, outs]], axis=0)
    u = k @ k.T @ v @ c @ c.T
    np.testing.assert_allclose(w_update[:, outs], u[:per_in], rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(updates["b"][outs], u[-1], rtol=1e-9, atol=1e-13)
  assert state.inverses[layer]["K"].shape == (groups, per_in + 1, per_in + 1)


@_ONCE
def test_trains_a_scanned_stack_jitted_with_the_adaptive_optimizer():
  depth, width = 3, 8
  ks = jax.random.split(KEY, 4)
  params = {"w_in": 0.5 * jax.random.normal(ks[0], (6, width)),
            "stack": {"w": jax.random.normal(ks[1], (depth, width, width)) / np.sqrt(width),
                      "b": jnp.zeros((depth, width))},
            "w_out": 0.5 * jax.random.normal(ks[2], (width, 4))}
  x = jax.random.normal(ks[3], (64, 6))
  y = jnp.argmax(x[:, :4], axis=1)

  def loss_fn(p, x, y):
    h, _ = jax.lax.scan(lambda h, l: (jnp.tanh(h @ l["w"] + l["b"]), None),
                        jnp.tanh(x @ p["w_in"]), p["stack"])
    return jkfac.softmax_cross_entropy(h @ p["w_out"], y)

  est = jkfac.estimator(loss_fn, params, x, y, overrides={"stack": "singd"})
  assert [l.block for l in est.layers if l.stack] == ["singd"]
  tx = jkfac.kfac(est)
  params, state, losses, traces = bf.train_jitted(est, tx, params, (x, y), 25)
  assert traces == 1 and np.isfinite(losses).all() and losses[-1] < 0.6 * losses[0]
  assert state_k(state).shape == (depth, width + 1, width + 1)
  figures = jkfac.diagnostics(est, state).layers["stack"]
  assert {"factor_step_K", "factor_step_C"} <= set(figures)


def state_k(state):
  (inner,) = [s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "inverses"))
              if hasattr(s, "inverses")]
  return inner.inverses["stack"]["K"]
