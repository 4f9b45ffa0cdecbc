"""Checkpoints: the whole training state (parameters, optimizer state, Polyak
average) round-trips through orbax-checkpoint and flax serialization, and a run
resumed from a checkpoint equals the uninterrupted run bit for bit (every
parameter, every leaf of the optimizer state, every loss, at every step).

Each configuration trains `STEPS` steps, step `i` on batch `i % BATCHES` with
key `fold_in(KEY, i)`. The checkpoints of steps `SAVE_AT` are restored into a
freshly initialised state (the structure comes from there) and training goes
on to `STEPS`: with the same compiled step, and once with a new model,
estimator, optimizer and compiled step, as a new process would build them. The
resumed segments cross an inverse refresh (`inverse_every`), a damping
adaptation (`damping_interval`) and a re-choice of γ (`gamma_interval`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import brute_force as bf
import jkfac

KEY = jax.random.PRNGKey(0)
STEPS = 10
SAVE_AT = (2, 5)  # after 2 steps ρ is still NaN (damping_interval 3); 5: ρ measured
# Refresh at updates 1, 5, 9; λ adapted at updates 3, 6, 9; γ re-chosen at 4, 8.
SCHEDULE = {"inverse_every": 4, "inverse_warmup": 1, "damping_interval": 3}
BATCHES = 3
# The training state lives on one device, committed there, as after
# `jax.device_put(state, DEVICE)`. Orbax restores committed arrays; flax returns
# numpy arrays, put on the device here too: the compiled step sees the same
# input placement and runs without compiling again (it would compile once more
# for numpy or uncommitted inputs, to the same results).
DEVICE = jax.devices()[0]


class Run(NamedTuple):
  """One training set-up, built from scratch as a new process would.

  Attributes:
    init: `() -> state`, the training state `{"params", "opt_state"[, "average"]}`
      at step 0.
    step: the jitted `(state, x, y, key) -> (state, loss)`.
    batches: the batches; step `i` (from 0) uses `batches[i % BATCHES]`.
    traces: one entry per tracing of `step`.
  """
  init: Callable[[], dict[str, Any]]
  step: Callable[..., tuple[dict[str, Any], jax.Array]]
  batches: list[tuple[jax.Array, jax.Array]]
  traces: list[int]


def _mlp_problem(sizes: tuple[int, ...] = (3, 6, 4), dtype: Any = jnp.float32,
                 overrides: Optional[dict[str, str]] = None):
  """A tanh MLP, classifying 3 features into 4 classes; layers `l0`, `l1`, ..."""
  params = bf.mlp_params(KEY, sizes, dtype=dtype)
  x, y = bf.classification_data(16 * BATCHES, 3, 4)
  batches = [(x[i::BATCHES].astype(dtype), y[i::BATCHES]) for i in range(BATCHES)]
  est = jkfac.estimator(bf.ce_loss, params, *batches[0], overrides=overrides)
  return params, batches, est


class ConvNet(nn.Module):
  """A convolution, LayerNorm (a scale and shift), a dense head."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = jnp.tanh(nn.LayerNorm()(nn.Conv(4, (3, 3))(x)))
    return nn.Dense(3)(h.mean(axis=(1, 2)))


def _conv_problem():
  model = ConvNet()
  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  x = jax.random.normal(kx, (8 * BATCHES, 5, 5, 2), jnp.float32)
  y = jax.random.randint(ky, (8 * BATCHES,), 0, 3)
  batches = [(x[i::BATCHES], y[i::BATCHES]) for i in range(BATCHES)]
  params = jax.jit(model.init)(KEY, batches[0][0])["params"]
  loss_fn = lambda p, x, y: jkfac.softmax_cross_entropy(model.apply({"params": p}, x), y)
  est = jkfac.estimator(loss_fn, params, *batches[0])
  assert {layer.kind for layer in est.layers} == {"conv", "scale_and_shift", "dense"}, est
  return params, batches, est


