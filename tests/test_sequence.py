"""Dense layers over sequences and attention: einsum projections, expand and reduce."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brute_force as bf
import jkfac
from test_scan import _ONCE  # in the newest-JAX suite only (CI time)

KEY = jax.random.PRNGKey(0)
B, T, D, H, K, CLASSES = 4, 3, 5, 2, 3, 3


def test_einsum_projection_with_a_multi_axis_bias_equals_brute_force():
  k1, k2, k3, k4, k5 = jax.random.split(KEY, 5)
  params = {"proj": {"kernel": jax.random.normal(k1, (D, H, K), jnp.float64),
                     "bias": jax.random.normal(k2, (H, K), jnp.float64)},
            "out": jax.random.normal(k3, (H * K, CLASSES), jnp.float64)}
  x = jax.random.normal(k4, (B, T, D), jnp.float64)
  y = jax.random.randint(k5, (B,), 0, CLASSES)

  def logits_from(s, p):
    return jnp.tanh(s).mean(axis=1).reshape(B, -1) @ p["out"]

  project = lambda p, x: jnp.einsum("btd,dhk->bthk", x, p["proj"]["kernel"]) + p["proj"]["bias"]
  loss_fn = lambda p, x, y: jkfac.softmax_cross_entropy(logits_from(project(p, x), p), y)
  est = jkfac.estimator(loss_fn, params, x, y, mode="empirical")
  assert [(l.name, l.kind) for l in est.layers] == [("proj", "dense"), ("out", "dense")]
  assert est.layers[0].option("in_axes") == (0,) and est.layers[0].option("out_axes") == (1, 2)
  _, grads, stats = est(params, x, y)
  rows = bf.homogeneous(np.asarray(x).reshape(-1, D))
  s = project(params, x)
  g = B * jax.grad(lambda s: jkfac.softmax_cross_entropy(logits_from(s, params), y))(s)
  g = np.asarray(g).reshape(-1, H * K)
  a, gg = rows.T @ rows / (B * T), g.T @ g / B
  np.testing.assert_allclose(stats.factors["proj"]["A"], a, rtol=1e-10)
  np.testing.assert_allclose(stats.factors["proj"]["G"], gg, rtol=1e-10)
  tx = jkfac.scale_by_kfac(est, damping=0.1)
  updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
  w, b = bf.kfac_dense_update(a, gg, np.asarray(grads["proj"]["kernel"]).reshape(D, -1),
                              np.asarray(grads["proj"]["bias"]).reshape(-1), 0.1)
  np.testing.assert_allclose(updates["proj"]["kernel"], w.reshape(D, H, K), rtol=1e-8)
  np.testing.assert_allclose(updates["proj"]["bias"], b.reshape(H, K), rtol=1e-8)


def _ggn(predict, params, x):
  """Exact GGN of 0.5 |f|² summed over outputs, mean over examples, in the
  dense layer's (in + 1, out) row-major parameter order."""
  def flat_predict(theta):
    return predict({"w": theta[:-1], "b": theta[-1]}, x).reshape(x.shape[0], -1)
  theta = jnp.concatenate([params["w"], params["b"][None]], axis=0)
  jac = jax.jacobian(flat_predict)(theta).reshape(x.shape[0], -1, theta.size)
  return np.einsum("nop,noq->pq", jac, jac) / x.shape[0]


@pytest.mark.parametrize("setting", ["expand", "reduce"])
def test_expand_and_reduce_are_each_exact_in_their_own_setting(setting):
  """Eschenhagen et al. (2023): for a linear layer shared over T positions,
  K-FAC-expand is the exact GGN when each position has its own loss, and
  K-FAC-reduce when the loss sees the positions aggregated; not the other."""
  kx, kw, kb, kt = jax.random.split(KEY, 4)
  x = jax.random.normal(kx, (B, T, D), jnp.float64)
  params = {"w": jax.random.normal(kw, (D, CLASSES), jnp.float64),
            "b": jax.random.normal(kb, (CLASSES,), jnp.float64)}
  if setting == "expand":
    predict = lambda p, x: x @ p["w"] + p["b"]                 # a loss per position
  else:
    predict = lambda p, x: (x @ p["w"] + p["b"]).mean(axis=1)  # positions aggregated
  targets = jax.random.normal(kt, predict(params, x).shape, jnp.float64)
  loss_fn = lambda p, x, t: jkfac.squared_error(predict(p, x), t)
  ggn = _ggn(predict, params, x)
  kron = {}
  for sharing in ("expand", "reduce"):
    est = jkfac.estimator(loss_fn, params, x, targets, mode="exact", weight_sharing=sharing)
    factors = est(params, x, targets)[2].factors["w+b"]
    kron[sharing] = np.kron(factors["A"], factors["G"])
  other = "reduce" if setting == "expand" else "expand"
  np.testing.assert_allclose(kron[setting], ggn, rtol=1e-10, atol=1e-12)
  assert not np.allclose(kron[other], ggn, rtol=1e-2)


def test_reduce_equals_expand_without_weight_sharing():
  x, y = bf.classification_data(6, 3, 4)
  params = bf.mlp_params(KEY, (3, 5, 4))
  factors = {s: jkfac.estimator(bf.ce_loss, params, x, y, mode="exact",
                                weight_sharing=s)(params, x, y)[2].factors
             for s in ("expand", "reduce")}
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12),
                         factors["expand"], factors["reduce"])


class Encoder(nn.Module):
  """A transformer encoder block on token ids, flax linen, unmodified."""

  @nn.compact
  def __call__(self, ids):
    h = nn.Embed(11, 8)(ids)
    h = h + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(nn.LayerNorm()(h))
    h = h + nn.Dense(8)(nn.gelu(nn.Dense(16)(nn.LayerNorm()(h))))
    return nn.Dense(CLASSES)(nn.LayerNorm()(h).mean(axis=1))


@_ONCE
def test_transformer_encoder_has_no_parameter_left_to_a_fallback():
  ids = jax.random.randint(KEY, (B, 6), 0, 11)
  y = jax.random.randint(KEY, (B,), 0, CLASSES)
  model = Encoder()
  params = model.init(KEY, ids)["params"]
  loss_fn = lambda p, ids, y: jkfac.softmax_cross_entropy(model.apply({"params": p}, ids), y)
  est = jkfac.estimator(loss_fn, params, ids, y)
  kinds = {layer.name: layer.kind for layer in est.layers}
  assert "diagonal" not in kinds.values(), est
  assert kinds["Embed_0"] == "embedding"
  for name in ("query", "key", "value", "out"):
    assert kinds[f"MultiHeadDotProductAttention_0/{name}"] == "dense", est
  assert sum(kind == "scale_and_shift" for kind in kinds.values()) == 3
  assert "no parameter is left to a fallback block" in str(est)
  tx = jkfac.kfac(est, damping=1e-2)  # learning rate and momentum from the quadratic model
  _, _, losses, _ = bf.train_jitted(est, tx, params, (ids, y), steps=15)
  assert losses[-1] < 0.1 * losses[0]
