"""`jkfac.burn_in`: the factors' averages started from batches seen before the first update."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import brute_force as bf
import jkfac

KEY = jax.random.PRNGKey(0)
SIZES = (5, 7, 3)
DAMPING = 1e-2
DEVICES = 8


def _problem():
  params = bf.mlp_params(KEY, SIZES)
  x, y = bf.classification_data(40, SIZES[0], SIZES[-1])
  batches = [(x[i:i + 10], y[i:i + 10]) for i in range(0, 40, 10)]
  return params, batches


def _exact_factors(params, x):
  """Brute-force A and G of every layer (per-example Jacobians, explicit outer products)."""
  a = bf.a_factors(params, x)
  g = bf.exact_g_factors(params, x, "categorical")
  return [(a[i], g[i]) for i in range(len(a))]


def _state_factors(state):
  return [(np.asarray(state.factors[f"l{i}"]["A"]), np.asarray(state.factors[f"l{i}"]["G"]))
          for i in range(len(SIZES) - 1)]


def _assert_factors(state, expected):
  for (a, g), (a_ref, g_ref) in zip(_state_factors(state), expected):
    np.testing.assert_allclose(a, a_ref, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-13)


def _mix(weights, *factor_lists):
  return [tuple(sum(w * f[i][k] for w, f in zip(weights, factor_lists)) for k in range(2))
          for i in range(len(factor_lists[0]))]


def test_the_burn_in_mean_counts_as_one_update_and_preconditions_the_first():
  """Two batches burned in: the factors are their mean; the first update averages
  it half and half with its own batch (ε = 1/2) and preconditions with the
  explicit Kronecker products' inverse of that; the second update takes
  ε = 2/3 (`min(1 - 1/(k + 1), decay)`)."""
  params, batches = _problem()
  est = jkfac.estimator(bf.ce_loss, params, *batches[0], mode="exact")
  tx = jkfac.scale_by_kfac(est, damping=DAMPING)
  state = tx.init(params)
  burn = jax.jit(lambda s, p, x, y: jkfac.burn_in(s, est(p, x, y)[2]))
  for x, y in batches[:2]:
    state = burn(state, params, x, y)
  assert int(state.burned_in) == 2 and int(state.count) == 0
  burned = _mix((0.5, 0.5), *(_exact_factors(params, x) for x, _ in batches[:2]))
  _assert_factors(state, burned)

  @jax.jit
  def update(p, s, x, y):
    _, grads, stats = est(p, x, y)
    return grads, *tx.update(grads, s, p, stats=stats)

  grads, direction, state = update(params, state, *batches[2])
  first = _mix((0.5, 0.5), burned, _exact_factors(params, batches[2][0]))
  _assert_factors(state, first)
  for i, (a, g) in enumerate(first):
    w, b = bf.kfac_dense_update(a, g, np.asarray(grads[f"l{i}"]["w"]),
                                np.asarray(grads[f"l{i}"]["b"]), DAMPING)
    np.testing.assert_allclose(direction[f"l{i}"]["w"], w, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(direction[f"l{i}"]["b"], b, rtol=1e-8, atol=1e-12)

  moved = optax.apply_updates(params, jax.tree.map(lambda d: -0.1 * d, direction))
  _, _, state = update(moved, state, *batches[3])
  _assert_factors(state, _mix((2 / 3, 1 / 3), first, _exact_factors(moved, batches[3][0])))


def test_without_burn_in_the_first_update_takes_its_batch_alone():
  params, batches = _problem()
  est = jkfac.estimator(bf.ce_loss, params, *batches[0], mode="exact")
  tx = jkfac.scale_by_kfac(est, damping=DAMPING)
  _, grads, stats = est(params, *batches[0])
  _, state = tx.update(grads, tx.init(params), params, stats=stats)
  assert int(state.burned_in) == 0
  _assert_factors(state, _exact_factors(params, batches[0][0]))


def test_non_finite_statistics_are_left_out():
  params, batches = _problem()
  est = jkfac.estimator(bf.ce_loss, params, *batches[0], mode="exact")
  state = jkfac.kfac(est).init(params)
  good = est(params, *batches[0])[2]
  state = jkfac.burn_in(state, good)
  bad = est(params, batches[1][0].at[0, 0].set(jnp.nan), batches[1][1])[2]
  after = jax.jit(jkfac.burn_in)(state, bad)
  assert int(after.preconditioner.burned_in) == 1
  _assert_factors(after.preconditioner, _exact_factors(params, batches[0][0]))


def test_burn_in_after_an_update_is_refused_eagerly_and_a_no_op_when_traced():
  params, batches = _problem()
  est = jkfac.estimator(bf.ce_loss, params, *batches[0], mode="exact")
  tx = jkfac.kfac(est, 0.1, momentum=0.9)
  _, grads, stats = est(params, *batches[0])
  _, state = tx.update(grads, tx.init(params), params, stats=stats)
  with pytest.raises(ValueError, match="has made 1 updates; burn in before the first"):
    jkfac.burn_in(state, stats)
  after = jax.jit(jkfac.burn_in)(state, stats)
  jax.tree.map(np.testing.assert_array_equal, after, state)


def test_burn_in_errors_name_the_fix():
  params, batches = _problem()
  est = jkfac.estimator(bf.ce_loss, params, *batches[0], mode="exact")
  stats = est(params, *batches[0])[2]
  with pytest.raises(TypeError, match="third value of"):
    jkfac.burn_in(jkfac.kfac(est).init(params), stats.factors)
  with pytest.raises(ValueError, match="holds no K-FAC state"):
    jkfac.burn_in(optax.adam(1e-3).init(params), stats)
  other = bf.mlp_params(KEY, (5, 4, 3))
  other_est = jkfac.estimator(bf.ce_loss, other, *batches[0], mode="exact")
  with pytest.raises(ValueError, match="has shape .* in the statistics"):
    jkfac.burn_in(jkfac.kfac(est).init(params), other_est(other, *batches[0])[2])


def test_burn_in_in_a_chain_and_a_split_state_gives_the_same_updates():
  """In an optax chain, with the factors split over 8 devices (`shard_state`,
  padded): burn-in then three updates give the parameters of a whole state."""
  params, batches = _problem()
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:DEVICES]), ("data",))
  results = []
  for split in (False, True):
    est = jkfac.estimator(bf.ce_loss, params, *batches[0])
    tx = optax.chain(jkfac.kfac(est, 0.1, momentum=0.9, inverse_every=2, mesh=mesh,
                                shard_state=split), optax.add_decayed_weights(1e-4))

    @jax.jit
    def step(p, s, x, y, key, est=est, tx=tx):
      _, grads, stats = est(p, x, y, rng=key)
      updates, s = tx.update(grads, s, p, stats=stats)
      return optax.apply_updates(p, updates), s

    state = tx.init(params)
    burn = jax.jit(lambda s, p, x, y, key, est=est: jkfac.burn_in(s, est(p, x, y, rng=key)[2]))
    for i, (x, y) in enumerate(batches[:2]):
      state = burn(state, params, x, y, jax.random.PRNGKey(i))
    p = params
    for i, (x, y) in enumerate(batches[1:]):
      p, state = step(p, state, x, y, jax.random.PRNGKey(10 + i))
    results.append((p, state))
  (whole, _), (split, state) = results
  assert int(state[0][0].burned_in) == 2
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-14),
               whole, split)


def test_under_pmap_each_device_burns_in_its_own_statistics():
  params, batches = _problem()
  x, y = bf.classification_data(8 * 4, SIZES[0], SIZES[-1])
  est = jkfac.estimator(bf.ce_loss, params, x[:4], y[:4], mode="exact")
  tx = jkfac.scale_by_kfac(est, damping=DAMPING, axis_name="d")
  state = jax.pmap(tx.init, axis_name="d")(jax.tree.map(lambda a: jnp.stack([a] * DEVICES),
                                                          params))
  state = jax.pmap(lambda s, x, y: jkfac.burn_in(s, est(params, x, y)[2]), axis_name="d")(
      state, x.reshape(DEVICES, 4, -1), y.reshape(DEVICES, 4))
  for d in range(DEVICES):
    _assert_factors(jax.tree.map(lambda a, d=d: a[d], state),
                    _exact_factors(params, x[4 * d:4 * d + 4]))


def test_an_nnx_optimizer_burns_in_eagerly_and_under_nnx_jit():
  """`nnx.Optimizer` keeps each array of the state in an `OptState` variable:
  burn-in keeps them there, and its factors are the plain state's."""
  from flax import nnx

  model = nnx.Sequential(nnx.Linear(5, 7, rngs=nnx.Rngs(0)), nnx.tanh,
                         nnx.Linear(7, 3, rngs=nnx.Rngs(1)))
  _, batches = _problem()
  graphdef, params = nnx.split(model, nnx.Param)
  loss_fn = lambda p, x, y: jkfac.softmax_cross_entropy(nnx.merge(graphdef, p)(x), y)
  est = jkfac.estimator(loss_fn, params, *batches[0], mode="exact")
  optimizer = nnx.Optimizer(model, jkfac.kfac(est), wrt=nnx.Param)
  plain = jkfac.kfac(est).init(params)
  stats = [est(params, *batch)[2] for batch in batches[:2]]
  optimizer.opt_state = jkfac.burn_in(optimizer.opt_state, stats[0])

  @nnx.jit
  def burn(optimizer, model, x, y):
    optimizer.opt_state = jkfac.burn_in(optimizer.opt_state,
                                        est(nnx.state(model, nnx.Param), x, y)[2])

  burn(optimizer, model, *batches[1])
  for s in stats:
    plain = jkfac.burn_in(plain, s)
  kept = optimizer.opt_state.preconditioner
  assert isinstance(kept.burned_in, nnx.Variable) and int(kept.burned_in[...]) == 2
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12),
               jax.tree.leaves(kept.factors), jax.tree.leaves(plain.preconditioner.factors))

  @nnx.jit
  def train_step(model, optimizer, x, y):
    _, grads, stats = est(nnx.state(model, nnx.Param), x, y)
    optimizer.update(model, grads, stats=stats)

  train_step(model, optimizer, *batches[2])
  assert int(optimizer.opt_state.preconditioner.count[...]) == 1
