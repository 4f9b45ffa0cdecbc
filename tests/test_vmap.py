"""`jax.vmap` in models: written for one example and vmapped over the batch
(equinox's way), their layers are the batched model's, biases folded into the
dense blocks whatever transposes the vmap inserts; vmapped over stacked
parameters (an ensemble), one block per member, equal to the members written
one by one."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import brute_force as bf
import jkfac
from test_scan import _ONCE

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



def _eqx_loss(static):
  return lambda p, x, y: jkfac.softmax_cross_entropy(jax.vmap(eqx.combine(p, static))(x), y)


def _same_blocks(est, est_b, params, params_b, batch):
  """The two estimators' statistics and K-FAC updates, the second's parameters
  laid out as `params_b`, equal layer by layer."""
  assert not [l for l in est.layers if l.kind == "diagonal"], str(est)
  assert [(l.kind, [p.role for p in l.params]) for l in est.layers] == [
      (l.kind, [p.role for p in l.params]) for l in est_b.layers], str(est)
  _, grads, stats = est(params, *batch)
  _, grads_b, stats_b = est_b(params_b, *batch)
  for layer, layer_b in zip(est.layers, est_b.layers):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14),
                 stats.factors[layer.name], stats_b.factors[layer_b.name])
  updates = jkfac.scale_by_kfac(est, damping=1e-2).update(
      grads, jkfac.scale_by_kfac(est, damping=1e-2).init(params), params, stats=stats)[0]
  tx_b = jkfac.scale_by_kfac(est_b, damping=1e-2)
  updates_b = tx_b.update(grads_b, tx_b.init(params_b), params_b, stats=stats_b)[0]
  return updates, updates_b


def test_an_equinox_embedding_under_vmap_is_an_embedding_layer():
  k = jax.random.split(KEY, 2)
  emb, lin = (eqx.nn.Embedding(10, 6, key=k[0], dtype=jnp.float64),
              eqx.nn.Linear(6, 3, key=k[1], dtype=jnp.float64))
  model = eqx.nn.Sequential([emb, eqx.nn.Lambda(jnp.tanh), lin])
  params, static = eqx.partition(model, eqx.is_inexact_array)
  ids, y = jnp.arange(16) % 7, jnp.arange(16) % 3
  batched = lambda p, ids, y: jkfac.softmax_cross_entropy(
      jnp.tanh(p["table"][ids]) @ p["w"].T + p["b"], y)
  params_b = {"table": emb.weight, "w": lin.weight, "b": lin.bias}
  est, est_b = (jkfac.estimator(f, p, ids, y, mode="exact")
                for f, p in ((_eqx_loss(static), params), (batched, params_b)))
  assert est.layers[0].kind == "embedding"
  updates, updates_b = _same_blocks(est, est_b, params, params_b, (ids, y))
  np.testing.assert_allclose(updates.layers[0].weight, updates_b["table"], rtol=1e-10)


def test_an_equinox_conv2d_under_vmap_has_its_bias_in_the_block():
  k = jax.random.split(KEY, 2)
  conv = eqx.nn.Conv2d(2, 4, 3, key=k[0], dtype=jnp.float64)
  lin = eqx.nn.Linear(4 * 4 * 4, 3, key=k[1], dtype=jnp.float64)
  model = eqx.nn.Sequential([conv, eqx.nn.Lambda(lambda h: jnp.tanh(h).reshape(-1)), lin])
  params, static = eqx.partition(model, eqx.is_inexact_array)
  x = jax.random.normal(KEY, (8, 2, 6, 6), jnp.float64)
  y = jnp.arange(8) % 3

  def batched(p, x, y):
    h = jax.lax.conv(x, p["k"], (1, 1), "VALID") + p["c"][None, :, None, None]
    return jkfac.softmax_cross_entropy(jnp.tanh(h).reshape(8, -1) @ p["w"].T + p["b"], y)

  params_b = {"k": conv.weight, "c": conv.bias.reshape(-1), "w": lin.weight, "b": lin.bias}
  est, est_b = (jkfac.estimator(f, p, x, y, mode="exact")
                for f, p in ((_eqx_loss(static), params), (batched, params_b)))
  assert [p.shape for p in est.layers[0].params] == [(4, 2, 3, 3), (4, 1, 1)], str(est)
  updates, updates_b = _same_blocks(est, est_b, params, params_b, (x, y))
  np.testing.assert_allclose(updates.layers[0].bias.reshape(-1), updates_b["c"], rtol=1e-10)
  np.testing.assert_allclose(updates.layers[0].weight, updates_b["k"], rtol=1e-10)


@_ONCE
def test_equinox_attention_under_vmap_has_a_dense_block_per_projection():
  k = jax.random.split(KEY, 2)
  attention = eqx.nn.MultiheadAttention(2, 8, key=k[0], dtype=jnp.float64, use_query_bias=True,
                                        use_key_bias=True, use_value_bias=True,
                                        use_output_bias=True)
  head = eqx.nn.Linear(8, 3, key=k[1], dtype=jnp.float64)
  params, static = eqx.partition((attention, head), eqx.is_inexact_array)
  x = jax.random.normal(KEY, (4, 5, 8), jnp.float64)
  y = jnp.arange(20).reshape(4, 5) % 3

  def loss_fn(params, x, y):
    attention, head = eqx.combine(params, static)
    one = lambda x: jax.vmap(head)(attention(x, x, x))  # one sequence, as equinox writes it
    return jkfac.softmax_cross_entropy(jax.vmap(one)(x), y)

  est = jkfac.estimator(loss_fn, params, x, y, mode="exact")
  names = ["query_proj", "key_proj", "value_proj", "output_proj"]
  assert [(l.name, l.kind, [p.role for p in l.params]) for l in est.layers] == [
      (f"0/{n}", "dense", ["kernel", "bias"]) for n in names] + [
      ("1", "dense", ["kernel", "bias"])], str(est)
  # The query projection's A: the mean over examples and positions of [x, 1][x, 1]^T.
  _, _, stats = jax.jit(lambda p: est(p, x, y))(params)
  rows = jnp.concatenate([x.reshape(-1, 8), jnp.ones((20, 1))], axis=1)
  np.testing.assert_allclose(stats.factors["0/query_proj"]["A"], rows.T @ rows / 20, rtol=1e-12)

# --------------------------------------------------------------------------- #
# Ensembles: jax.vmap over stacked parameters
# --------------------------------------------------------------------------- #

MEMBERS, BATCH = 3, 12


def _ensemble_params(key, bias=True):
  k = jax.random.split(key, 4)
  params = {"w1": jax.random.normal(k[0], (MEMBERS, SIZES[0], SIZES[1]), jnp.float64) / 2,
            "w2": jax.random.normal(k[1], (MEMBERS, SIZES[1], SIZES[2]), jnp.float64) / 2}
  if bias:
    params["b1"] = 0.1 * jax.random.normal(k[2], (MEMBERS, SIZES[1]), jnp.float64)
    params["b2"] = 0.1 * jax.random.normal(k[3], (MEMBERS, SIZES[2]), jnp.float64)
  return params


def _member(p, x):
  h = jnp.tanh(x @ p["w1"] + p["b1"] if "b1" in p else x @ p["w1"])
  return h @ p["w2"] + p["b2"] if "b2" in p else h @ p["w2"]


def _ensemble_loss(out_axes):
  """The members' summed losses, the logits `(members, batch, classes)` or
  `(batch, members, classes)`."""
  def loss_fn(params, x, y):
    logits = jax.vmap(_member, in_axes=(0, None), out_axes=out_axes)(params, x)
    labels = jnp.broadcast_to(y, (MEMBERS, y.shape[0]))
    labels = labels if out_axes == 0 else labels.T
    return jkfac.softmax_cross_entropy(logits, labels, weight=MEMBERS)
  return loss_fn


def _members_loss(members, x, y):
  """The same members as K models of their own, one by one in a Python loop."""
  return sum(jkfac.softmax_cross_entropy(_member(p, x), y) for p in members)


def _unstack(tree):
  """The ensemble's stacked parameters (or updates) as K members' trees."""
  return [jax.tree.map(lambda a, m=m: a[m], tree) for m in range(MEMBERS)]


def _run(est, tx, params, batch, steps):
  @jax.jit
  def step(params, state):
    _, grads, stats = est(params, *batch)
    updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state, updates

  state = tx.init(params)
  for _ in range(steps):
    params, state, updates = step(params, state)
  return params, updates


@pytest.mark.parametrize("out_axes, bias", [(0, True), pytest.param(1, False, marks=_ONCE)],
                         ids=["member_major_bias", "batch_major_no_bias"])
def test_a_vmapped_ensemble_equals_its_members_as_separate_models(out_axes, bias):
  params, (x, y) = _ensemble_params(KEY, bias), bf.classification_data(BATCH, SIZES[0], SIZES[2])
  ensemble = jkfac.estimator(_ensemble_loss(out_axes), params, x, y, mode="exact")
  members = jkfac.estimator(_members_loss, _unstack(params), x, y, mode="exact")
  roles = ["kernel", "bias"] if bias else ["kernel"]
  assert [(l.kind, l.stack, [p.role for p in l.params]) for l in ensemble.layers] == [
      ("dense", (MEMBERS,), roles)] * 2, str(ensemble)
  assert "stacked by vmap" in str(ensemble) and len(members.layers) == 2 * MEMBERS
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-15)
  _, grads, stats = jax.jit(lambda p: ensemble(p, x, y))(params)
  _, grads_m, stats_m = jax.jit(lambda p: members(p, x, y))(_unstack(params))
  jax.tree.map(close, _unstack(grads), grads_m)
  for i, layer in enumerate(ensemble.layers):  # member m's layer i is the loop's 2m + i
    for m in range(MEMBERS):
      jax.tree.map(lambda a, b: close(a[m], b), stats.factors[layer.name],
                   stats_m.factors[members.layers[2 * m + i].name])
  final, updates = _run(ensemble, jkfac.kfac(ensemble, inverse_every=2), params, (x, y), 5)
  final_m, updates_m = _run(members, jkfac.kfac(members, inverse_every=2), _unstack(params),
                            (x, y), 5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-8),
               _unstack(updates), updates_m)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-8), _unstack(final),
               final_m)


def test_the_member_major_ensemble_that_crashed_trains_and_its_per_example_pass_is_refused():
  # Regression: this ensemble's first est() call failed inside JAX's VJP.
  params, (x, y) = _ensemble_params(KEY, bias=False), bf.classification_data(BATCH, SIZES[0],
                                                                            SIZES[2])
  loss_fn = lambda p, x, y: jkfac.softmax_cross_entropy(
      jax.vmap(_member, in_axes=(0, None))(p, x), jnp.broadcast_to(y, (MEMBERS, BATCH)))
  est = jkfac.estimator(loss_fn, params, x, y, mode="exact")
  final, _ = _run(est, jkfac.kfac(est), params, (x, y), 2)
  assert all(np.isfinite(a).all() for a in jax.tree.leaves(final))
  # A block that needs per-example gradients cannot find the examples of
  # member-major predictions: a clear error naming the fix, not JAX's.
  est = jkfac.estimator(loss_fn, params, x, y, overrides={"w2": "diagonal"})
  with pytest.raises(ValueError, match="(?s)per-example gradients.*'w2'.*leading axis has "
                                       "size 3.*out_axes=1.*overrides"):
    est(params, x, y, rng=KEY)
