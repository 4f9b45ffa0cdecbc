# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Masked and weighted losses, batch axes, and statistics accumulated over micro-batches."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jkfac
from test_scan import _ONCE

B, D, H, C = 12, 5, 7, 3
MASK = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1], np.float64)
KEEP = np.nonzero(MASK)[0]


def _mlp(key, dtype=jnp.float64):
  k = jax.random.split(key, 2)
  return {"w1": (jax.random.normal(k[0], (D, H)) * 0.5).astype(dtype), "b1": jnp.zeros(H, dtype),
          "w2": (jax.random.normal(k[1], (H, C)) * 0.5).astype(dtype), "b2": jnp.zeros(C, dtype)}


def _apply(p, x):
  return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _train(est, tx, params, args, steps):
  state, losses = tx.init(params), []
  for i in range(steps):
    loss, grads, stats = est(params, *args, rng=jax.random.key(i))
    updates, state = tx.update(grads, state, params, stats=stats)
    params = optax.apply_updates(params, updates)
    losses.append(loss)
  return params, losses


LOSSES = {
    "softmax_cross_entropy": lambda out, y, m: jkfac.softmax_cross_entropy(out, y, mask=m),
    "sigmoid_cross_entropy": lambda out, y, m: jkfac.sigmoid_cross_entropy(
        out, jax.nn.one_hot(y, C), mask=m),
    "squared_error": lambda out, y, m: jkfac.squared_error(out, jax.nn.one_hot(y, C), mask=m),
}