# name -> (problem, optimizer from the estimator, Polyak averaging or not)
CONFIGS: dict[str, tuple[Callable[[], Any], Callable[[Any], Any], bool]] = {
    # KFACState (QuadraticModelState inside): adaptive α, μ and λ, γ re-chosen,
    # the block-tridiagonal inverse of a chain of two dense layers.
    "adaptive_tridiagonal_gamma": (
        _mlp_problem,
        lambda est: jkfac.kfac(est, damping=1e-2, structure="block_tridiagonal",
                               gamma_interval=4, **SCHEDULE),
        False),
    # A fixed learning rate and momentum: optax.chain's tuple with a TraceState and
    # an optax.EmptyState; inside apply_if_finite (a bool leaf); a layer with no
    # curvature (empty dicts in the factors and inverses); float64.
    "fixed_float64_empty_nodes": (
        lambda: _mlp_problem((3, 6, 5, 4), jnp.float64, overrides={"l2": "none"}),
        lambda est: optax.apply_if_finite(
            jkfac.kfac(est, 0.05, momentum=0.9, damping=1e-2, **SCHEDULE), 3),
        False),
    # KFC and a scale and shift (flax linen), block-diagonal and adaptive, chained
    # after clipping (an optax.EmptyState first), with Polyak averaging.
    "conv_norm_clip_polyak": (
        _conv_problem,
        lambda est: optax.chain(optax.clip_by_global_norm(1.0),
                                jkfac.kfac(est, damping=1e-2, l2_reg=1e-5, **SCHEDULE)),
        True),
}


def _build(config: str) -> Run:
  """A new estimator, optimizer and jitted step (the optimizer before tracing)."""
  problem, optimizer, polyak = CONFIGS[config]
  params, batches, est = problem()
  tx = optimizer(est)
  averaging = jkfac.polyak_average(0.9) if polyak else None

  def init() -> dict[str, Any]:
    state = {"params": params, "opt_state": tx.init(params)}
    if averaging is not None:
      state["average"] = averaging.init(params)
    return state

  traces = []

  @jax.jit
  def step(state: dict[str, Any], x: jax.Array, y: jax.Array, key: jax.Array):
    traces.append(1)
    loss, grads, stats = est(state["params"], x, y, rng=key)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"], stats=stats)
    new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}
    if averaging is not None:
      new["average"] = averaging.update(state["average"], new["params"])
    return new, loss

  return Run(init, step, batches, traces)


def _train(run: Run, state: dict[str, Any], start: int, stop: int) -> list[tuple[Any, Any]]:
  """Steps `start + 1 .. stop`; step `i` sees batch `i % 3` and key `fold_in(KEY, i)`."""
  trajectory = []
  for i in range(start, stop):
    state, loss = run.step(state, *run.batches[i % BATCHES], jax.random.fold_in(KEY, i))
    trajectory.append((state, loss))
  return trajectory


def _assert_bitwise_equal(got: Any, want: Any, where: str = "") -> None:
  """Same tree structure (NamedTuples included), dtypes, shapes and bytes."""
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want), where
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree_util.tree_leaves(want)):
    name = f"{where}{jax.tree_util.keystr(path)}"
    g, w = np.asarray(g), np.asarray(w)
    assert (g.dtype, g.shape) == (w.dtype, w.shape), name
    np.testing.assert_array_equal(g, w, err_msg=name)  # NaN equals NaN here
    assert g.tobytes() == w.tobytes(), name  # and -0.0 differs from 0.0, NaN bits agree


def _states_of(tree: Any, cls: type) -> list[Any]:
  """Every node of type `cls` in `tree`."""
  nodes = jax.tree_util.tree_leaves(tree, is_leaf=lambda n: isinstance(n, cls))
  return [n for n in nodes if isinstance(n, cls)]


