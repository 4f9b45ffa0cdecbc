"""Precision: half-precision parameters with float32 factors, float64 with x64,
and the estimator's `factor_dtype` option.

The test configuration enables x64, so any stray float64 (a Python float made
into an array) would show up in the float32 state checked here.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jkfac

HALF = [jnp.bfloat16, jnp.float16]
SIZES = (6, 12, 4)


def _params(dtype: Any, seed: int = 0) -> list[dict[str, jax.Array]]:
  """A small MLP's parameters, drawn in float32 and cast to `dtype`."""
  keys = jax.random.split(jax.random.PRNGKey(seed), len(SIZES) - 1)
  return [{"w": (jax.random.normal(k, (m, n), jnp.float32) / np.sqrt(m)).astype(dtype),
           "b": jnp.full((n,), 0.1, dtype)}
          for k, m, n in zip(keys, SIZES[:-1], SIZES[1:])]


def _batch(dtype: Any, n: int = 64, seed: int = 1) -> tuple[jax.Array, jax.Array]:
  x = jax.random.normal(jax.random.PRNGKey(seed), (n, SIZES[0]), jnp.float32)
  labels = (jnp.sum(x[:, :2], axis=1) > 0).astype(jnp.int32) + 2 * (x[:, 2] > 0)
  return x.astype(dtype), labels


def _loss(params, x, labels):
  h = x
  for i, layer in enumerate(params):
    h = h @ layer["w"] + layer["b"]
    if i < len(params) - 1:
      h = jnp.tanh(h)
  return jkfac.softmax_cross_entropy(h, labels)


def _cast(tree: Any, dtype: Any) -> Any:
  return jax.tree.map(lambda a: a.astype(dtype), tree)


def _dtypes(tree: Any) -> set:
  """The dtypes of the floating leaves of `tree`."""
  return {jnp.dtype(a.dtype) for a in jax.tree.leaves(tree)
          if jnp.issubdtype(a.dtype, jnp.floating)}


def _step(est, tx):
  """The jitted training step, which also returns the loss, updates, grads and stats."""

  def step(params, state, key, batch):
    loss, grads, stats = est(params, *batch, rng=key)
    updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state, (loss, updates, grads, stats)

  return step


def _train(est, tx, params, batch, steps: int):
  """`steps` jitted training steps on one batch; returns the losses, the new
  parameters, and the last step's updates, gradients, statistics and state."""
  state = tx.init(params)
  step = jax.jit(_step(est, tx))
  losses = []
  for k in range(steps):
    params, state, (loss, updates, grads, stats) = step(params, state,
                                                        jax.random.PRNGKey(100 + k), batch)
    losses.append(float(loss))
  return losses, params, updates, grads, stats, state


def _shapes(est, tx, params, batch):
  """The dtypes of one training step's outputs, traced but not compiled."""
  state = jax.eval_shape(tx.init, params)
  return jax.eval_shape(_step(est, tx), params, state, jax.random.PRNGKey(0), batch)


def _check_kfac_state(state: Any, adaptive: bool, factor: Any, param: Any) -> None:
  """Everything is in the factor dtype except the parameter-shaped momentum."""
  if adaptive:
    assert _dtypes(state.preconditioner) == {jnp.dtype(factor)}
    assert _dtypes(state.quadratic_model.previous_update) == {jnp.dtype(param)}
    assert _dtypes(state.quadratic_model._replace(previous_update=())) == {jnp.dtype(factor)}
    assert _dtypes((state.damping, state.reduction_ratio, state.gamma)) == {jnp.dtype(factor)}
  else:
    preconditioner, _, momentum, _ = state  # the trust region (off) between
    assert _dtypes(preconditioner) == {jnp.dtype(factor)}
    assert _dtypes(momentum) == {jnp.dtype(param)}


# --- half-precision parameters ------------------------------------------------