@pytest.mark.parametrize("name, overrides, adaptive", [
    ("softmax_cross_entropy", None, False),
    ("sigmoid_cross_entropy", {"w1*": "diagonal"}, True),
    pytest.param("squared_error", None, True, marks=_ONCE),
])
def test_masking_examples_equals_dropping_them(name, overrides, adaptive):
  """Loss, gradient and two updates (exact mode, float64): masked = dropped.

  Also through the diagonal fallback block (per-example gradients) and the
  quadratic model of the adaptive optimizer (curvature products, loss_at).
  """
  key = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(key[0], (B, D), jnp.float64)
  y = jax.random.randint(key[1], (B,), 0, C)
  params = _mlp(key[2])
  loss = LOSSES[name]
  masked = jkfac.estimator(lambda p, x, y, m: loss(_apply(p, x), y, m), params, x, y,
                           MASK, mode="exact", overrides=overrides)
  dropped = jkfac.estimator(lambda p, x, y: loss(_apply(p, x), y, None), params, x[KEEP],
                            y[KEEP], mode="exact", overrides=overrides)
  loss_m, grads_m, stats_m = masked(params, x, y, MASK)
  loss_d, grads_d, stats_d = dropped(params, x[KEEP], y[KEEP])
  np.testing.assert_allclose(loss_m, loss_d, rtol=1e-8)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-14),
               (grads_m, stats_m.factors), (grads_d, stats_d.factors))
  make = (lambda e: jkfac.kfac(e)) if adaptive else (
      lambda e: jkfac.kfac(e, learning_rate=0.1, momentum=0.9))
  after_m, _ = _train(masked, make(masked), params, (x, y, MASK), 2)
  after_d, _ = _train(dropped, make(dropped), params, (x[KEEP], y[KEEP]), 2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12),
               after_m, after_d)
  assert not np.allclose(after_m["w2"], params["w2"])


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
def test_one_step_on_masked_tokens_is_their_least_squares_solution(weight_sharing):
  """A linear layer over (batch, positions, features), junk targets where masked.

  With squared error the Fisher is the Gauss-Newton matrix, exact for a
  linear model, so one K-FAC step of rate 1 with damping 1e-20 solves the
  least-squares problem of the unmasked tokens (expand: the Kronecker
  factorisation is exact as G is the identity). In reduce mode only whole
  examples are masked (there, tokens of one example are one term).
  """
  batch, positions, features, outputs = 6, 5, 4, 3
  key = jax.random.split(jax.random.key(1), 4)
  x = jax.random.normal(key[0], (batch, positions, features), jnp.float64)
  targets = jax.random.normal(key[1], (batch, positions, outputs), jnp.float64)
  if weight_sharing == "expand":
    mask = (jax.random.uniform(key[2], (batch, positions)) > 0.4).astype(jnp.float64)
  else:
    mask = jnp.array([1, 0, 1, 1, 0, 1], jnp.float64)[:, None] * jnp.ones((1, positions))
  targets = jnp.where(mask[..., None] > 0, targets, 1e3)  # junk where masked
  params = {"w": jax.random.normal(key[3], (features, outputs), jnp.float64),
            "b": jnp.zeros(outputs, jnp.float64)}

  def loss_fn(p, x, t, m):
    return jkfac.squared_error(x @ p["w"] + p["b"], t, mask=m)

  est = jkfac.estimator(loss_fn, params, x, targets, mask, mode="exact",
                        weight_sharing=weight_sharing)
  # Reduce: A holds one row per example (rank 4 < 5), so it needs real damping.
  damping = 1e-20 if weight_sharing == "expand" else 1e-3
  tx = jkfac.kfac(est, learning_rate=1.0, momentum=0.0, damping=damping, kl_clip=None)
  after, _ = _train(est, tx, params, (x, targets, mask), 1)
  rows = np.asarray(mask).reshape(-1) > 0
  design = np.concatenate([np.asarray(x).reshape(-1, features),
                           np.ones((batch * positions, 1))], axis=1)[rows]
  solution = np.linalg.lstsq(design, np.asarray(targets).reshape(-1, outputs)[rows],
                             rcond=None)[0]
  if weight_sharing == "expand":
    np.testing.assert_allclose(after["w"], solution[:-1], rtol=1e-6)
    np.testing.assert_allclose(after["b"], solution[-1], rtol=1e-6, atol=1e-9)
  else:  # reduce: equal to the unmasked examples' own reduce step
    keep = np.asarray(mask[:, 0]) > 0
    dropped = jkfac.estimator(  # the same per-token loss (a mean over tokens), unmasked
        lambda p, x, t: jkfac.squared_error(x @ p["w"] + p["b"], t, mask=jnp.ones(t.shape[:2])),
        params, x[keep], targets[keep], mode="exact", weight_sharing="reduce")
    reference, _ = _train(dropped, jkfac.kfac(dropped, learning_rate=1.0, momentum=0.0,
                                              damping=damping, kl_clip=None),
                          params, (x[keep], targets[keep]), 1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-8), after, reference)


@pytest.mark.parametrize("flatten", [False, True])
def test_masked_tokens_equal_dropped_tokens_under_jit(flatten):
  """A token mask on a per-position model, traced under jit: the statistics are
  those of the unmasked tokens alone (a (tokens, features) batch), also when
  the model flattens the tokens into rows."""
  batch, positions = 4, 6
  key = jax.random.split(jax.random.key(2), 4)
  x = jax.random.normal(key[0], (batch, positions, D), jnp.float64)
  y = jax.random.randint(key[1], (batch, positions), 0, C)
  mask = (jax.random.uniform(key[2], (batch, positions)) > 0.5).astype(jnp.int32)
  params = _mlp(key[3])
  apply = (lambda p, x: _apply(p, x.reshape(-1, D)).reshape(x.shape[:2] + (C,))) if flatten \
      else _apply
  est = jkfac.estimator(
      lambda p, x, y, m: jkfac.softmax_cross_entropy(apply(p, x), y, mask=m), params, x, y,
      mask, mode="exact")
  loss, grads, stats = jax.jit(est)(params, x, y, mask)
  rows = np.asarray(mask).reshape(-1) > 0
  xs, ys = x.reshape(-1, D)[rows], y.reshape(-1)[rows]
  flat = jkfac.estimator(lambda p, x, y: jkfac.softmax_cross_entropy(_apply(p, x), y), params,
                         xs, ys, mode="exact")
  loss_f, grads_f, stats_f = flat(params, xs, ys)
  np.testing.assert_allclose(loss, loss_f, rtol=1e-10)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-14),
               (grads, stats.factors), (grads_f, stats_f.factors))