# Save a training state and restore it into a target built by `init`, the
# resumed run's initial state (its structure: NamedTuples, optax.EmptyState,
# empty dicts; its dtypes and shapes): without a target, orbax gives back dicts
# and lists, and flax nested dicts.

def _orbax_manager(state: Any, init: Callable[[], Any], directory: Any, step: int) -> Any:
  with ocp.CheckpointManager(directory) as manager:
    manager.save(step, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
  with ocp.CheckpointManager(directory) as manager:
    target = jax.eval_shape(init)  # shapes and dtypes only: nothing is allocated
    return manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(target))


def _orbax_standard(state: Any, init: Callable[[], Any], directory: Any, step: int) -> Any:
  path = directory / f"step_{step}"
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, state)
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path, init())  # a live state as the target


def _flax_bytes(state: Any, init: Callable[[], Any], directory: Any, step: int) -> Any:
  path = directory / f"step_{step}.msgpack"
  path.write_bytes(flax.serialization.to_bytes(state))
  return jax.device_put(flax.serialization.from_bytes(init(), path.read_bytes()), DEVICE)


def _flax_state_dict(state: Any, init: Callable[[], Any], directory: Any, step: int) -> Any:
  del directory, step
  state_dict = jax.device_get(flax.serialization.to_state_dict(state))  # nested dicts
  return jax.device_put(flax.serialization.from_state_dict(init(), state_dict), DEVICE)


SERIALIZERS = {"orbax_manager": _orbax_manager, "orbax_standard": _orbax_standard,
               "flax_bytes": _flax_bytes, "flax_state_dict": _flax_state_dict}


@functools.lru_cache(maxsize=None)
def _uninterrupted(config: str) -> tuple[Run, list[tuple[Any, Any]]]:
  """The run of `config` and its `STEPS` steps without interruption."""
  run = _build(config)
  return run, _train(run, jax.device_put(run.init(), DEVICE), 0, STEPS)


def _check_the_segment_crosses_the_schedule(config: str, segment: list[Any], k: int) -> None:
  """Asserts that the inverses, λ, ρ and γ change along `segment`.

  Args:
    config: the configuration's name (γ is re-chosen when it names "gamma").
    segment: the states of steps `k` to `STEPS`.
    k: the step of the checkpoint.
  """

  def changes(get: Callable[[Any], Any]) -> bool:
    values = [np.asarray(get(state)) for state in segment]
    return any(not np.array_equal(a, b) for a, b in zip(values, values[1:]))

  def state_of(cls: type) -> Callable[[Any], Any]:
    return lambda tree: _states_of(tree, cls)[0]

  preconditioner = state_of(jkfac.ScaleByKFACState)
  assert [int(preconditioner(s).count) for s in segment] == list(range(k, STEPS + 1))
  first = next(name for name, inv in preconditioner(segment[-1]).inverses.items() if inv)
  assert changes(lambda s: jax.tree_util.tree_leaves(preconditioner(s).inverses[first])[0])
  if not _states_of(segment[0], jkfac.KFACState):
    return
  adaptive = state_of(jkfac.KFACState)  # the quadratic model: λ adapted, ρ measured
  assert np.isfinite(adaptive(segment[0]).reduction_ratio)  # measured at each first T1 step
  assert changes(lambda s: adaptive(s).reduction_ratio)
  # λ moves, or its streak does (at the floor, λ stays while ρ keeps saying down).
  assert changes(lambda s: (adaptive(s).damping, adaptive(s).damping_streak))
  assert "gamma" not in config or changes(lambda s: adaptive(s).gamma)


