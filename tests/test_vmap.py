"""Models written for one example and `jax.vmap`-ed over the batch (equinox's
way): their layers are the batched model's, biases folded into the dense
blocks whatever transposes the vmap inserts."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import brute_force as bf
import jkfac

KEY = jax.random.PRNGKey(0)
SIZES = (4, 6, 3)


def _per_example_loss(params, x, y):
  def one(x):  # W x + b, as a model of one example computes it
    for i in range(len(SIZES) - 1):
      layer = params[f"l{i}"]
      x = layer["w"].T @ x + layer["b"]
      x = jnp.tanh(x) if i < len(SIZES) - 2 else x
    return x
  return jkfac.softmax_cross_entropy(jax.vmap(one)(x), y)


def test_per_example_dense_layers_equal_the_batched_ones():
  params = bf.mlp_params(KEY, SIZES)
  x, y = bf.classification_data(16, SIZES[0], SIZES[-1])
  vmapped = jkfac.estimator(_per_example_loss, params, x, y, mode="exact")
  batched = jkfac.estimator(bf.ce_loss, params, x, y, mode="exact")
  assert [(l.name, l.kind, [p.role for p in l.params]) for l in vmapped.layers] == [
      (l.name, l.kind, [p.role for p in l.params]) for l in batched.layers]
  _, _, stats = vmapped(params, x, y)
  _, _, stats_b = batched(params, x, y)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), stats.factors,
               stats_b.factors)


def test_an_equinox_mlp_under_vmap_has_one_dense_block_per_layer():
  mlp = eqx.nn.MLP(SIZES[0], SIZES[-1], SIZES[1], 2, key=KEY)
  params, static = eqx.partition(mlp, eqx.is_inexact_array)
  x, y = bf.classification_data(16, SIZES[0], SIZES[-1])
  x = x.astype(jnp.float32)
  loss_fn = lambda p, x, y: jkfac.softmax_cross_entropy(jax.vmap(eqx.combine(p, static))(x), y)
  est = jkfac.estimator(loss_fn, params, x, y)
  assert [(l.name, l.kind, [p.role for p in l.params]) for l in est.layers] == [
      (f"layers/{i}", "dense", ["kernel", "bias"]) for i in range(3)], str(est)
