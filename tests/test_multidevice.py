"""Several devices (8 CPU devices, see conftest.py) give the one-device result."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import brute_force as bf
import jkfac
from jkfac import distributed

KEY = jax.random.PRNGKey(0)
SIZES = (6, 10, 8, 4)
DEVICES = 8
N = 64


def _single_device(tx_fn, params, x, y, steps):
  est = jkfac.estimator(bf.ce_loss, params, x, y, mode="exact")
  tx = tx_fn(est, None)

  @jax.jit
  def step(params, state):
    _, grads, stats = est(params, x, y)
    updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def _pmapped(tx_fn, params, x, y, steps):
  shard = lambda a: a.reshape((DEVICES, -1) + a.shape[1:])
  est = jkfac.estimator(bf.ce_loss, params, x[:N // DEVICES], y[:N // DEVICES], mode="exact")
  tx = tx_fn(est, "devices")

  def step(params, state, x, y):
    _, grads, stats = est(params, x, y)
    grads = jax.lax.pmean(grads, "devices")
    updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state

  step = jax.pmap(step, axis_name="devices")
  replicate = lambda tree: jax.tree_util.tree_map(lambda a: jnp.stack([a] * DEVICES), tree)
  params, state = replicate(params), replicate(tx.init(params))
  for _ in range(steps):
    params, state = step(params, state, shard(x), shard(y))
  return params, state


OPTIMIZERS = {
    "adaptive": lambda est, axis: jkfac.kfac(est, damping=1e-2, inverse_every=2,
                                             axis_name=axis),
    "fixed_tridiagonal": lambda est, axis: jkfac.kfac(
        est, learning_rate=0.1, momentum=0.9, damping=1e-2, inverse_every=3,
        structure="block_tridiagonal", axis_name=axis),
    "not_spread": lambda est, axis: jkfac.kfac(est, damping=1e-2, inverse_every=2,
                                               axis_name=axis, spread_inverses=False),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_pmap_equals_one_device_on_the_whole_batch(name):
  assert jax.device_count() >= DEVICES
  params = bf.mlp_params(KEY, SIZES)
  x, y = bf.classification_data(N, SIZES[0], SIZES[-1])
  one, _ = _single_device(OPTIMIZERS[name], params, x, y, steps=5)
  many, state = _pmapped(OPTIMIZERS[name], params, x, y, steps=5)
  for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(many)):
    for device in range(DEVICES):
      np.testing.assert_allclose(b[device], a, rtol=1e-8, atol=1e-12)
  # Statistics are synchronised at refreshes only: each device keeps its own averages.
  factors = state[0].factors["l0"]["A"]  # the preconditioner's state, in both cases
  assert not np.allclose(factors[0], factors[1])


def test_balanced_shares_split_cubic_cost_evenly():
  costs = [float(n) ** 3 for n in (100, 100, 90, 80, 60, 50, 40, 30, 20, 10, 10, 5)]
  shares = distributed.balanced_shares(costs, 4)
  assert sorted(i for s in shares for i in s) == list(range(len(costs)))
  loads = [sum(costs[i] for i in s) for s in shares]
  assert max(loads) <= max(max(costs), 1.34 * sum(costs) / 4)


def test_each_device_computes_an_eighth_of_the_inverses():
  sizes = (16,) * 17  # 16 equal dense layers: two per device
  params = bf.mlp_params(KEY, sizes)
  x, y = bf.classification_data(DEVICES * 2, sizes[0], sizes[-1])
  est = jkfac.estimator(bf.ce_loss, params, x[:2], y[:2], mode="exact")
  tx = jkfac.scale_by_kfac(est, damping=1e-2, axis_name="devices")

  def step(params, state, x, y):
    _, grads, stats = est(params, x, y)
    return tx.update(grads, state, params, stats=stats)

  replicate = lambda tree: jax.tree_util.tree_map(lambda a: jnp.stack([a] * DEVICES), tree)
  args = (replicate(params), replicate(tx.init(params)), x.reshape(DEVICES, 2, -1),
          y.reshape(DEVICES, 2))
  jaxpr = jax.make_jaxpr(jax.pmap(step, axis_name="devices"))(*args)
  switches = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "cond"
              and len(e.params["branches"]) == DEVICES]
  assert len(switches) == 1
  per_device = [sum(1 for e in _equations(b.jaxpr) if e.primitive.name == "cholesky")
                for b in switches[0].params["branches"]]
  assert per_device == [4] * DEVICES  # 2 layers x (A, G) each: 1/8 of the 32
  everywhere = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "cholesky"]
  assert len(everywhere) == 4 * DEVICES  # nothing computed outside the switch

  updates, _ = jax.pmap(step, axis_name="devices")(*args)
  replicated = jkfac.scale_by_kfac(est, damping=1e-2, axis_name="devices",
                                   spread_inverses=False)
  ref, _ = jax.pmap(lambda p, s, x, y: replicated.update(
      est(p, x, y)[1], s, p, stats=est(p, x, y)[2]), axis_name="devices")(*args)
  for a, b in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-10)


def _equations(jaxpr):
  """Every equation of a jaxpr and of the jaxprs inside it."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (list, tuple)) else [value]):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None and hasattr(inner, "eqns"):
          yield from _equations(inner)
        elif hasattr(sub, "eqns"):
          yield from _equations(sub)