def _resume_and_compare(config: str, resumed_run: Run, tmp_path: Any) -> None:
  """Resumes from each of `SAVE_AT` through each serializer; asserts every step equal."""
  _, trajectory = _uninterrupted(config)
  for k in SAVE_AT:
    saved = trajectory[k - 1][0]
    _check_the_segment_crosses_the_schedule(
        config, [saved] + [state for state, _ in trajectory[k:]], k)
    for name, save_and_restore in SERIALIZERS.items():
      directory = tmp_path / f"{name}_{k}"
      directory.mkdir()
      restored = save_and_restore(saved, resumed_run.init, directory, k)
      _assert_bitwise_equal(restored, saved, f"{name}, step {k}, restored: ")
      resumed = _train(resumed_run, restored, k, STEPS)
      for i, ((got, got_loss), (want, want_loss)) in enumerate(zip(resumed, trajectory[k:])):
        where = f"{name}, resumed at {k}, step {k + i + 1}: "
        _assert_bitwise_equal(got, want, where)
        _assert_bitwise_equal(got_loss, want_loss, where + "loss")


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_a_resumed_run_equals_the_uninterrupted_run_bit_for_bit(config, tmp_path):
  run, _ = _uninterrupted(config)
  _resume_and_compare(config, run, tmp_path)
  # Restored states have the live state's structure, dtypes and weak types: the
  # compiled step is reused, never traced again.
  assert len(run.traces) == 1


def test_a_run_resumed_in_a_new_setup_equals_the_uninterrupted_run(tmp_path):
  """A new model, estimator, optimizer and compiled step, as a new process builds them."""
  run = _build("conv_norm_clip_polyak")
  _resume_and_compare("conv_norm_clip_polyak", run, tmp_path)
  assert len(run.traces) == 1


def test_a_run_resumed_without_the_optimizer_state_goes_elsewhere(tmp_path):
  """The check can fail: the parameters alone, with a fresh state, do not resume."""
  run, trajectory = _uninterrupted("adaptive_tridiagonal_gamma")
  k = SAVE_AT[-1]
  saved = trajectory[k - 1][0]
  restored = _orbax_manager(saved, run.init, tmp_path, k)
  _assert_bitwise_equal(restored, saved)
  fresh = dict(jax.device_put(run.init(), DEVICE), params=restored["params"])
  with pytest.raises(AssertionError):
    _assert_bitwise_equal(fresh["opt_state"], saved["opt_state"])
  final_params = _train(run, fresh, k, STEPS)[-1][0]["params"]
  want = trajectory[-1][0]["params"]
  assert all(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(final_params),
                                                      jax.tree_util.tree_leaves(want)))
  with pytest.raises(AssertionError):
    _assert_bitwise_equal(final_params, want)


def _sharded_like(abstract: Any, mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  """`state_sharding`'s shardings over `mesh` and the abstract state carrying them."""
  shardings = jkfac.distributed.state_sharding(abstract, mesh, min_size=4)
  target = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return shardings, target


def test_a_sharded_state_round_trips_onto_another_mesh(tmp_path):
  """Saved split over 4 devices, restored split over 2 (the target's shardings)."""
  if jax.device_count() < 4:
    pytest.skip("needs 4 devices (tests/conftest.py asks XLA for 8 CPU devices)")
  run, trajectory = _uninterrupted("adaptive_tridiagonal_gamma")
  saved = trajectory[SAVE_AT[-1] - 1][0]
  abstract = jax.eval_shape(lambda: saved)
  meshes = [jax.sharding.Mesh(np.array(jax.devices()[:n]), ("data",)) for n in (4, 2)]
  (shardings, _), (new_shardings, target) = (_sharded_like(abstract, m) for m in meshes)
  state = jax.device_put(saved, shardings)
  assert any(len(x.sharding.device_set) == 4 and not x.sharding.is_fully_replicated
             for x in jax.tree_util.tree_leaves(state))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "sharded", state)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / "sharded", target)
  flax_restored = jax.device_put(
      flax.serialization.from_bytes(target, flax.serialization.to_bytes(state)), new_shardings)
  for got in (restored, flax_restored):
    _assert_bitwise_equal(got, saved)
    for x, sharding in zip(jax.tree_util.tree_leaves(got),
                           jax.tree_util.tree_leaves(new_shardings)):
      assert x.sharding == sharding
