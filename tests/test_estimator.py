"""The estimator's statistics against brute-force computations (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brute_force as bf
import jkfac

KEY = jax.random.PRNGKey(0)
SIZES = (3, 5, 4)


def _data(n=12):
  return bf.classification_data(n, SIZES[0], SIZES[-1])


_ce_loss = bf.ce_loss


def test_empirical_statistics_equal_per_example_sums():
  params = bf.mlp_params(KEY, SIZES)
  x, y = _data()
  est = jkfac.estimator(_ce_loss, params, x, y, mode="empirical")
  loss, grads, stats = est(params, x, y)
  # Per-example output derivatives g_n = d NLL_n / d s_n, by brute force.
  record = []
  bf.mlp_forward(params, x, record)
  for i, (h, s) in enumerate(record):
    def nll_of_s(s_n, n, i=i):
      out = jnp.tanh(s_n) if i < len(record) - 1 else s_n
      for j in range(i + 1, len(record)):
        out = out @ params[f"l{j}"]["w"] + params[f"l{j}"]["b"]
        out = jnp.tanh(out) if j < len(record) - 1 else out
      return -jax.nn.log_softmax(out)[y[n]]
    g = jnp.stack([jax.grad(nll_of_s)(s[n], n) for n in range(x.shape[0])])
    a_bar = bf.homogeneous(h)
    np.testing.assert_allclose(stats.factors[f"l{i}"]["A"], a_bar.T @ a_bar / x.shape[0],
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.factors[f"l{i}"]["G"], g.T @ g / x.shape[0],
                               rtol=1e-10, atol=1e-12)
  ref_loss, ref_grads = jax.value_and_grad(_ce_loss)(params, x, y)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14),
                         grads, ref_grads)


@pytest.mark.parametrize("distribution", ["categorical", "bernoulli", "gaussian"])
def test_exact_mode_equals_exact_expectation(distribution):
  params = bf.mlp_params(KEY, SIZES)
  x, labels = _data()
  if distribution == "categorical":
    loss_fn, targets = _ce_loss, labels
  elif distribution == "bernoulli":
    targets = jax.nn.one_hot(labels, SIZES[-1], dtype=jnp.float64)
    loss_fn = lambda p, x, t: jkfac.sigmoid_cross_entropy(bf.mlp_forward(p, x), t)
  else:
    targets = jax.random.normal(KEY, (x.shape[0], SIZES[-1]), jnp.float64)
    loss_fn = lambda p, x, t: jkfac.squared_error(bf.mlp_forward(p, x), t)
  est = jkfac.estimator(loss_fn, params, x, targets, mode="exact")
  _, _, stats = est(params, x, targets)
  g_ref = bf.exact_g_factors(params, x, distribution)
  a_ref = bf.a_factors(params, x)
  for i in range(len(SIZES) - 1):
    np.testing.assert_allclose(stats.factors[f"l{i}"]["G"], g_ref[i], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats.factors[f"l{i}"]["A"], a_ref[i], rtol=1e-12)


def test_fisher_mode_is_unbiased_for_the_exact_factor():
  params = bf.mlp_params(KEY, SIZES)
  x, y = _data()
  exact = jkfac.estimator(_ce_loss, params, x, y, mode="exact")
  sampled = jkfac.estimator(_ce_loss, params, x, y, mode="fisher", fisher_samples=4000)
  g_exact = exact(params, x, y)[2].factors["l1"]["G"]
  g_sampled = sampled(params, x, y, rng=KEY)[2].factors["l1"]["G"]
  scale = np.abs(g_exact).max()
  np.testing.assert_allclose(g_sampled, g_exact, atol=0.05 * scale)
  # And a different key gives a different (sampled) estimate.
  g_other = sampled(params, x, y, rng=jax.random.PRNGKey(7))[2].factors["l1"]["G"]
  assert not np.allclose(g_other, g_sampled)


def test_kronecker_block_equals_exact_fisher_of_one_linear_layer():
  """One dense layer with a Gaussian loss: F = A ⊗ I exactly."""
  params = {"l0": bf.mlp_params(KEY, (4, 3))["l0"]}
  x = jax.random.normal(KEY, (10, 4), jnp.float64)
  t = jax.random.normal(jax.random.PRNGKey(3), (10, 3), jnp.float64)
  loss_fn = lambda p, x, t: jkfac.squared_error(bf.mlp_forward(p, x), t)
  est = jkfac.estimator(loss_fn, params, x, t, mode="exact")
  factors = est(params, x, t)[2].factors["l0"]
  # Exact Fisher over theta = vec_row([W; b]) from per-example Jacobians.
  def out(theta, xn):
    v = theta.reshape(5, 3)
    return bf.homogeneous(xn) @ v
  theta = jnp.concatenate([params["l0"]["w"], params["l0"]["b"][None]], 0).reshape(-1)
  fisher = sum(jax.jacobian(out)(theta, x[n]).T @ jax.jacobian(out)(theta, x[n])
               for n in range(10)) / 10
  np.testing.assert_allclose(np.kron(factors["A"], factors["G"]), fisher, rtol=1e-10, atol=1e-13)


def test_several_losses_add_up():
  params = bf.mlp_params(KEY, SIZES)
  x, y = _data()
  t = jax.random.normal(KEY, (x.shape[0], SIZES[-1]), jnp.float64)
  both = lambda p, x, y, t: (jkfac.softmax_cross_entropy(bf.mlp_forward(p, x), y)
                             + jkfac.squared_error(bf.mlp_forward(p, x), t, weight=0.5))
  first = lambda p, x, y, t: jkfac.softmax_cross_entropy(bf.mlp_forward(p, x), y)
  second = lambda p, x, y, t: jkfac.squared_error(bf.mlp_forward(p, x), t)
  stats = [jkfac.estimator(f, params, x, y, t, mode="exact")(params, x, y, t)[2].factors
           for f in (both, first, second)]
  for name in ("l0", "l1"):
    np.testing.assert_allclose(stats[0][name]["G"],
                               stats[1][name]["G"] + 0.5 * stats[2][name]["G"], rtol=1e-10)
    np.testing.assert_allclose(stats[0][name]["A"], stats[1][name]["A"], rtol=1e-12)


def test_stats_fraction_uses_the_first_examples():
  params = bf.mlp_params(KEY, SIZES)
  x, y = _data(n=16)
  part = jkfac.estimator(_ce_loss, params, x, y, mode="empirical", stats_fraction=0.25)
  whole = jkfac.estimator(_ce_loss, params, x[:4], y[:4], mode="empirical")
  loss, grads, stats = part(params, x, y)
  ref = whole(params, x[:4], y[:4])[2]
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10),
                         stats.factors, ref.factors)
  np.testing.assert_allclose(loss, _ce_loss(params, x, y), rtol=1e-12)  # whole batch


def test_diagonal_fallback_uses_per_example_gradients():
  params = bf.mlp_params(KEY, SIZES)
  params["gain"] = jnp.linspace(0.5, 1.5, SIZES[-1])
  x, y = _data()

  def loss_fn(p, x, y):
    return jkfac.softmax_cross_entropy(bf.mlp_forward({k: v for k, v in p.items()
                                                       if k != "gain"}, x) * jnp.exp(p["gain"]), y)

  est = jkfac.estimator(loss_fn, params, x, y, mode="empirical")
  kinds = {layer.name: layer.kind for layer in est.layers}
  assert kinds == {"l0": "dense", "l1": "dense", "gain": "diagonal"}
  diag = est(params, x, y)[2].factors["gain"]["diag"]
  per_example = jnp.stack([jax.grad(lambda p: loss_fn(p, x[n:n + 1], y[n:n + 1]))(
      params)["gain"] for n in range(x.shape[0])])
  np.testing.assert_allclose(diag, jnp.mean(per_example ** 2, axis=0), rtol=1e-10)
  batch_grad_sq = jax.grad(loss_fn)(params, x, y)["gain"] ** 2
  assert not np.allclose(diag, batch_grad_sq)
  assert "gain" in str(est) and "fallback" in str(est)


def test_retraces_for_a_new_batch_size():
  params = bf.mlp_params(KEY, SIZES)
  x, y = _data(n=12)
  est = jkfac.estimator(_ce_loss, params, x, y, mode="empirical")
  x2, y2 = _data(n=7)
  stats = est(params, x2, y2)[2]
  ref = jkfac.estimator(_ce_loss, params, x2, y2, mode="empirical")(params, x2, y2)[2]
  np.testing.assert_allclose(stats.factors["l0"]["A"], ref.factors["l0"]["A"], rtol=1e-12)


def test_has_aux():
  params = bf.mlp_params(KEY, SIZES)
  x, y = _data()

  def loss_fn(p, x, y):
    logits = bf.mlp_forward(p, x)
    return jkfac.softmax_cross_entropy(logits, y), {"acc": jnp.mean(logits.argmax(-1) == y)}

  est = jkfac.estimator(loss_fn, params, x, y, has_aux=True)
  (loss, aux), grads, stats = est(params, x, y, rng=KEY)
  assert set(aux) == {"acc"}
  np.testing.assert_allclose(loss, loss_fn(params, x, y)[0], rtol=1e-12)
