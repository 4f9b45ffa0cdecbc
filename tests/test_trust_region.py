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


def _dense_kfac_curvature(stats, name):
  """The undamped K-FAC block `A ⊗ G` of the batch, formed explicitly."""
  a, g = (np.asarray(stats.factors[name][k]) for k in ("A", "G"))
  return np.kron(a, g)


def _flat(layer):  # [w; b] row-major, as the Kronecker product's vec
  return np.concatenate([np.asarray(layer["w"]), np.asarray(layer["b"])[None]]).reshape(-1)


def test_the_predicted_kl_is_the_kfac_quadratic_form_and_is_clipped_to_the_bound():
  params, est, grads, stats = _problem()
  precondition = jkfac.scale_by_kfac(est, damping=DAMPING)  # the direction Δ
  direction, _ = precondition.update(grads, precondition.init(params), params, stats=stats)
  rate = 0.7
  quadratic_form = sum(_flat(direction[n]) @ _dense_kfac_curvature(stats, n)
                       @ _flat(direction[n]) for n in ("l0", "l1"))
  predicted = rate ** 2 * quadratic_form
  for bound, scale in ((0.25 * predicted, 0.5), (2.0 * predicted, 1.0)):
    tx = jkfac.kfac(est, learning_rate=rate, momentum=0.0, damping=DAMPING, kl_clip=bound)
    updates, state = tx.update(grads, tx.init(params), params, stats=stats)
    jax.tree.map(lambda u, d: np.testing.assert_allclose(u, -rate * scale * d, rtol=1e-10),
                 updates, direction)
    diag = jkfac.diagnostics(est, state)
    np.testing.assert_allclose(diag.overall["kl_clip_scale"], scale, rtol=1e-6)
    # The step taken has its predicted KL at most the bound, equal when clipped.
    taken = sum(_flat(updates[n]) @ _dense_kfac_curvature(stats, n) @ _flat(updates[n])
                for n in ("l0", "l1"))
    np.testing.assert_allclose(taken, min(bound, predicted), rtol=1e-9)
  # With momentum μ, the effective learning rate η/(1 - μ) is bounded.
  tx = jkfac.kfac(est, learning_rate=rate, momentum=0.5, damping=DAMPING,
                  kl_clip=0.25 * predicted * 4)
  updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
  jax.tree.map(lambda u, d: np.testing.assert_allclose(u, -rate * 0.5 * d, rtol=1e-10),
               updates, direction)


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


def test_scale_by_kl_clip_needs_the_statistics():
  params, est, _, _ = _problem()
  tx = jkfac.scale_by_kl_clip(est, 1e-2, 0.1)
  with pytest.raises(ValueError, match="needs the batch's statistics.*stats=stats"):
    tx.update(params, tx.init(params), params)


def test_the_quadratic_form_of_every_block_kind_equals_its_dense_curvature():
  # Dense (Kronecker), and a fallback (diagonal) parameter: a scale on the output.
  params = {"net": bf.mlp_params(KEY, SIZES), "s": {"scale": jnp.ones(SIZES[-1], jnp.float64)}}
  x, y = bf.classification_data(24, SIZES[0], SIZES[-1])
  loss_fn = lambda p, x, y: jkfac.softmax_cross_entropy(
      bf.mlp_forward(p["net"], x) * p["s"]["scale"] ** 2, y)
  est = jkfac.estimator(loss_fn, params, x, y, mode="exact")
  _, grads, stats = est(params, x, y)
  value = jkfac.trust_region.kfac_quadratic_form(est, stats.factors, grads)
  dense = [l.name for l in est.layers if l.kind == "dense"]
  expected = sum(_flat(grads["net"][n.split("/")[-1]]) @ _dense_kfac_curvature(stats, n)
                 @ _flat(grads["net"][n.split("/")[-1]]) for n in dense)
  (diagonal,) = [l.name for l in est.layers if l.kind == "diagonal"]
  expected += np.sum(np.asarray(stats.factors[diagonal]["diag"])
                     * np.asarray(grads["s"]["scale"]) ** 2)
  assert len(dense) == 2
  np.testing.assert_allclose(value, expected, rtol=1e-10)


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