def test_masked_examples_of_a_convnet_equal_dropped_ones():
  """KFC's patch moments weigh each example's patches by its weight."""
  key = jax.random.split(jax.random.key(4), 3)
  x = jax.random.normal(key[0], (B, 5, 5, 2), jnp.float64)
  y = jax.random.randint(key[1], (B,), 0, C)
  params = {"conv": jax.random.normal(key[2], (3, 3, 2, 4), jnp.float64) * 0.3,
            "bias": jnp.zeros(4, jnp.float64)}

  def logits(p, x):
    h = jax.lax.conv_general_dilated(x, p["conv"], (2, 2), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"]
    return jnp.mean(jnp.tanh(h), axis=(1, 2))[:, :C]

  masked = jkfac.estimator(
      lambda p, x, y, m: jkfac.softmax_cross_entropy(logits(p, x), y, mask=m), params, x, y,
      MASK, mode="exact")
  dropped = jkfac.estimator(lambda p, x, y: jkfac.softmax_cross_entropy(logits(p, x), y),
                            params, x[KEEP], y[KEEP], mode="exact")
  assert masked.layers[0].kind == "conv"
  _, grads, stats = masked(params, x, y, MASK)
  _, grads_d, stats_d = dropped(params, x[KEEP], y[KEEP])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-14),
               (grads, stats.factors), (grads_d, stats_d.factors))


def test_mask_errors():
  logits, labels = jnp.zeros((4, 3, 5)), jnp.zeros((4, 3), jnp.int32)
  with pytest.raises(ValueError, match=r"mask has shape \(3,\).*leading axes"):
    jkfac.softmax_cross_entropy(logits, labels, mask=jnp.ones(3))
  with pytest.raises(ValueError, match="without its class axis"):
    jkfac.softmax_cross_entropy(logits, labels, mask=jnp.ones((4, 3, 5)))
  with pytest.raises(ValueError, match="non-negative"):
    jkfac.squared_error(logits, logits, mask=-jnp.ones(4))
  # A per-example mask broadcasts over positions, a scalar over everything; all
  # masked gives 0, not NaN.
  np.testing.assert_allclose(jkfac.squared_error(logits + 1, logits, mask=2.0),
                             jkfac.squared_error(logits + 1, logits), rtol=1e-6)
  assert float(jkfac.softmax_cross_entropy(logits, labels, mask=jnp.zeros(4))) == 0.0
  np.testing.assert_allclose(jkfac.softmax_cross_entropy(logits, labels, mask=jnp.ones(4)),
                             np.log(5), rtol=1e-6)


def _batchnorm_model():
  flax_nn = pytest.importorskip("flax.linen")

  class Net(flax_nn.Module):
    @flax_nn.compact
    def __call__(self, x, train=True):
      x = flax_nn.Dense(32)(x)
      x = flax_nn.BatchNorm(use_running_average=not train)(x)
      return flax_nn.Dense(C)(jnp.tanh(x))

  return Net()


