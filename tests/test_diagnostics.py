"""diagnostics and format_diagnostics: figures against numpy, every block kind, any state."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import brute_force as bf
import jkfac
from jkfac import diagnostics, format_diagnostics

KEY = jax.random.PRNGKey(0)
SIZES = (3, 6, 4)


def _cond(matrix):
  values = np.linalg.eigvalsh(matrix)
  return values[-1] / values[0]


def test_figures_equal_numpy_on_the_state_and_steps_since_refresh_count():
  params = bf.mlp_params(KEY, SIZES)
  x, y = bf.classification_data(24, SIZES[0], SIZES[-1])
  est = jkfac.estimator(bf.ce_loss, params, x, y)
  damping = 0.05
  tx = jkfac.scale_by_kfac(est, damping=damping, inverse_every=3, inverse_warmup=0)
  state = tx.init(params)

  @jax.jit
  def step(state, key):
    _, grads, stats = est(params, x, y, rng=key)
    updates, state = tx.update(grads, state, params, stats=stats)
    return grads, updates, state

  since = []
  for i in range(5):
    grads, updates, state = step(state, jax.random.PRNGKey(i))
    since.append(int(state.count - state.last_refresh))
    if since[-1] == 0:
      refreshed = state.factors  # what the inverses in use were computed from
  assert since == [0, 1, 2, 0, 1]  # refreshed at updates 1 and 4

  diag = diagnostics(est, state, updates, grads)
  for name in ("l0", "l1"):
    a, g = (np.asarray(state.factors[name][k]) for k in ("A", "G"))
    a_used, g_used = (np.asarray(refreshed[name][k]) for k in ("A", "G"))
    figures = diag.layers[name]
    pi = np.sqrt((np.trace(a_used) / a.shape[0]) / (np.trace(g_used) / g.shape[0]))
    np.testing.assert_allclose(figures["pi"], pi, rtol=1e-10)
    np.testing.assert_allclose(figures["damping_A"], pi * np.sqrt(damping), rtol=1e-10)
    np.testing.assert_allclose(figures["damping_G"], np.sqrt(damping) / pi, rtol=1e-10)
    np.testing.assert_allclose(figures["trace_A"], np.trace(a), rtol=1e-12)
    np.testing.assert_allclose(figures["trace_G"], np.trace(g), rtol=1e-12)
    np.testing.assert_allclose(figures["condition_A"], _cond(a), rtol=1e-6)
    # The inverses in use come from the factors of update 4 (the last refresh).
    damped = a_used + pi * np.sqrt(damping) * np.eye(a.shape[0])
    np.testing.assert_allclose(figures["damped_condition_A"], _cond(damped), rtol=1e-6)
    layer_update = [updates[name]["w"], updates[name]["b"]]
    np.testing.assert_allclose(figures["update_norm"],
                               np.sqrt(sum(np.sum(np.square(u)) for u in layer_update)),
                               rtol=1e-6)
    np.testing.assert_allclose(figures["grad_norm"],
                               np.sqrt(np.sum(np.square(grads[name]["w"]))
                                       + np.sum(np.square(grads[name]["b"]))), rtol=1e-6)
  assert int(diag.overall["count"]) == 5 and int(diag.overall["steps_since_refresh"]) == 1
  np.testing.assert_allclose(diag.overall["damping"], damping)


@pytest.mark.parametrize("which", ["adaptive", "fixed", "apply_if_finite", "chained"])
def test_any_state_holding_a_jkfac_state_under_jit(which):
  params = bf.mlp_params(KEY, SIZES, dtype=jnp.float32)
  x, y = bf.classification_data(24, SIZES[0], SIZES[-1])
  x = x.astype(jnp.float32)
  est = jkfac.estimator(bf.ce_loss, params, x, y)
  tx = {"adaptive": lambda: jkfac.kfac(est, damping=1e-2),
        "fixed": lambda: jkfac.kfac(est, 0.1, momentum=0.9, damping=1e-2),
        "apply_if_finite": lambda: optax.apply_if_finite(jkfac.kfac(est, 0.1, 0.9, 1e-2), 3),
        "chained": lambda: optax.chain(optax.clip_by_global_norm(1.0),
                                       jkfac.scale_by_kfac(est, damping=1e-2),
                                       optax.scale(-0.1))}[which]()

  @jax.jit
  def step(state):
    _, grads, stats = est(params, x, y, rng=KEY)
    updates, state = tx.update(grads, state, params, stats=stats)
    return diagnostics(est, state, updates)

  diag = step(tx.init(params))
  assert set(diag.layers) == {"l0", "l1"}
  assert all(np.isfinite(v) for f in diag.layers.values() for v in f.values())
  assert ("learning_rate" in diag.overall) == (which == "adaptive")
  text = format_diagnostics(diag, est)
  assert "l0     dense" in text and "damped_condition_G" in text and "count 1" in text


class _Mixed(nn.Module):
  @nn.compact
  def __call__(self, tokens, image):
    h = nn.Embed(7, 4)(tokens).mean(axis=1)
    c = nn.Conv(3, (2, 2), feature_group_count=1)(image).mean(axis=(1, 2))
    h = nn.LayerNorm()(jnp.concatenate([h, c], axis=-1))
    h = h * jnp.exp(self.param("log_gate", nn.initializers.zeros, (7,)))  # diagonal fallback
    return nn.Dense(5)(h)


def test_every_block_kind_has_its_figures():
  model = _Mixed()
  tokens = jax.random.randint(KEY, (8, 3), 0, 7)
  image = jax.random.normal(KEY, (8, 5, 5, 2))
  labels = jnp.arange(8) % 5
  params = model.init(KEY, tokens, image)
  loss_fn = lambda p, t, i, l: jkfac.softmax_cross_entropy(model.apply(p, t, i), l)
  est = jkfac.estimator(loss_fn, params, tokens, image, labels)
  tx = jkfac.kfac(est, 0.1, momentum=0.9, damping=1e-2)

  @jax.jit
  def step(state):
    _, grads, stats = est(params, tokens, image, labels, rng=KEY)
    updates, state = tx.update(grads, state, params, stats=stats)
    return diagnostics(est, state, updates)

  diag = step(tx.init(params))
  kinds = {l.name: l.kind for l in est.layers}
  for name, figures in diag.layers.items():
    if kinds[name] in ("dense", "conv", "embedding"):
      assert {"pi", "damping_A", "trace_A", "condition_G", "damped_condition_G"} <= set(figures)
    else:
      assert {"damping", "trace_diag", "condition_diag"} <= set(figures), (name, kinds[name])
    assert all(np.isfinite(v) or k.startswith("condition") for k, v in figures.items())
  assert {"embedding", "conv", "scale_and_shift", "diagonal", "dense"} <= set(kinds.values())
  print(format_diagnostics(diag, est))


def test_a_state_without_jkfac_is_an_error():
  params = bf.mlp_params(KEY, SIZES)
  x, y = bf.classification_data(8, SIZES[0], SIZES[-1])
  est = jkfac.estimator(bf.ce_loss, params, x, y)
  with pytest.raises(ValueError, match="holding one jkfac scale_by_kfac state, found 0"):
    diagnostics(est, optax.adam(1e-3).init(params))