@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fixed"])
@pytest.mark.parametrize("dtype", HALF, ids=["bfloat16", "float16"])
def test_half_params_train_with_float32_factors(dtype, adaptive):
  params, batch = _params(dtype), _batch(dtype)
  est = jkfac.estimator(_loss, params, *batch)
  assert est.factor_dtype == jnp.float32
  # Fixed: scale_by_kfac, then optax's momentum and learning rate.
  tx = jkfac.kfac(est, damping_interval=2) if adaptive else jkfac.kfac(est, 0.1, 0.9, 1e-2)
  losses, new_params, updates, grads, stats, state = _train(est, tx, params, batch, 8)
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < 0.8 * losses[0], losses
  param_dtypes = jax.tree.map(lambda a: a.dtype, params)
  for tree in (updates, new_params, grads):  # the parameters' dtype throughout
    assert jax.tree.map(lambda a: a.dtype, tree) == param_dtypes
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(new_params))
  assert _dtypes(stats.factors) == {jnp.dtype(jnp.float32)}
  _check_kfac_state(state, adaptive, jnp.float32, dtype)
  if adaptive:  # the reduction ratio was measured (every 2 steps), in float32
    assert np.isfinite(float(state.reduction_ratio))


@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 3e-2), (jnp.float16, 5e-3)],
                         ids=["bfloat16", "float16"])
def test_half_statistics_match_float32_on_the_same_values(dtype, tol):
  # The float32 computation on the same (upcast) parameters and inputs; mode
  # "exact" so that no sampled target can differ between the two.
  params, batch = _params(dtype), _batch(dtype)
  params32, batch32 = _cast(params, jnp.float32), (batch[0].astype(jnp.float32), batch[1])
  half = jkfac.estimator(_loss, params, *batch, mode="exact")
  full = jkfac.estimator(_loss, params32, *batch32, mode="exact")
  loss, grads, stats = jax.jit(half)(params, *batch)
  _, grads32, stats32 = jax.jit(full)(params32, *batch32)
  assert loss.dtype == jnp.float32  # jkfac's losses are computed in float32
  for got, want in zip(jax.tree.leaves(stats.factors), jax.tree.leaves(stats32.factors)):
    assert got.dtype == jnp.float32
    assert np.linalg.norm(got - want) <= tol * np.linalg.norm(want)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads32)):
    assert got.dtype == dtype
    np.testing.assert_allclose(np.float32(got), want, rtol=0,
                               atol=tol * float(np.max(np.abs(want))))


@pytest.mark.parametrize("dtype", HALF, ids=["bfloat16", "float16"])
def test_half_statistics_are_accumulated_in_float32(dtype):
  # 4096 inputs near 1: summed in half precision, x^T x would stall at 256
  # (bfloat16) or lose its low digits (float16); in float32 it is exact to
  # round-off against float64 on the same half-precision values.
  n = 4096
  x = (1.0 + 0.05 * jax.random.normal(jax.random.PRNGKey(3), (n, SIZES[0]))).astype(dtype)
  labels = jnp.arange(n, dtype=jnp.int32) % SIZES[-1]
  params = _params(dtype)
  est = jkfac.estimator(_loss, params, x, labels, mode="empirical")
  a = np.asarray(jax.jit(est)(params, x, labels)[2].factors[est.layers[0].name]["A"],
                 np.float64)
  xs = np.asarray(x.astype(jnp.float32), np.float64)
  ones = np.concatenate([xs, np.ones((n, 1))], axis=1)
  np.testing.assert_allclose(a, ones.T @ ones / n, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32],
                         ids=["float16", "bfloat16", "float32"])
def test_curvature_products_of_long_vectors_do_not_overflow(dtype):
  # The quadratic model's Gram matrix of vectors far beyond float16's range
  # (65504): they are scaled by a power of two before the product, so the
  # result is exactly 4^k times that of the short vectors.
  params, batch = _params(dtype), _batch(dtype)
  est = jkfac.estimator(_loss, params, *batch, mode="exact")
  grads = _cast(jax.jit(est)(params, *batch)[1], jnp.float32)
  other = jax.tree.map(lambda g: jnp.flip(g, axis=0) + 0.01, grads)

  @jax.jit
  def gram(scale):
    vectors = [jax.tree.map(lambda v: v * scale, v) for v in (grads, other)]
    return est(params, *batch)[2].extras["curvature"](vectors)

  short, long = gram(1.0), gram(2.0 ** 30)
  assert np.all(np.isfinite(long)) and short.dtype == long.dtype == jnp.float32
  np.testing.assert_array_equal(long, short * 2.0 ** 60)
  assert float(short[0, 0]) > 0