@_ONCE
def test_batch_argnums_keep_state_of_the_batch_size_whole():
  """A BatchNorm as wide as the batch: stats_fraction slices its batch_stats
  by default and fails with an error naming the option; with the batched
  arguments given it trains."""
  model = _batchnorm_model()
  x = jax.random.normal(jax.random.key(0), (32, D))
  y = jax.random.randint(jax.random.key(1), (32,), 0, C)
  variables = model.init(jax.random.key(2), x)
  params, batch_stats = variables["params"], variables["batch_stats"]

  def loss_fn(params, batch_stats, x, y):
    logits, new = model.apply({"params": params, "batch_stats": batch_stats}, x,
                              mutable=["batch_stats"])
    return jkfac.softmax_cross_entropy(logits, y), new["batch_stats"]

  with pytest.raises(ValueError, match="batch_argnums"):
    est = jkfac.estimator(loss_fn, params, batch_stats, x, y, has_aux=True,
                          stats_fraction=0.25)
    est(params, batch_stats, x, y, rng=jax.random.key(3))
  est = jkfac.estimator(loss_fn, params, batch_stats, x, y, has_aux=True,
                        stats_fraction=0.25, batch_argnums=(1, 2))
  tx = jkfac.kfac(est, learning_rate=0.1, momentum=0.9)
  state = tx.init(params)
  losses = []
  for i in range(3):
    (loss, batch_stats), grads, stats = est(params, batch_stats, x, y, rng=jax.random.key(i))
    updates, state = tx.update(grads, state, params, stats=stats)
    params = optax.apply_updates(params, updates)
    losses.append(float(loss))
  assert losses[-1] < losses[0]


def test_batch_axes_slice_along_the_given_axis():
  """Time-major inputs with batch_axes=1: the statistics of the first half of
  the batch equal those of the batch-major layout's."""
  x = jax.random.normal(jax.random.key(0), (B, 3, D), jnp.float64)
  y = jax.random.randint(jax.random.key(1), (B, 3), 0, C)
  params = _mlp(jax.random.key(2))
  batch_major = jkfac.estimator(
      lambda p, x, y: jkfac.softmax_cross_entropy(_apply(p, x), y), params, x, y,
      mode="exact", stats_fraction=0.5)
  time_major = jkfac.estimator(
      lambda p, x, y: jkfac.softmax_cross_entropy(
          _apply(p, jnp.swapaxes(x, 0, 1)), jnp.swapaxes(y, 0, 1)),
      params, jnp.swapaxes(x, 0, 1), jnp.swapaxes(y, 0, 1), mode="exact",
      stats_fraction=0.5, batch_axes=1)
  _, _, reference = batch_major(params, x, y)
  _, _, stats = time_major(params, jnp.swapaxes(x, 0, 1), jnp.swapaxes(y, 0, 1))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10),
               stats.factors, reference.factors)
  with pytest.raises(ValueError, match="batch_axes has 1 entries"):
    jkfac.estimator(lambda p, x, y: 0.0, params, x, y, batch_axes=(0,))


def test_multi_steps_accumulates_the_statistics():
  """k micro-batches through jkfac.MultiSteps give one k-times larger batch's
  updates (exact mode, float64), twice over."""
  k = 3
  x = jax.random.normal(jax.random.key(0), (k * 4, D), jnp.float64)
  y = jax.random.randint(jax.random.key(1), (k * 4,), 0, C)
  params = _mlp(jax.random.key(2))
  loss_fn = lambda p, x, y: jkfac.softmax_cross_entropy(_apply(p, x), y)
  whole = jkfac.estimator(loss_fn, params, x, y, mode="exact")
  reference, _ = _train(whole, jkfac.kfac(whole, learning_rate=0.2, momentum=0.5), params,
                        (x, y), 2)
  micro = jkfac.estimator(loss_fn, params, x[:4], y[:4], mode="exact")
  tx = jkfac.MultiSteps(jkfac.kfac(micro, learning_rate=0.2, momentum=0.5), k, micro)
  state, p = tx.init(params), params
  step = jax.jit(lambda p, state, x, y: tx.update(*micro(p, x, y)[1:2], state, p,
                                                   stats=micro(p, x, y)[2]))
  for cycle in range(2):
    for i in range(k):
      updates, state = step(p, state, x[4 * i:4 * i + 4], y[4 * i:4 * i + 4])
      assert bool(tx.has_updated(state)) == (i == k - 1)
      p = optax.apply_updates(p, updates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-8), p, reference)
