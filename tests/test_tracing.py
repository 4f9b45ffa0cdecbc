"""Automatic detection of dense layers and the layer table."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import brute_force as bf
import jkfac
from test_scan import _ONCE  # in the newest-JAX suite only (CI time)

KEY = jax.random.PRNGKey(0)
X = jax.random.normal(KEY, (6, 4))
Y = jnp.arange(6) % 3
W = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
B = jnp.ones(3)


def _kinds(est):
  return [(layer.name, layer.kind, tuple(p.role for p in layer.params)) for layer in est.layers]


FORMS = {
    "matmul": lambda p, x: x @ p["w"] + p["b"],
    "bias_first": lambda p, x: p["b"] + x @ p["w"],
    "dot": lambda p, x: jnp.dot(x, p["w"]) + p["b"],
    "einsum": lambda p, x: jnp.einsum("ni,io->no", x, p["w"]) + p["b"],
    "dot_general": lambda p, x: lax.dot_general(x, p["w"], (((1,), (0,)), ((), ()))) + p["b"],
    "matmul_method": lambda p, x: jnp.matmul(x, p["w"]) + p["b"],
    "jit": lambda p, x: jax.jit(lambda x, w, b: x @ w + b)(x, p["w"], p["b"]),
    "remat": lambda p, x: jax.checkpoint(lambda x, w, b: x @ w + b)(x, p["w"], p["b"]),
    "custom_jvp": lambda p, x: _custom_linear(x, p["w"], p["b"]),
    "cast": lambda p, x: x @ p["w"].astype(jnp.float32) + p["b"].astype(jnp.float32),
}


@jax.custom_jvp
def _custom_linear(x, w, b):
  return x @ w + b


@_custom_linear.defjvp
def _custom_linear_jvp(primals, tangents):
  x, w, b = primals
  dx, dw, db = tangents
  return _custom_linear(x, w, b), dx @ w + x @ dw + db


@pytest.mark.parametrize("form", sorted(FORMS))
def test_finds_dense_layer_with_bias(form):
  params = {"w": W, "b": B}
  loss_fn = lambda p, x, y: jkfac.softmax_cross_entropy(FORMS[form](p, x), y)
  est = jkfac.estimator(loss_fn, params, X, Y, mode="empirical")
  assert _kinds(est) == [("w+b", "dense", ("kernel", "bias"))]
  _, _, stats = est(params, X, Y)
  ref = jkfac.estimator(lambda p, x, y: jkfac.softmax_cross_entropy(x @ p["w"] + p["b"], y),
                        params, X, Y, mode="empirical")(params, X, Y)[2]
  np.testing.assert_allclose(stats.factors["w+b"]["A"], ref.factors["w+b"]["A"], rtol=1e-6)
  np.testing.assert_allclose(stats.factors["w+b"]["G"], ref.factors["w+b"]["G"], rtol=1e-6)


def test_transposed_weight_and_weight_on_the_left():
  params = {"w": W.T}
  forms = [lambda p, x: x @ p["w"].T, lambda p, x: (p["w"] @ x.T).T,
           lambda p, x: jnp.einsum("oi,ni->no", p["w"], x)]
  updates = []
  for form in forms:
    loss_fn = lambda p, x, y, form=form: jkfac.softmax_cross_entropy(form(p, x), y)
    est = jkfac.estimator(loss_fn, params, X, Y, mode="empirical")
    assert [l.kind for l in est.layers] == ["dense"]
    assert est.layers[0].option("in_axes") == (1,)
    tx = jkfac.scale_by_kfac(est, damping=1e-3)
    _, grads, stats = est(params, X, Y)
    updates.append(tx.update(grads, tx.init(params), params, stats=stats)[0]["w"])
  # The same layer written three ways gets the same update; it is the
  # transpose of the untransposed layer's update.
  plain = {"w": W}
  est = jkfac.estimator(lambda p, x, y: jkfac.softmax_cross_entropy(x @ p["w"], y), plain, X, Y,
                        mode="empirical")
  tx = jkfac.scale_by_kfac(est, damping=1e-3)
  _, grads, stats = est(plain, X, Y)
  reference = tx.update(grads, tx.init(plain), plain, stats=stats)[0]["w"]
  for u in updates:
    np.testing.assert_allclose(u, reference.T, rtol=1e-9, atol=1e-12)


def test_leading_batch_dimensions_pool_rows():
  x = jax.random.normal(KEY, (5, 7, 4), jnp.float64)  # (batch, time, features)
  y = jnp.arange(5) % 3
  params = {"w": W.astype(jnp.float64), "b": B.astype(jnp.float64),
            "v": jax.random.normal(KEY, (3, 3), jnp.float64)}

  def loss_fn(p, x, y):
    h = jnp.tanh(x @ p["w"] + p["b"])           # applied at every time step
    return jkfac.softmax_cross_entropy(h.mean(axis=1) @ p["v"], y)

  est = jkfac.estimator(loss_fn, params, x, y, mode="empirical")
  assert [l.kind for l in est.layers] == ["dense", "dense"]
  stats = est(params, x, y)[2].factors["w+b"]
  rows = bf.homogeneous(x.reshape(-1, 4))
  np.testing.assert_allclose(stats["A"], rows.T @ rows / 35, rtol=1e-12)
  # G sums g g^T over time and averages over examples (K-FAC-expand).
  s = x @ params["w"] + params["b"]
  g = jax.vmap(jax.grad(lambda s_n, x_n, y_n: -jax.nn.log_softmax(
      jnp.tanh(s_n).mean(0) @ params["v"])[y_n]))(s, x, y)
  g = g.reshape(-1, 3)
  np.testing.assert_allclose(stats["G"], g.T @ g / 5, rtol=1e-10)


def test_weight_shared_by_two_uses_is_one_layer():
  params = {"w": jnp.eye(4, dtype=jnp.float64) * 0.5, "out": jnp.ones((4, 3), jnp.float64)}

  def loss_fn(p, x, y):
    h = jnp.tanh(x @ p["w"])
    h = jnp.tanh(h @ p["w"])
    return jkfac.softmax_cross_entropy(h @ p["out"], y)

  est = jkfac.estimator(loss_fn, params, X.astype(jnp.float64), Y, mode="empirical")
  assert _kinds(est) == [("w", "dense", ("kernel",)), ("out", "dense", ("kernel",))]
  assert "2 uses" in str(est)


def test_flax_linen_mlp_is_found_layer_by_layer():
  import flax.linen as nn

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(8)(x))
      x = nn.remat(nn.Dense)(6)(x)
      x = jax.jit(jnp.tanh)(x)
      return nn.Dense(3, use_bias=False)(nn.tanh(x))

  model = MLP()
  params = model.init(KEY, X)
  loss_fn = lambda p, x, y: jkfac.softmax_cross_entropy(jax.jit(model.apply)(p, x), y)
  est = jkfac.estimator(loss_fn, params, X, Y)
  assert _kinds(est) == [("Dense_0", "dense", ("kernel", "bias")),
                         ("CheckpointDense_0", "dense", ("kernel", "bias")),
                         ("Dense_1", "dense", ("kernel",))]
  assert "no parameter is left to a fallback block" in str(est)


@_ONCE
def test_flax_nnx_mlp_is_found_layer_by_layer():
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(4, 8, rngs=rngs)
      self.l2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      return self.l2(nnx.tanh(self.l1(x)))

  graphdef, params = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)

  def loss_fn(params, x, y):
    return jkfac.softmax_cross_entropy(nnx.merge(graphdef, params)(x), y)

  est = jkfac.estimator(loss_fn, params, X, Y)
  assert [(l.name, l.kind) for l in est.layers] == [("l1", "dense"), ("l2", "dense")]
  tx = jkfac.kfac(est, 0.1, damping=1e-2)
  state = tx.init(params)
  _, grads, stats = est(params, X, Y, rng=KEY)
  updates, _ = tx.update(grads, state, params, stats=stats)
  assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(params)


def test_manual_tag_is_kept_and_owns_its_parameters():
  def loss_fn(p, x, y):
    w = p["w"]
    y_hat = jkfac.register_dense(jnp.einsum("ni,io->no", x, w) + p["b"], x, w, p["b"])
    return jkfac.softmax_cross_entropy(y_hat, y)

  params = {"w": W, "b": B}
  est = jkfac.estimator(loss_fn, params, X, Y)
  assert [(l.kind, l.note) for l in est.layers] == [("dense", "tagged")]


def test_unrecognised_parameters_fall_back_and_are_listed():
  params = {"w": W, "temperature": jnp.ones(())}
  loss_fn = lambda p, x, y: jkfac.softmax_cross_entropy((x @ p["w"]) * p["temperature"], y)
  est = jkfac.estimator(loss_fn, params, X, Y)
  assert _kinds(est) == [("w", "dense", ("kernel",)), ("temperature", "diagonal", ("param",))]
  table = str(est)
  assert "fallback" in table and "temperature (): used by mul" in table


def test_tags_survive_transformations():
  def f(w, x):
    return jkfac.register_dense(x @ w, x, w).sum()

  names = lambda j: {e.primitive.name for e in j.jaxpr.eqns}
  assert "jkfac_layer_tag" in names(jax.make_jaxpr(jax.grad(f))(W, X))
  np.testing.assert_allclose(jax.grad(f)(W, X), jax.grad(lambda w, x: (x @ w).sum())(W, X))
  np.testing.assert_allclose(jax.vmap(f, in_axes=(None, 0))(W, X[:, None]), (X @ W).sum(-1),
                             rtol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.checkpoint(f))(W, X), f(W, X), rtol=1e-6)
  carry, _ = lax.scan(lambda c, x: (c + f(W, x[None]), None), 0.0, X)
  np.testing.assert_allclose(carry, f(W, X), rtol=1e-5)


def test_register_dense_checks_shapes():
  with pytest.raises(ValueError, match="shapes do not match"):
    jkfac.register_dense(X @ W, X, W.T)
