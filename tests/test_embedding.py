"""Embedding blocks: diagonal input factor from id counts, against brute force."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brute_force as bf
import jkfac

KEY = jax.random.PRNGKey(0)
N, T, VOCAB, FEATURES, CLASSES = 5, 4, 7, 3, 3

LOOKUPS = {
    "take": lambda table, ids: jnp.take(table, ids, axis=0),
    "index": lambda table, ids: table[ids],
    "flax": lambda table, ids: nn.Embed(VOCAB, FEATURES).apply({"params": {"embedding": table}},
                                                               ids),
}


@pytest.mark.parametrize("lookup", sorted(LOOKUPS))
def test_embedding_statistics_and_update_equal_brute_force(lookup):
  k1, k2, k3, k4 = jax.random.split(KEY, 4)
  params = {"embed": jax.random.normal(k1, (VOCAB, FEATURES), jnp.float64),
            "out": jax.random.normal(k2, (FEATURES, CLASSES), jnp.float64)}
  ids = jax.random.randint(k3, (N, T), 0, VOCAB - 2)  # two ids never seen
  y = jax.random.randint(k4, (N,), 0, CLASSES)
  embed = LOOKUPS[lookup]

  def logits_from(h, p):
    return jnp.tanh(h).mean(axis=1) @ p["out"]

  loss_fn = lambda p, ids, y: jkfac.softmax_cross_entropy(logits_from(embed(p["embed"], ids), p),
                                                          y)
  est = jkfac.estimator(loss_fn, params, ids, y, mode="empirical")
  assert [(l.name, l.kind) for l in est.layers] == [("embed", "embedding"), ("out", "dense")]
  _, grads, stats = est(params, ids, y)
  counts = np.bincount(np.asarray(ids).reshape(-1), minlength=VOCAB) / (N * T)
  h = params["embed"][ids]
  g = N * jax.grad(lambda h: jkfac.softmax_cross_entropy(logits_from(h, params), y))(h)
  g_rows = np.asarray(g).reshape(-1, FEATURES)
  np.testing.assert_allclose(stats.factors["embed"]["A"], counts, rtol=1e-12)
  np.testing.assert_allclose(stats.factors["embed"]["G"], g_rows.T @ g_rows / N, rtol=1e-10)
  tx = jkfac.scale_by_kfac(est, damping=0.05)
  updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
  expected = bf.kron_update(np.diag(counts), g_rows.T @ g_rows / N, np.asarray(grads["embed"]),
                            0.05)
  np.testing.assert_allclose(updates["embed"], expected, rtol=1e-9, atol=1e-12)


def test_a_table_also_used_as_an_output_layer_falls_back():
  params = {"embed": jax.random.normal(KEY, (VOCAB, FEATURES), jnp.float64)}
  ids = jax.random.randint(KEY, (N, T), 0, VOCAB)

  def loss_fn(p, ids):
    h = p["embed"][ids].mean(axis=1)
    return jkfac.softmax_cross_entropy(h @ p["embed"].T, ids[:, 0])  # tied weights

  est = jkfac.estimator(loss_fn, params, ids)
  assert [(l.kind, l.note) for l in est.layers] == [
      ("diagonal", "applied in several places with different structure")]
