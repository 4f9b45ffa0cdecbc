"""The full Fisher block for small layers, chosen by overrides, against brute force."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brute_force as bf
import jkfac

KEY = jax.random.PRNGKey(0)
SIZES = (3, 5, 4)
N = 10


def _exact_fisher_block(params, x, layer):
  """`mean_n J_n^T H_n J_n` of one layer's (w, b), flattened in that order."""
  def logits(p, xn):
    full = dict(params, **{layer: p})
    return bf.mlp_forward(full, xn[None])[0]

  total = 0.0
  for n in range(x.shape[0]):
    jac = jax.jacobian(logits)(params[layer], x[n])
    rows = jnp.concatenate([jac["w"].reshape(jac["w"].shape[0], -1), jac["b"]], axis=1)
    total = total + rows.T @ bf.output_fisher("categorical", logits(params[layer], x[n])) @ rows
  return total / x.shape[0]


def test_full_block_equals_the_exact_fisher_block_and_its_damped_inverse():
  params = bf.mlp_params(KEY, SIZES)
  x, y = bf.classification_data(N, SIZES[0], SIZES[-1])
  est = jkfac.estimator(bf.ce_loss, params, x, y, mode="exact", overrides={"l1": "full"})
  kinds = {l.name: (l.kind, l.note) for l in est.layers}
  assert kinds == {"l0": ("dense", kinds["l0"][1]), "l1": ("full", "override 'full'")}
  assert "full 24x24" in str(est)
  _, grads, stats = est(params, x, y)
  fisher = _exact_fisher_block(params, x, "l1")
  np.testing.assert_allclose(stats.factors["l1"]["full"], fisher, rtol=1e-9, atol=1e-12)

  damping = 0.05
  tx = jkfac.scale_by_kfac(est, damping=damping)
  updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
  flat_grad = np.concatenate([np.ravel(grads["l1"]["w"]), grads["l1"]["b"]])
  expected = np.linalg.solve(fisher + damping * np.eye(24), flat_grad)
  got = np.concatenate([np.ravel(updates["l1"]["w"]), updates["l1"]["b"]])
  np.testing.assert_allclose(got, expected, rtol=1e-8)
  # The Kronecker layer is untouched by the override.
  a, g = bf.a_factors(params, x)[0], bf.exact_g_factors(params, x, "categorical")[0]
  w, b = bf.kfac_dense_update(np.asarray(a), np.asarray(g), grads["l0"]["w"], grads["l0"]["b"],
                              damping)
  np.testing.assert_allclose(updates["l0"]["w"], w, rtol=1e-8)


def test_a_fallback_parameter_can_be_given_a_full_block():
  params = bf.mlp_params(KEY, SIZES)
  params["gain"] = jnp.linspace(0.5, 1.5, SIZES[-1])
  x, y = bf.classification_data(N, SIZES[0], SIZES[-1])

  def loss_fn(p, x, y):
    body = {k: v for k, v in p.items() if k != "gain"}
    return jkfac.softmax_cross_entropy(bf.mlp_forward(body, x) * jnp.exp(p["gain"]), y)

  est = jkfac.estimator(loss_fn, params, x, y, mode="empirical", overrides={"gain": "full"})
  assert {l.name: l.kind for l in est.layers}["gain"] == "full"
  per_example = jnp.stack([jax.grad(lambda p: loss_fn(p, x[n:n + 1], y[n:n + 1]))(
      params)["gain"] for n in range(N)])
  full = est(params, x, y)[2].factors["gain"]["full"]
  np.testing.assert_allclose(full, per_example.T @ per_example / N, rtol=1e-10)
  assert not np.allclose(full, np.diag(np.diag(full)))  # not the diagonal block


def test_full_block_trains_with_the_adaptive_optimizer():
  params = bf.mlp_params(KEY, SIZES)
  x, y = bf.classification_data(64, SIZES[0], SIZES[-1])
  est = jkfac.estimator(bf.ce_loss, params, x, y, overrides={"l*": "full"})
  assert {l.kind for l in est.layers} == {"full"}
  tx = jkfac.kfac(est, damping=1e-2)
  _, _, losses, _ = bf.train_jitted(est, tx, params, (x, y), steps=15)
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0]


def test_a_layer_too_large_for_a_full_block_is_refused():
  params = bf.mlp_params(KEY, (80, 60, 4))  # 80 x 60 + 60 = 4860 entries
  x, y = bf.classification_data(4, 80, 4)
  with pytest.raises(ValueError, match=r"'l0' has 4860 parameter entries, too many for a "
                                       r"'full' block \(at most 4096"):
    jkfac.estimator(bf.ce_loss, params, x, y, overrides={"l0": "full"})
