"""The block-tridiagonal inverse (K-FAC section 4.3) against its dense formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import brute_force as bf
import jkfac

KEY = jax.random.PRNGKey(0)
SIZES = (3, 5, 4, 3)
N = 12
DAMPING = 0.03


def _output_jacobians(params, x):
  """Per layer, per example, `d logits / d s_i`, shape `(N, classes, out_i)`."""
  n_layers = len(params)
  record = []
  bf.mlp_forward(params, x, record)
  jacobians = []
  for i in range(n_layers):
    def logits_from_s(s, i=i):
      h = jnp.tanh(s) if i < n_layers - 1 else s
      for j in range(i + 1, n_layers):
        sj = h @ params[f"l{j}"]["w"] + params[f"l{j}"]["b"]
        h = jnp.tanh(sj) if j < n_layers - 1 else sj
      return h
    jacobians.append(jax.vmap(jax.jacobian(logits_from_s))(record[i][1]))
  return record, jacobians


def _exact_moments(params, x):
  """Exact-mode A_i, G_i and the cross moments A_{i,i+1}, G_{i,i+1}."""
  record, jacs = _output_jacobians(params, x)
  logits = bf.mlp_forward(params, x)
  h = jax.vmap(lambda z: bf.output_fisher("categorical", z))(logits)
  abar = [bf.homogeneous(inp) for inp, _ in record]
  g = lambda i, j: jnp.einsum("nci,ncd,ndj->ij", jacs[i], h, jacs[j]) / N
  a = lambda i, j: abar[i].T @ abar[j] / N
  count = len(params)
  return ([np.asarray(a(i, i)) for i in range(count)], [np.asarray(g(i, i)) for i in range(count)],
          [np.asarray(a(i, i + 1)) for i in range(count - 1)],
          [np.asarray(g(i, i + 1)) for i in range(count - 1)])


def _dense_tridiagonal_inverse(a, g, a_cross, g_cross, damping):
  """`Ξ^T Λ Ξ` built explicitly from Kronecker products (row-major vec of [W; b])."""
  damped = []
  for ai, gi in zip(a, g):
    pi = np.sqrt((np.trace(ai) / len(ai)) / (np.trace(gi) / len(gi)))
    root = np.sqrt(damping)
    damped.append((ai + pi * root * np.eye(len(ai)), gi + root / pi * np.eye(len(gi))))
  sizes = [len(ai) * len(gi) for ai, gi in damped]
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  xi, lam = np.eye(offsets[-1]), np.zeros((offsets[-1], offsets[-1]))
  for i, (ad, gd) in enumerate(damped):
    block = slice(offsets[i], offsets[i + 1])
    sigma = np.kron(ad, gd)
    if i + 1 < len(damped):
      psi_a = a_cross[i] @ np.linalg.inv(damped[i + 1][0])
      psi_g = g_cross[i] @ np.linalg.inv(damped[i + 1][1])
      xi[block, offsets[i + 1]:offsets[i + 2]] = -np.kron(psi_a, psi_g)
      sigma = sigma - np.kron(psi_a @ damped[i + 1][0] @ psi_a.T,
                              psi_g @ damped[i + 1][1] @ psi_g.T)
    lam[block, block] = np.linalg.inv(sigma)
  return xi.T @ lam @ xi, damped, offsets


def test_update_equals_the_dense_xi_lambda_xi_formula():
  params = bf.mlp_params(KEY, SIZES)
  x, y = bf.classification_data(N, SIZES[0], SIZES[-1])
  est = jkfac.estimator(bf.ce_loss, params, x, y, mode="exact")
  tx = jkfac.scale_by_kfac(est, damping=DAMPING, structure="block_tridiagonal")
  assert est.chains == ((0, 1, 2),)
  assert "block-tridiagonal chain: l0 -> l1 -> l2" in str(est)
  _, grads, stats = est(params, x, y)
  a, g, a_cross, g_cross = _exact_moments(params, x)
  for i in range(2):
    np.testing.assert_allclose(stats.factors[f"l{i}"]["A_next"], a_cross[i], rtol=1e-10)
    np.testing.assert_allclose(stats.factors[f"l{i}"]["G_next"], g_cross[i], rtol=1e-9,
                               atol=1e-13)
  updates, _ = tx.update(grads, tx.init(params), params, stats=stats)

  inverse, damped, offsets = _dense_tridiagonal_inverse(a, g, a_cross, g_cross, DAMPING)
  flat = lambda tree: np.concatenate([np.concatenate([tree[f"l{i}"]["w"], tree[f"l{i}"]["b"][None]])
                                      .reshape(-1) for i in range(3)])
  np.testing.assert_allclose(flat(updates), inverse @ flat(grads), rtol=1e-8, atol=1e-12)

  # The model behind Ξ^T Λ Ξ: its inverse has the damped Kronecker blocks on the
  # diagonal and the undamped cross-moment Kronecker products next to it.
  approx = np.linalg.inv(inverse)
  for i in range(3):
    block = slice(offsets[i], offsets[i + 1])
    np.testing.assert_allclose(approx[block, block], np.kron(*damped[i]), rtol=1e-7, atol=1e-10)
    if i < 2:
      np.testing.assert_allclose(approx[block, offsets[i + 1]:offsets[i + 2]],
                                 np.kron(a_cross[i], g_cross[i]), rtol=1e-7, atol=1e-10)
  # And it is not the block-diagonal update.
  diagonal = jkfac.scale_by_kfac(est, damping=DAMPING)
  block_diag, _ = diagonal.update(grads, diagonal.init(params), params, stats=stats)
  assert not np.allclose(flat(block_diag), flat(updates), rtol=1e-3)


def test_chains_break_at_layers_that_cannot_join_them():
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.LayerNorm()(jnp.tanh(nn.Dense(6)(x)))
      x = jnp.tanh(nn.Dense(6)(x)).reshape(x.shape[0], 2, 3)
      x = jnp.tanh(nn.Dense(4)(x)).mean(axis=1)  # over a sequence: cannot join
      x = jnp.tanh(nn.Dense(5)(x))
      return nn.Dense(3)(x)

  x, y = bf.classification_data(8, 4, 3)
  model = Net()
  params = model.init(KEY, x)["params"]
  est = jkfac.estimator(lambda p, x, y: jkfac.softmax_cross_entropy(model.apply({"params": p}, x), y),
                        params, x, y)
  tx = jkfac.scale_by_kfac(est, damping=1e-2, structure="block_tridiagonal")
  names = [[est.layers[i].name for i in c] for c in est.chains]
  assert names == [["Dense_0", "Dense_1"], ["Dense_3", "Dense_4"]]
  assert "block-diagonal (in no chain): Dense_2, LayerNorm_0" in str(est)
  _, grads, stats = est(params, x, y, rng=KEY)
  updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
  assert all(np.all(np.isfinite(u)) for u in jax.tree_util.tree_leaves(updates))


def test_trains_with_the_adaptive_optimizer_under_jit():
  params = bf.mlp_params(KEY, SIZES)
  x, y = bf.classification_data(64, SIZES[0], SIZES[-1])
  est = jkfac.estimator(bf.ce_loss, params, x, y)
  tx = jkfac.kfac(est, damping=1e-2, structure="block_tridiagonal", inverse_every=3)
  _, state, losses, traces = bf.train_jitted(est, tx, params, (x, y), steps=20)
  assert traces == 1 and np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0]
  assert set(state.preconditioner.inverses["l0"]) == {"psi_A", "psi_G", "K_A", "K_G", "scale"}


def test_stats_made_before_the_transform_was_built_are_refused():
  params = bf.mlp_params(KEY, SIZES)
  x, y = bf.classification_data(N, SIZES[0], SIZES[-1])
  est = jkfac.estimator(bf.ce_loss, params, x, y, mode="exact")
  _, grads, stats = est(params, x, y)
  tx = jkfac.scale_by_kfac(est, damping=DAMPING, structure="block_tridiagonal")
  with pytest.raises(ValueError, match="build the optimizer before tracing"):
    tx.update(grads, tx.init(params), params, stats=stats)
