"""scale_by_kl_clip and kfac's trust region for fixed learning rates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import brute_force as bf
import jkfac

KEY = jax.random.PRNGKey(0)
SIZES = (3, 6, 4)
DAMPING = 0.3


def _problem():
  params = bf.mlp_params(KEY, SIZES)
  x, y = bf.classification_data(24, SIZES[0], SIZES[-1])
  est = jkfac.estimator(bf.ce_loss, params, x, y, mode="exact")
  _, grads, stats = est(params, x, y)
  return params, est, grads, stats


def _flat(tree):
  return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])


def _direction(est, params, grads, stats):
  """Δ = F̆^{-1} ∇h, the preconditioner's output, and its state's factors."""
  precondition = jkfac.scale_by_kfac(est, damping=DAMPING)
  direction, state = precondition.update(grads, precondition.init(params), params, stats=stats)
  return direction, state


def _damped_kfac_matrix(factors, gamma):
  """`(A + πγ I) ⊗ (G + γ/π I)` for one dense layer, formed explicitly (section 6.3)."""
  a, g = (np.asarray(factors[k]) for k in ("A", "G"))
  pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
  return np.kron(a + pi * gamma * np.eye(len(a)), g + gamma / pi * np.eye(len(g)))


def _layer_vec(layer):  # [w; b] row-major, as the Kronecker product's vec
  return np.concatenate([np.asarray(layer["w"]), np.asarray(layer["b"])[None]]).reshape(-1)


def test_the_predicted_kl_is_the_damped_kfac_quadratic_form_and_is_clipped_to_the_bound():
  params, est, grads, stats = _problem()
  direction, state = _direction(est, params, grads, stats)
  # Δ^T ∇h is Δ^T F̆ Δ with F̆ the damped Kronecker blocks the inverses came from,
  # and bounds the undamped form Δ^T (A ⊗ G) Δ from above.
  damped = undamped = 0.0
  for name in ("l0", "l1"):
    factors = state.factors[name]
    vec = _layer_vec(direction[name])
    damped += vec @ _damped_kfac_matrix(factors, np.sqrt(DAMPING)) @ vec
    undamped += vec @ np.kron(factors["A"], factors["G"]) @ vec
  quadratic_form = _flat(direction) @ _flat(grads)
  np.testing.assert_allclose(quadratic_form, damped, rtol=1e-8)
  assert 0 < undamped < quadratic_form
  rate = 0.7
  predicted = rate ** 2 * quadratic_form
  for bound, scale in ((0.25 * predicted, 0.5), (2.0 * predicted, 1.0)):
    tx = jkfac.kfac(est, learning_rate=rate, momentum=0.0, damping=DAMPING, kl_clip=bound)
    updates, state = tx.update(grads, tx.init(params), params, stats=stats)
    jax.tree.map(lambda u, d: np.testing.assert_allclose(u, -rate * scale * d, rtol=1e-10),
                 updates, direction)
    diag = jkfac.diagnostics(est, state)
    np.testing.assert_allclose(diag.overall["kl_clip_scale"], scale, rtol=1e-6)
    # The step taken has its predicted KL at most the bound, equal when clipped.
    taken = (_flat(updates) @ _flat(grads)) ** 2 / quadratic_form  # (ν η)² Δ^T F̆ Δ
    np.testing.assert_allclose(taken, min(bound, predicted), rtol=1e-9)
  # With momentum μ, the effective learning rate η/(1 - μ) is bounded.
  tx = jkfac.kfac(est, learning_rate=rate, momentum=0.5, damping=DAMPING,
                  kl_clip=0.25 * predicted * 4)
  updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
  jax.tree.map(lambda u, d: np.testing.assert_allclose(u, -rate * 0.5 * d, rtol=1e-10),
               updates, direction)


def test_the_bound_is_per_predicted_variable():
  # A Bernoulli output of 5 pixels per example, summed (weight 1) or averaged
  # (weight 1/5): 5 and 1 predicted variables per term.
  params = bf.mlp_params(KEY, (3, 6, 5))
  x, _ = bf.classification_data(24, 3, 5)
  targets = (x[:, :1] + jnp.arange(5.0) > 1.0).astype(x.dtype)
  for weight, variables in ((1.0, 5.0), (0.2, 1.0)):
    loss_fn = lambda p, x, t, w=weight: jkfac.sigmoid_cross_entropy(bf.mlp_forward(p, x), t, w)
    est = jkfac.estimator(loss_fn, params, x, targets, mode="exact")
    assert jkfac.trust_region.predicted_variables(est.losses) == pytest.approx(variables)
    _, grads, stats = est(params, x, targets)
    direction, _ = _direction(est, params, grads, stats)
    per_variable = _flat(direction) @ _flat(grads) / variables
    tx = jkfac.kfac(est, learning_rate=1.0, momentum=0.0, damping=DAMPING,
                    kl_clip=per_variable / 9)
    updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
    jax.tree.map(lambda u, d: np.testing.assert_allclose(u, -d / 3, rtol=1e-10),
                 updates, direction)


@pytest.mark.parametrize("shape,distribution,weight,variables", [
    ((8, 10), "categorical", 1.0, 1),          # a classifier
    ((8, 16, 50), "categorical", 1.0, 1),      # a language model's per-token loss
    ((8, 784), "bernoulli", 1.0, 784),         # the autoencoder's summed pixels
    ((8, 4, 3), "gaussian", 0.5, 6),           # half of 12 outputs
])
def test_predicted_variables_by_distribution(shape, distribution, weight, variables):
  loss = jkfac.tracing.Loss(0, distribution, weight, shape)
  assert jkfac.trust_region.predicted_variables([loss]) == variables
  assert jkfac.trust_region.predicted_variables([loss, loss]) == 2 * variables


def test_no_trust_region_with_kl_clip_none_or_an_adaptive_learning_rate():
  params, est, grads, stats = _problem()
  plain = optax.chain(jkfac.scale_by_kfac(est, damping=DAMPING), optax.scale(-10.0))
  expected, _ = plain.update(grads, plain.init(params), params, stats=stats)
  tx = jkfac.kfac(est, learning_rate=10.0, momentum=0.0, damping=DAMPING, kl_clip=None)
  updates, state = tx.update(grads, tx.init(params), params, stats=stats)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), updates, expected)
  assert "kl_clip_scale" not in jkfac.diagnostics(est, state).overall
  assert "kl_clip_scale" not in jkfac.diagnostics(est, jkfac.kfac(est).init(params)).overall
  default = jkfac.kfac(est, learning_rate=10.0, momentum=0.0, damping=DAMPING)
  assert isinstance(default.init(params)[1], jkfac.KLClipState)  # on by default


def test_scale_by_kl_clip_needs_the_gradient():
  params, _, grads, _ = _problem()
  tx = jkfac.scale_by_kl_clip(1e-2, 0.1)
  with pytest.raises(ValueError, match="needs the gradient that was preconditioned.*grads=grads"):
    tx.update(grads, tx.init(params), params)
  with pytest.raises(ValueError, match="grads= must have the structure of the updates"):
    tx.update(grads, tx.init(params), params, grads=grads["l0"])


def _diverging_run(kl_clip):
  params = bf.mlp_params(KEY, (3, 8, 4), scale=3.0, dtype=jnp.float32)
  x, y = bf.classification_data(40, 3, 4)
  x = 3.0 * x.astype(jnp.float32)
  est = jkfac.estimator(bf.ce_loss, params, x, y)
  tx = jkfac.kfac(est, learning_rate=1.0, momentum=0.9, damping=1e-3, kl_clip=kl_clip)
  _, _, losses, _ = bf.train_jitted(est, tx, params, (x, y), 25)
  return np.array(losses)


def test_the_trust_region_keeps_a_too_large_learning_rate_from_diverging():
  unclipped = _diverging_run(None)
  assert not (np.all(np.isfinite(unclipped)) and unclipped.max() <= 2 * unclipped[0])
  clipped = _diverging_run(1e-2)
  assert np.all(np.isfinite(clipped)) and clipped.max() <= 2 * clipped[0]
  assert clipped[-5:].mean() < 0.7 * clipped[0]
