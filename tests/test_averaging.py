"""Polyak iterate averaging against a brute-force numpy recurrence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkfac.averaging import PolyakAveraging, PolyakState, averaged_params, polyak_average


def _iterates(steps, dtype=np.float64, seed=0):
  rng = np.random.RandomState(seed)
  return [{"w": rng.randn(3, 2).astype(dtype), "b": rng.randn(2).astype(dtype)}
          for _ in range(steps)]


def _brute_force(iterates, decay):
  """θ̄_k = (1 - ξ_k) θ̄_{k-1} + ξ_k θ_k, ξ_k = max(1/k, 1 - decay), in float64."""
  average = None
  for k, params in enumerate(iterates, start=1):
    xi = max(1.0 / k, 1.0 - decay)
    params = {n: np.asarray(v, np.float64) for n, v in params.items()}
    average = params if average is None else {
        n: (1 - xi) * average[n] + xi * params[n] for n in params}
  return average


def test_x64_is_on_in_tests():
  assert jnp.zeros(1, jnp.float64).dtype == jnp.float64


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 12])
def test_matches_the_recurrence_float64(steps):
  # decay 0.75: 1/k phase for k <= 4, then exponential; 12 steps see both.
  iterates = _iterates(steps)
  averaging = polyak_average(0.75)
  state = averaging.init(iterates[0])
  assert int(state.count) == 0 and state.count.dtype == jnp.int32
  for params in iterates:
    state = averaging.update(state, params)
  assert int(state.count) == steps
  want = _brute_force(iterates, 0.75)
  for name in want:
    assert state.average[name].dtype == jnp.float64
    np.testing.assert_allclose(state.average[name], want[name], rtol=1e-13, atol=1e-13)


def test_first_step_is_the_params_and_then_the_mean():
  iterates = _iterates(3)
  averaging = polyak_average(0.99)
  state = averaging.update(averaging.init(jax.tree.map(np.zeros_like, iterates[0])), iterates[0])
  for name in iterates[0]:
    np.testing.assert_array_equal(state.average[name], iterates[0][name])
  for params in iterates[1:]:
    state = averaging.update(state, params)
  for name in iterates[0]:  # k <= 100: a uniform average.
    np.testing.assert_allclose(state.average[name],
                               np.mean([p[name] for p in iterates], axis=0), rtol=1e-13)


def test_exponential_phase_forgets_at_rate_one_minus_decay():
  averaging = polyak_average(0.5)
  state = averaging.init({"x": jnp.zeros(())})
  for value in [1.0, 1.0, 1.0]:
    state = averaging.update(state, {"x": jnp.asarray(value)})
  state = averaging.update(state, {"x": jnp.asarray(3.0)})  # ξ_4 = max(1/4, 0.5)
  np.testing.assert_allclose(state.average["x"], 2.0)


def test_decay_zero_keeps_the_latest():
  iterates = _iterates(3)
  averaging = polyak_average(0.0)
  state = averaging.init(iterates[0])
  for params in iterates:
    state = averaging.update(state, params)
  for name in iterates[-1]:
    np.testing.assert_array_equal(state.average[name], iterates[-1][name])


def test_bfloat16_params_are_averaged_in_float32():
  iterates = [jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), p)
              for p in _iterates(150, np.float32)]
  averaging = polyak_average(0.99)
  state = averaging.init(iterates[0])
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state.average))
  update = jax.jit(averaging.update)
  for params in iterates:
    state = update(state, params)
  want = _brute_force([jax.tree.map(np.asarray, p) for p in iterates], 0.99)
  for name in want:
    assert state.average[name].dtype == jnp.float32
    np.testing.assert_allclose(state.average[name], want[name], rtol=1e-5, atol=1e-6)
  cast = averaged_params(state, iterates[0])
  assert all(c.dtype == jnp.bfloat16 for c in jax.tree.leaves(cast))
  assert jax.tree.structure(cast) == jax.tree.structure(iterates[0])
  for name in want:
    np.testing.assert_array_equal(cast[name], state.average[name].astype(jnp.bfloat16))


def test_float32_params_keep_a_float32_average_and_structure():
  params = {"layer": (jnp.ones((2,), jnp.float32), [jnp.zeros((1, 2), jnp.float32)])}
  state = polyak_average().init(params)
  assert jax.tree.structure(state.average) == jax.tree.structure(params)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state.average))


def test_jit_update_matches_eager():
  iterates = _iterates(20)
  averaging = polyak_average(0.9)
  assert isinstance(averaging, PolyakAveraging)
  eager = jitted = averaging.init(iterates[0])
  update = jax.jit(averaging.update)
  for params in iterates:
    eager, jitted = averaging.update(eager, params), update(jitted, params)
  assert isinstance(jitted, PolyakState)
  assert int(jitted.count) == 20
  for name in iterates[0]:
    np.testing.assert_allclose(jitted.average[name], eager.average[name], rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(jitted.average["w"], _brute_force(iterates, 0.9)["w"], rtol=1e-13)


def test_update_under_scan():
  iterates = _iterates(10)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *iterates)
  averaging = polyak_average(0.8)
  state, _ = jax.lax.scan(lambda s, p: (averaging.update(s, p), None),
                          averaging.init(iterates[0]), stacked)
  np.testing.assert_allclose(state.average["b"], _brute_force(iterates, 0.8)["b"], rtol=1e-13)


@pytest.mark.parametrize("decay", [1.0, 1.5, -0.1, float("nan")])
def test_decay_out_of_range_is_an_error(decay):
  with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
    polyak_average(decay)
