"""Bad input gets an error that names the problem and the fix."""

import jax
import jax.numpy as jnp
import optax
import pytest

import brute_force as bf
import jkfac

KEY = jax.random.PRNGKey(0)
X = jax.random.normal(KEY, (8, 3))
Y = jnp.arange(8) % 2
PARAMS = bf.mlp_params(KEY, (3, 4, 2), dtype=jnp.float32)


def _loss(params, x, y):
  return jkfac.softmax_cross_entropy(bf.mlp_forward(params, x), y)


def test_loss_without_registered_loss():
  plain = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
      bf.mlp_forward(p, x), y).mean()
  with pytest.raises(ValueError, match="registers no loss.*jkfac.softmax_cross_entropy"):
    jkfac.estimator(plain, PARAMS, X, Y)


def test_loss_inside_a_branch():
  def branchy(p, x, y):
    return jax.lax.cond(y[0] > 0, lambda: _loss(p, x, y), lambda: 2 * _loss(p, x, y))
  with pytest.raises(ValueError, match="inside a `cond`.*jnp.where"):
    jkfac.estimator(branchy, PARAMS, X, Y)


def test_non_scalar_loss():
  with pytest.raises(ValueError, match="(?s)scalar loss.*has_aux=True"):
    jkfac.estimator(lambda p, x, y: (_loss(p, x, y), x), PARAMS, X, Y)


def test_update_without_stats():
  est = jkfac.estimator(_loss, PARAMS, X, Y)
  tx = jkfac.kfac(est, 0.1)
  _, grads, _ = est(PARAMS, X, Y, rng=KEY)
  with pytest.raises(ValueError, match=r"(?s)needs the curvature statistics.*stats=stats"):
    tx.update(grads, tx.init(PARAMS), PARAMS)


def test_adaptive_damping_needs_params():
  est = jkfac.estimator(_loss, PARAMS, X, Y)
  tx = jkfac.kfac(est)
  _, grads, stats = est(PARAMS, X, Y, rng=KEY)
  with pytest.raises(ValueError, match="with params"):
    tx.update(grads, tx.init(PARAMS), stats=stats)


def test_stats_from_another_estimator():
  est = jkfac.estimator(_loss, PARAMS, X, Y)
  other = jkfac.estimator(_loss, PARAMS, X, Y)
  tx = jkfac.kfac(est, 0.1)
  _, grads, stats = other(PARAMS, X, Y, rng=KEY)
  with pytest.raises(ValueError, match="another estimator.*jkfac.kfac\\(est"):
    tx.update(grads, tx.init(PARAMS), PARAMS, stats=stats)


def test_params_that_do_not_match():
  est = jkfac.estimator(_loss, PARAMS, X, Y)
  wrong_tree = {"l0": PARAMS["l0"]}
  with pytest.raises(ValueError, match="(?s)does not match the parameters.*new estimator"):
    est(wrong_tree, X, Y, rng=KEY)
  wrong_shape = jax.tree_util.tree_map(lambda v: v, PARAMS)
  wrong_shape["l1"] = {"w": jnp.zeros((4, 5)), "b": jnp.zeros(2)}
  with pytest.raises(ValueError, match="'l1/w' has shape \\(4, 5\\).*expects \\(4, 2\\)"):
    est(wrong_shape, X, Y, rng=KEY)
  tx = jkfac.kfac(est, 0.1)
  with pytest.raises(ValueError, match="scale_by_kfac.init"):
    tx.init(wrong_tree)


def test_fisher_mode_needs_a_key():
  est = jkfac.estimator(_loss, PARAMS, X, Y)
  with pytest.raises(ValueError, match="rng=key"):
    est(PARAMS, X, Y)


@pytest.mark.parametrize("kwargs, message", [
    (dict(damping=-1.0), "damping must be positive"),
    (dict(damping=1e-3, decay=1.0), "decay must be in"),
    (dict(damping=1e-3, inverse_every=0), "inverse_every must be a positive integer"),
    (dict(damping=1e-3, structure="banded"), "structure must be one of"),
])
def test_options_out_of_range(kwargs, message):
  est = jkfac.estimator(_loss, PARAMS, X, Y)
  with pytest.raises((ValueError, NotImplementedError), match=message):
    jkfac.scale_by_kfac(est, **kwargs)


def test_bad_estimator_options_and_labels():
  with pytest.raises(ValueError, match="mode must be one of"):
    jkfac.estimator(_loss, PARAMS, X, Y, mode="gauss")
  with pytest.raises(ValueError, match="labels must have shape"):
    jkfac.softmax_cross_entropy(jnp.zeros((8, 2)), jnp.zeros((8, 2), jnp.int32))
  with pytest.raises(ValueError, match="same shape"):
    jkfac.squared_error(jnp.zeros((8, 2)), jnp.zeros((8, 3)))


def test_tag_with_a_computed_weight():
  def loss_fn(p, x, y):
    w = 2.0 * p["l0"]["w"]
    return jkfac.softmax_cross_entropy(jkfac.register_dense(x @ w, x, w), y)
  params = {"l0": {"w": jnp.ones((3, 2))}}
  with pytest.raises(ValueError, match="not a parameter leaf"):
    jkfac.estimator(loss_fn, params, X, Y)


def test_empty_batch():
  with pytest.raises(ValueError, match=r"prediction shape \(0, 2\): the batch is empty"):
    jkfac.estimator(_loss, PARAMS, X[:0], Y[:0])
  est = jkfac.estimator(_loss, PARAMS, X, Y)
  with pytest.raises(ValueError, match="the batch is empty"):
    est(PARAMS, X[:0], Y[:0], rng=KEY)
