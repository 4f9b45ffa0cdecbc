"""The optimizer state split over a mesh's devices (`shard_state`, `jkfac.state_layout`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import brute_force as bf
import jkfac
from test_scan import _ONCE  # in the newest-JAX suite only (CI time)
from jkfac import distributed, state_layout

DEVICES = 8
KEY = jax.random.PRNGKey(0)


@pytest.mark.parametrize("shape, padded", [
    ((), ()), ((17, 17), (24, 17)), ((24, 24), (24, 24)), ((17, 9), (24, 9)),
    ((12, 65, 65), (12, 72, 65)), ((3,), (8,)), ((10, 5), (16, 5))])
def test_the_split_axis_is_padded_least_to_a_multiple_of_the_devices(shape, padded):
  assert state_layout.padded_shape(shape, DEVICES) == padded
  axis = state_layout.split_axis(shape, DEVICES)
  if shape:
    assert padded[axis] % DEVICES == 0
    assert state_layout.split_axis(padded, DEVICES) == axis  # stable once padded
  assert state_layout.padded_shape(shape, 1) == shape


def test_stored_arrays_are_split_evenly_and_load_back_unchanged():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:DEVICES]), ("data",))
  tree = {"A": jnp.arange(17.0 * 17).reshape(17, 17), "pi": jnp.float32(2.0),
          "stack": jnp.ones((3, 5, 5))}
  stored = jax.jit(lambda t: state_layout.store(t, mesh))(tree)
  assert stored["A"].shape == (24, 17)
  assert stored["A"].sharding.shard_shape(stored["A"].shape) == (3, 17)
  assert stored["stack"].sharding.shard_shape(stored["stack"].shape) == (3, 1, 5)
  assert stored["pi"].sharding.is_fully_replicated
  np.testing.assert_array_equal(stored["A"][17:], 0.0)
  loaded = jax.jit(state_layout.load)(stored, tree)
  jax.tree.map(np.testing.assert_array_equal, loaded, tree)
  assert state_layout.bytes_per_device(stored) == 8 * (3 * 17 + 3 * 1 * 5) + 4  # f64, pi f32
  shardings = distributed.state_sharding(stored, mesh, min_size=1)
  assert shardings["A"].spec == P("data", None) and shardings["pi"].spec == P()


def _mlp():
  params = bf.mlp_params(KEY, (6, 10, 8, 4))
  x, y = bf.classification_data(16, 6, 4)
  return bf.ce_loss, params, x, y


@_ONCE  # on JAX 0.8.3 the FSDP test of test_multidevice.py splits the state
def test_a_split_state_gives_the_same_updates():
  """Block-tridiagonal chains' factors and inverses (eigendecompositions) split
  over 8 devices: the parameters after three updates equal those of a whole
  state, and every non-scalar array of the state stays split. (A stack's
  three-axis arrays: `test_stored_arrays_are_split_evenly_and_load_back_unchanged`.)"""
  loss_fn, params, x, y = _mlp()
  options = {"structure": "block_tridiagonal", "inverse_method": "eigh"}
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:DEVICES]), ("data",))
  results = []
  for split in (False, True):
    est = jkfac.estimator(loss_fn, params, x, y, mode="exact")
    tx = jkfac.kfac(est, learning_rate=0.1, momentum=0.9, inverse_every=2,
                    mesh=mesh, shard_state=split, **options)

    @jax.jit
    def step(params, state):
      _, grads, stats = est(params, x, y)
      updates, state = tx.update(grads, state, params, stats=stats)
      return optax.apply_updates(params, updates), state

    p, state = params, tx.init(params)
    for _ in range(3):
      p, state = step(p, state)
    results.append((p, state))
  (whole, _), (split, state) = results
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-14),
               whole, split)
  held = [(jax.tree_util.keystr(path), x.shape, x.sharding.shard_shape(x.shape))
          for part in (state[0].factors, state[0].inverses)
          for path, x in jax.tree_util.tree_leaves_with_path(part) if x.ndim]
  assert all(np.prod(s) * DEVICES == np.prod(shape) for _, shape, s in held), held


def test_shard_state_needs_a_mesh():
  loss_fn, params, x, y = _mlp()
  est = jkfac.estimator(loss_fn, params, x, y)
  with pytest.raises(ValueError, match="mesh=jax.make_mesh"):
    jkfac.kfac(est, shard_state=True)
  with pytest.raises(ValueError, match="without axis_name"):
    jkfac.scale_by_kfac(est, damping=1e-3, axis_name="devices", shard_state=True,
                        mesh=jax.sharding.Mesh(np.array(jax.devices()[:2]), ("d",)))
