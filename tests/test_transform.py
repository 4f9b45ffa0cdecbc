"""scale_by_kfac and kfac: updates against dense formulas, invariance, optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import brute_force as bf
import jkfac

KEY = jax.random.PRNGKey(0)
SIZES = (3, 6, 4)


def _data(n=24):
  return bf.classification_data(n, SIZES[0], SIZES[-1])


_ce_loss = bf.ce_loss


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_update_equals_dense_damped_kronecker_inverse(method):
  params = bf.mlp_params(KEY, SIZES)
  x, y = _data()
  est = jkfac.estimator(_ce_loss, params, x, y, mode="exact")
  damping = 0.3
  tx = jkfac.scale_by_kfac(est, damping=damping, inverse_method=method)
  _, grads, stats = est(params, x, y)
  updates, state = tx.update(grads, tx.init(params), params, stats=stats)
  for name in ("l0", "l1"):
    a, g = stats.factors[name]["A"], stats.factors[name]["G"]
    w, b = bf.kfac_dense_update(np.asarray(a), np.asarray(g), np.asarray(grads[name]["w"]),
                                np.asarray(grads[name]["b"]), damping)
    np.testing.assert_allclose(updates[name]["w"], w, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(updates[name]["b"], b, rtol=1e-9, atol=1e-12)


def test_moving_averages_follow_the_decay_rule():
  params = bf.mlp_params(KEY, SIZES)
  x, y = _data()
  est = jkfac.estimator(_ce_loss, params, x, y, mode="fisher")
  tx = jkfac.scale_by_kfac(est, damping=1e-2, decay=0.7)
  state = tx.init(params)
  expected = None
  for k in range(1, 5):
    _, grads, stats = est(params, x, y, rng=jax.random.PRNGKey(k))
    _, state = tx.update(grads, state, params, stats=stats)
    eps = min(1 - 1 / k, 0.7)
    batch = stats.factors["l1"]["G"]
    expected = batch if expected is None else eps * expected + (1 - eps) * batch
    np.testing.assert_allclose(state.factors["l1"]["G"], expected, rtol=1e-12)
  assert int(state.count) == 4


def test_one_step_solves_linear_least_squares():
  kx, kw, kn = jax.random.split(KEY, 3)
  x = jax.random.normal(kx, (40, 5), jnp.float64) * jnp.array([1.0, 3.0, 0.1, 2.0, 0.5]) + 1.0
  w_true = jax.random.normal(kw, (5, 2), jnp.float64)
  t = x @ w_true + 0.3 + 0.1 * jax.random.normal(kn, (40, 2), jnp.float64)
  params = {"l0": {"w": jnp.zeros((5, 2), jnp.float64), "b": jnp.zeros(2, jnp.float64)}}
  loss_fn = lambda p, x, t: jkfac.squared_error(x @ p["l0"]["w"] + p["l0"]["b"], t)
  est = jkfac.estimator(loss_fn, params, x, t, mode="exact")
  tx = optax.chain(jkfac.scale_by_kfac(est, damping=1e-20), optax.scale(-1.0))
  _, grads, stats = est(params, x, t)
  updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
  new = optax.apply_updates(params, updates)
  design = np.concatenate([np.asarray(x), np.ones((40, 1))], axis=1)
  solution, *_ = np.linalg.lstsq(design, np.asarray(t), rcond=None)
  np.testing.assert_allclose(new["l0"]["w"], solution[:-1], rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(new["l0"]["b"], solution[-1], rtol=1e-6, atol=1e-8)


def test_invariance_to_affine_input_transformations():
  """Martens & Grosse section 10: same function after one step, damping -> 0."""
  params = bf.mlp_params(KEY, SIZES)
  x, y = _data()
  m = jnp.array([[2.0, 0.5, 0.0], [0.3, -1.0, 0.7], [0.0, 0.2, 3.0]], jnp.float64)
  c = jnp.array([1.0, -2.0, 0.5], jnp.float64)
  x2 = x @ m + c
  m_inv = jnp.linalg.inv(m)
  params2 = jax.tree_util.tree_map(lambda v: v, params)
  params2["l0"] = {"w": m_inv @ params["l0"]["w"],
                   "b": params["l0"]["b"] - c @ m_inv @ params["l0"]["w"]}
  np.testing.assert_allclose(bf.mlp_forward(params, x), bf.mlp_forward(params2, x2), rtol=1e-10)

  t = jax.random.normal(jax.random.PRNGKey(4), (x.shape[0], SIZES[-1]), jnp.float64)
  mse = lambda p, inputs, t: jkfac.squared_error(bf.mlp_forward(p, inputs), t)

  def step(p, inputs):
    est = jkfac.estimator(mse, p, inputs, t, mode="exact")
    tx = optax.chain(jkfac.scale_by_kfac(est, damping=1e-16), optax.scale(-0.5))
    _, grads, stats = est(p, inputs, t)
    updates, _ = tx.update(grads, tx.init(p), p, stats=stats)
    return optax.apply_updates(p, updates)

  new, new2 = step(params, x), step(params2, x2)
  x_test = jax.random.normal(jax.random.PRNGKey(5), (9, 3), jnp.float64)
  out, out2 = bf.mlp_forward(new, x_test), bf.mlp_forward(new2, x_test @ m + c)
  np.testing.assert_allclose(out, out2, rtol=1e-5, atol=1e-7)
  # The first-order step is not invariant: the check can fail.
  sgd = lambda p, inputs: optax.apply_updates(p, jax.tree_util.tree_map(
      lambda g: -0.5 * g, jax.grad(mse)(p, inputs, t)))
  assert not np.allclose(bf.mlp_forward(sgd(params, x), x_test),
                         bf.mlp_forward(sgd(params2, x2), x_test @ m + c), rtol=1e-2)


def test_jitted_step_compiles_once_across_inverse_refreshes():
  params = bf.mlp_params(KEY, SIZES, dtype=jnp.float32)
  x, y = _data()
  x = x.astype(jnp.float32)
  est = jkfac.estimator(_ce_loss, params, x, y)
  tx = jkfac.kfac(est, learning_rate=0.05, damping=1e-2, inverse_every=4)
  _, _, losses, traces = bf.train_jitted(est, tx, params, (x, y), 25)
  assert traces == 1
  assert losses[-1] < 0.7 * losses[0]
  assert all(np.isfinite(losses))


def test_inverses_refresh_only_on_schedule():
  params = bf.mlp_params(KEY, SIZES)
  x, y = _data()
  est = jkfac.estimator(_ce_loss, params, x, y)
  tx = jkfac.scale_by_kfac(est, damping=1e-2, inverse_every=3, inverse_warmup=1)
  state = tx.init(params)
  previous = None
  for k in range(7):
    _, grads, stats = est(params, x, y, rng=jax.random.PRNGKey(k))
    _, state = tx.update(grads, state, params, stats=stats)
    current = np.asarray(state.inverses["l0"]["A_inv"])
    if previous is not None:
      assert np.array_equal(current, previous) == (k % 3 != 0)
    previous = current


def test_damping_schedule_and_learning_rate_schedule():
  params = bf.mlp_params(KEY, SIZES)
  x, y = _data()
  est = jkfac.estimator(_ce_loss, params, x, y)
  damping = optax.exponential_decay(1.0, transition_steps=1, decay_rate=0.5)
  tx = jkfac.kfac(est, learning_rate=optax.linear_schedule(0.1, 0.0, 10), damping=damping,
                  inverse_every=1)
  state = tx.init(params)
  for k in range(3):
    _, grads, stats = est(params, x, y, rng=jax.random.PRNGKey(k))
    _, state = tx.update(grads, state, params, stats=stats)
  np.testing.assert_allclose(state[0].damping, 0.25)


@pytest.mark.parametrize("wrapper", ["chain_clip", "inject", "multisteps"])
def test_works_with_optax_wrappers(wrapper):
  params = bf.mlp_params(KEY, SIZES)
  x, y = _data()
  est = jkfac.estimator(_ce_loss, params, x, y)
  if wrapper == "chain_clip":
    tx = optax.chain(optax.clip_by_global_norm(1.0), jkfac.scale_by_kfac(est, damping=1e-2),
                     optax.sgd(0.1, momentum=0.9))
  elif wrapper == "inject":
    tx = optax.inject_hyperparams(jkfac.kfac, static_args=("est",))(
        est=est, learning_rate=0.1, momentum=0.9, damping=1e-2)
  else:
    tx = optax.MultiSteps(jkfac.kfac(est, 0.1, damping=1e-2), every_k_schedule=2)

  @jax.jit
  def train_step(params, state, key):
    loss, grads, stats = est(params, x, y, rng=key)
    updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state, loss

  state = tx.init(params)
  first = None
  for i in range(6):
    params, state, loss = train_step(params, state, jax.random.PRNGKey(i))
    first = float(loss) if first is None else first
  assert float(loss) < first
  if wrapper == "inject":
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    same, _, _ = train_step(params, state, KEY)
    jax.tree_util.tree_map(np.testing.assert_array_equal, same, params)


def test_state_is_a_pytree_of_arrays():
  params = bf.mlp_params(KEY, SIZES)
  x, y = _data()
  est = jkfac.estimator(_ce_loss, params, x, y)
  state = jkfac.kfac(est, 0.1).init(params)
  for leaf in jax.tree_util.tree_leaves(state):
    assert isinstance(leaf, jax.Array)
  restored = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state),
                                          [np.asarray(l) for l in jax.tree_util.tree_leaves(state)])
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