def test_float32_params_cast_to_bfloat16_in_the_model():
  # Mixed precision: float32 parameters, cast to bfloat16 inside the loss.
  # The layers are still found through the casts, and the updates are float32.
  def loss(params, x, labels):
    return _loss(_cast(params, jnp.bfloat16), x, labels)

  params, batch = _params(jnp.float32), _batch(jnp.bfloat16)
  est = jkfac.estimator(loss, params, *batch)
  assert [layer.kind for layer in est.layers] == ["dense", "dense"]
  new_params, state, (_, updates, grads, stats) = _shapes(est, jkfac.kfac(est), params, batch)
  assert _dtypes((new_params, updates, grads, stats.factors)) == {jnp.dtype(jnp.float32)}
  _check_kfac_state(state, True, jnp.float32, jnp.float32)


# --- float64 and the factor_dtype option ---------------------------------------

@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fixed"])
def test_float64_params_give_float64_everything(adaptive):
  params, batch = _params(jnp.float64), _batch(jnp.float64)
  est = jkfac.estimator(_loss, params, *batch)
  assert est.factor_dtype == jnp.float64
  tx = jkfac.kfac(est) if adaptive else jkfac.kfac(est, 0.1, 0.9, damping=1e-2)
  new_params, state, (loss, updates, grads, stats) = _shapes(est, tx, params, batch)
  assert _dtypes((new_params, updates, grads, stats, loss)) == {jnp.dtype(jnp.float64)}
  _check_kfac_state(state, adaptive, jnp.float64, jnp.float64)


@pytest.mark.parametrize("param,factor", [(jnp.float32, jnp.float64), (jnp.float64, jnp.float32),
                                          (jnp.bfloat16, jnp.float64)],
                         ids=["f32-params-f64-factors", "f64-params-f32-factors",
                              "bf16-params-f64-factors"])
def test_factor_dtype_option(param, factor):
  params, batch = _params(param), _batch(param)
  est = jkfac.estimator(_loss, params, *batch, factor_dtype=factor)
  assert est.factor_dtype == factor
  for adaptive in (True, False):
    tx = jkfac.kfac(est) if adaptive else jkfac.kfac(est, 0.1, 0.9, damping=1e-2)
    new_params, state, (_, updates, grads, stats) = _shapes(est, tx, params, batch)
    assert _dtypes(stats.factors) == {jnp.dtype(factor)}
    assert _dtypes((new_params, updates, grads)) == {jnp.dtype(param)}
    _check_kfac_state(state, adaptive, factor, param)


def test_factor_dtype_float32_is_the_default_on_float32_params():
  params, batch = _params(jnp.float32), _batch(jnp.float32)
  default = jkfac.estimator(_loss, params, *batch)
  explicit = jkfac.estimator(_loss, params, *batch, factor_dtype="float32")
  assert explicit.factor_dtype == default.factor_dtype == jnp.float32


# --- errors ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF, ids=["bfloat16", "float16"])
def test_half_factor_dtype_is_refused_with_the_reason(dtype):
  params, batch = _params(dtype), _batch(dtype)
  with pytest.raises(ValueError, match="not supported.*Keep the parameters in half precision"):
    jkfac.estimator(_loss, params, *batch, factor_dtype=dtype)


@pytest.mark.parametrize("bad", [jnp.int32, jnp.complex64, "float8_e4m3fn", "nonsense", 3.0])
def test_other_factor_dtypes_are_refused(bad):
  params, batch = _params(jnp.float32), _batch(jnp.float32)
  with pytest.raises(ValueError, match="factor_dtype must be jnp.float32 or jnp.float64"):
    jkfac.estimator(_loss, params, *batch, factor_dtype=bad)


def test_float64_factors_need_x64():
  with jax.enable_x64(False):
    params = [{"w": np.ones((3, 2), np.float32)}]
    loss = lambda p, x: jkfac.squared_error(x @ p[0]["w"], np.zeros((4, 2), np.float32))
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="jax_enable_x64"):
      jkfac.estimator(loss, params, x, factor_dtype=jnp.float64)
    assert jkfac.estimator(loss, params, x).factor_dtype == jnp.float32
