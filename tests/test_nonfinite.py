"""Non-finite inputs, statistics, gradients and inverses never reach the parameters.

Each test injects NaN or Inf at chosen steps of a jitted training loop (by
adding the bad value to one entry of the input batch, of a layer's factor
statistics, or of the gradient: adding 0 elsewhere, so one compilation) and
checks the parameters stay finite, the state records what happened, and
training goes on.
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import brute_force as bf
import jkfac

KEY = jax.random.PRNGKey(0)
SIZES = (3, 6, 4)
BAD_STEPS = {4: np.nan, 8: np.inf}  # 4 and 8 are inverse refreshes (inverse_every=4)
OPTIMIZERS = ("adaptive", "fixed", "fixed_apply_if_finite")


def _problem(n=32):
  params = bf.mlp_params(KEY, SIZES, dtype=jnp.float32)
  x, y = bf.classification_data(n, SIZES[0], SIZES[-1])
  return params, x.astype(jnp.float32), y


def _optimizer(est, name):
  if name == "adaptive":
    return jkfac.kfac(est, damping=1e-2, inverse_every=4)
  if name == "fixed":  # skip_non_finite=True, the default: a zero step
    return jkfac.kfac(est, 0.1, momentum=0.9, damping=1e-2, inverse_every=4)
  # As any optax optimizer: the non-finite step passed on, apply_if_finite skips it.
  return optax.apply_if_finite(jkfac.kfac(est, 0.1, momentum=0.9, damping=1e-2,
                                          inverse_every=4, skip_non_finite=False), 100)


def _preconditioner(state, name):
  if name == "adaptive":
    return state.preconditioner
  return state.inner_state[0] if name == "fixed_apply_if_finite" else state[0]


def _add_to_first_entry(x, value):
  return x.at[(0,) * x.ndim].add(value.astype(x.dtype))


def _training_step(est, tx, y):
  """A jitted step adding `bad` (a dict of scalars, 0 for none) where it says."""

  @jax.jit
  def step(params, state, x, key, bad):
    x = _add_to_first_entry(x, bad["input"])
    loss, grads, stats = est(params, x, y, rng=key)
    stats.factors["l0"]["A"] = _add_to_first_entry(stats.factors["l0"]["A"], bad["statistics"])
    grads["l1"]["w"] = _add_to_first_entry(grads["l1"]["w"], bad["gradients"])
    updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state, loss, updates

  return step


@functools.lru_cache(maxsize=None)
def _compiled(name):
  """The optimizer `name` and its jitted training step (shared by the tests)."""
  params, x, y = _problem()
  est = jkfac.estimator(bf.ce_loss, params, x, y)
  tx = _optimizer(est, name)
  return tx, _training_step(est, tx, y)


def _injection(where, value):
  bad = {k: jnp.float32(0.0) for k in ("input", "statistics", "gradients")}
  bad[where] = jnp.float32(value)
  return bad


def _all_finite(tree):
  return all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("where", ["input", "statistics", "gradients"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_nan_and_inf_at_chosen_steps_leave_parameters_finite_and_training_going(where, name):
  params, x, _ = _problem()
  tx, step = _compiled(name)
  state = tx.init(params)
  losses = []
  for i in range(14):
    bad = _injection(where, BAD_STEPS.get(i, 0.0))
    before_params, before = params, _preconditioner(state, name)
    params, state, loss, updates = step(params, state, x, jax.random.PRNGKey(i), bad)
    after = _preconditioner(state, name)
    assert _all_finite(params) and _all_finite(after), i
    if i not in BAD_STEPS:
      losses.append(float(loss))
    elif where == "statistics":  # left out of the averages; the step is taken
      jax.tree_util.tree_map(np.testing.assert_array_equal, after.factors, before.factors)
      assert _all_finite(updates) and any(np.any(u != 0) for u in jax.tree_util.tree_leaves(updates))
    else:  # the gradient is not finite: a zero step
      assert all(np.all(u == 0) for u in jax.tree_util.tree_leaves(updates)), i
      jax.tree_util.tree_map(np.testing.assert_array_equal, params, before_params)
  assert losses[-1] < 0.85 * losses[0]  # (the default trust region binds on this tiny MLP)

  final = _preconditioner(state, name)
  reverted = name == "fixed_apply_if_finite" and where != "statistics"
  expected_skipped = 2 if where in ("input", "statistics") and not reverted else 0
  expected_nonfinite = 2 if where in ("input", "gradients") and not reverted else 0
  assert int(final.skipped) == expected_skipped
  assert int(final.nonfinite_grads) == expected_nonfinite
  assert int(final.failed_refreshes) == 0
  if reverted:  # apply_if_finite kept the inner state and counted the steps itself
    assert int(state.total_notfinite) == 2


def test_a_failed_factorisation_keeps_the_previous_inverses_and_is_counted():
  """An indefinite factor makes Cholesky fail: the old inverses stay until it recovers."""
  params, x, y = _problem()
  est = jkfac.estimator(bf.ce_loss, params, x, y)
  tx = jkfac.scale_by_kfac(est, damping=1e-3, inverse_every=1)
  identity = jnp.eye(SIZES[0] + 1, dtype=jnp.float32)

  @jax.jit
  def step(state, key, shift):
    _, grads, stats = est(params, x, y, rng=key)
    stats.factors["l0"]["A"] = stats.factors["l0"]["A"] - shift * identity  # finite
    return tx.update(grads, state, params, stats=stats)

  state = tx.init(params)
  failed_at = []
  for i in range(16):
    before = state
    updates, state = step(state, jax.random.PRNGKey(i), jnp.float32(8.0 if i == 3 else 0.0))
    assert _all_finite(updates) and _all_finite(state.inverses), i
    if int(state.failed_refreshes) > int(before.failed_refreshes):
      failed_at.append(i)
      jax.tree_util.tree_map(np.testing.assert_array_equal, state.inverses, before.inverses)
      assert int(state.last_refresh) == int(before.last_refresh)
  assert failed_at and failed_at[0] == 3, failed_at
  assert int(state.failed_refreshes) == len(failed_at)
  assert int(state.last_refresh) == int(state.count) == 16  # recovered once A is PSD again
  assert int(state.skipped) == 0  # the statistics were finite


@hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
@hypothesis.given(st.lists(st.tuples(st.sampled_from(["input", "statistics", "gradients"]),
                                     st.sampled_from([0.0, np.nan, np.inf, -np.inf, 1e30])),
                           min_size=10, max_size=10),
                  st.sampled_from(OPTIMIZERS[:2]))
def test_no_sequence_of_bad_values_makes_the_parameters_non_finite(sequence, name):
  params, x, _ = _problem()
  tx, step = _compiled(name)
  state = tx.init(params)
  for i, (where, value) in enumerate(sequence):
    params, state, _, _ = step(params, state, x, jax.random.PRNGKey(i), _injection(where, value))
    assert _all_finite(params), (i, where, value)
