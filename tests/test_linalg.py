"""linalg: damped inverses by Cholesky and by eigendecomposition, π, finiteness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkfac import linalg


def _psd(n, rank, dtype, seed=0):
  x = np.random.default_rng(seed).standard_normal((rank, n)) + 0.5
  return jnp.asarray(x.T @ x / rank, dtype)


@pytest.mark.parametrize("method", linalg.METHODS)
def test_damped_inverse_equals_dense_inverse(method):
  matrix = _psd(7, 3, jnp.float64)  # rank 3 of 7: singular without the shift
  got = linalg.damped_inverse(matrix, jnp.float64(0.05), method)
  expected = np.linalg.inv(np.asarray(matrix) + 0.05 * np.eye(7))
  np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_methods_agree_in_float32_on_a_rank_deficient_factor():
  matrix = _psd(300, 40, jnp.float32)
  shift = jnp.float32(1e-3)
  by_cholesky = linalg.damped_inverse(matrix, shift, "cholesky")
  by_eigh = linalg.damped_inverse(matrix, shift, "eigh")
  np.testing.assert_allclose(by_cholesky, by_eigh, rtol=2e-3, atol=2e-3 / float(shift))


@pytest.mark.parametrize("method", linalg.METHODS)
def test_a_shift_below_round_off_is_raised_to_a_positive_definite_inverse(method):
  matrix = _psd(500, 20, jnp.float32) * 1e4  # float32 cannot resolve a shift of 1e-9 here
  inverse = linalg.damped_inverse(matrix, jnp.float32(1e-9), method)
  assert np.all(np.isfinite(inverse))
  assert np.min(np.linalg.eigvalsh(np.asarray(inverse, np.float64))) > 0
  # the raised shift is 8 eps tr(M): the inverse's largest eigenvalue is its reciprocal
  floor = 8 * np.finfo(np.float32).eps * float(jnp.trace(matrix))
  np.testing.assert_allclose(np.max(np.linalg.eigvalsh(np.asarray(inverse, np.float64))),
                             1 / floor, rtol=1e-2)


def test_unknown_method_is_refused():
  with pytest.raises(ValueError, match="cholesky"):
    linalg.damped_inverse(jnp.eye(2), 1.0, "qr")


def test_pi_balances_the_traces():
  a, g = jnp.diag(jnp.array([4.0, 4.0])), jnp.diag(jnp.array([1.0, 1.0, 1.0]))
  np.testing.assert_allclose(linalg.pi_factor(a, g), 2.0)
  np.testing.assert_allclose(linalg.pi_factor(jnp.zeros((2, 2)), g), 1.0)


def test_all_finite_sees_any_non_finite_entry():
  tree = {"a": jnp.ones((3, 3)), "b": jnp.ones(4)}
  assert bool(linalg.all_finite(tree))
  for leaf, value in (("a", jnp.nan), ("b", jnp.inf)):
    bad = dict(tree, **{leaf: tree[leaf].at[1].set(value)})
    assert not bool(linalg.all_finite(bad))
