"""Every pass of the library on layers inside `lax.scan`: data-parallel `pmap`,
sharded `jit`, checkpoints, diagnostics, statistics and curvature on a fraction
of the batch, and the per-example passes of per-layer block choices, each
against the same model unrolled in Python with the same weights (float64,
mode "exact").

The models are test_scan's: a stack of `DEPTH` tanh layers scanned over (one
stacked layer, `Layer.stack == (DEPTH,)`) and an RNN over time (weights shared
over iterations); and the same stack whose layers also scale and shift
(`norm_scanned_loss`: a second stacked layer, with diagonal factors), trained
once on fractions of the batch for the fractions, checkpoint and diagnostics
tests. Every reference run is one device on the whole batch of `N` examples;
each step is compiled once and shared by the tests that read it (`_one_device`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import brute_force as bf
import jkfac
from test_checkpoint import DEVICE, _assert_bitwise_equal, _flax_bytes, _orbax_standard
from test_multidevice import _equations
from test_scan import (_ONCE, CLASSES, DEPTH, FEATURES, KEY, STEPS_IN_TIME, WIDTH, _normal,
                       restack, rnn_params, scanned_loss, scanned_rnn_loss, stack_params,
                       unrolled_loss, unrolled_params, unrolled_rnn_loss)

DEVICES = 8
N = 32  # the whole batch: 4 examples per device
STEPS = 4


def _optimizer(est, axis_name=None, mesh=None):
  """The adaptive optimizer (α, μ and λ from the quadratic model), inverses every 2 updates."""
  return jkfac.kfac(est, damping=1e-2, inverse_every=2, inverse_warmup=0,
                    axis_name=axis_name, mesh=mesh)


def _stack_batch():
  return bf.classification_data(N, FEATURES, CLASSES)


def _rnn_batch():
  x, y = bf.classification_data(N, FEATURES * STEPS_IN_TIME, CLASSES)
  return x.reshape(N, STEPS_IN_TIME, FEATURES), y


# test_scan's stack has dense layers only; this one also scales and shifts (the
# parameters of a normalisation layer): a second stacked layer, with diagonal
# factors (`"stack#1"`).


def norm_stack_params(key):
  k = jax.random.split(key, 5)
  spread = jnp.arange(1.0, DEPTH + 1.0)[:, None]  # each layer's scales spread more
  return {"w_in": _normal(k[0], (FEATURES, WIDTH)),
          "stack": {"w": _normal(k[1], (DEPTH, WIDTH, WIDTH), 1.0),
                    "scale": 1.0 + 0.3 * spread * jax.random.normal(k[2], (DEPTH, WIDTH),
                                                                    jnp.float64),
                    "shift": 0.1 * jax.random.normal(k[3], (DEPTH, WIDTH), jnp.float64)},
          "head": {"w": _normal(k[4], (WIDTH, CLASSES))}}


def _norm_block(h, layer):
  return jnp.tanh((h @ layer["w"]) * layer["scale"] + layer["shift"])


def norm_scanned_loss(params, x, y):
  h = jnp.tanh(x @ params["w_in"])
  h, _ = jax.lax.scan(lambda h, layer: (_norm_block(h, layer), None), h, params["stack"])
  return jkfac.softmax_cross_entropy(h @ params["head"]["w"], y)


def norm_unrolled_loss(params, x, y):
  h = jnp.tanh(x @ params["w_in"])
  for layer in params["blocks"]:
    h = _norm_block(h, layer)
  return jkfac.softmax_cross_entropy(h @ params["head"]["w"], y)


def norm_unrolled_params(params):
  return {"w_in": params["w_in"], "head": params["head"],
          "blocks": [jax.tree.map(lambda a, l=l: a[l], params["stack"]) for l in range(DEPTH)]}


# name -> (loss function, parameters, batch): the same weights scanned and unrolled.
_PROBLEMS: dict[str, Callable[[], tuple[Callable[..., Any], Any, tuple[Any, ...]]]] = {
    "scanned": lambda: (scanned_loss, stack_params(KEY), _stack_batch()),
    "unrolled": lambda: (unrolled_loss, unrolled_params(stack_params(KEY)), _stack_batch()),
    "scanned_rnn": lambda: (scanned_rnn_loss, rnn_params(KEY), _rnn_batch()),
    "unrolled_rnn": lambda: (unrolled_rnn_loss, rnn_params(KEY), _rnn_batch()),
    "norm_scanned": lambda: (norm_scanned_loss, norm_stack_params(KEY), _stack_batch()),
    "norm_unrolled": lambda: (norm_unrolled_loss, norm_unrolled_params(norm_stack_params(KEY)),
                              _stack_batch()),
}
# The statistics on the first quarter of the batch, the quadratic model on its first half.
FRACTIONS = (("stats_fraction", 0.25), ("curvature_fraction", 0.5))


@functools.lru_cache(maxsize=None)
def _problem(name: str) -> tuple[Callable[..., Any], Any, tuple[Any, ...]]:
  """`(loss_fn, params, batch)` of `name`, made once."""
  return _PROBLEMS[name]()


class Step(NamedTuple):
  """One training step's results: the state after it, and what it computed."""
  params: Any
  opt_state: Any
  updates: Any
  grads: Any
  stats: jkfac.Statistics


class Run(NamedTuple):
  """A one-device training run.

  Attributes:
    est: its estimator.
    tx: its optimizer.
    params: the initial parameters.
    batch: the batch of every step.
    step: the jitted `(params, opt_state, *batch) -> Step`.
    trajectory: the `Step` of each of the `STEPS` steps.
  """
  est: Any
  tx: Any
  params: Any
  batch: tuple[Any, ...]
  step: Callable[..., Step]
  trajectory: list[Step]


def _train(est, tx, params, batch, placement=None) -> Run:
  """`STEPS` jitted steps of `tx` on `batch`, from `params` and `tx.init(params)`.

  `placement`: the sharding of the initial parameters and state (that of the
  steps' outputs, so that the step is compiled once), or None.
  """

  @jax.jit
  def step(params, opt_state, *batch):
    _, grads, stats = est(params, *batch)
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return Step(optax.apply_updates(params, updates), opt_state, updates, grads, stats)

  trajectory, state = [], (params, tx.init(params))
  if placement is not None:
    state = jax.device_put(state, placement)
  for _ in range(STEPS):
    trajectory.append(step(*state, *batch))
    state = trajectory[-1][:2]
  return Run(est, tx, params, batch, step, trajectory)


@functools.lru_cache(maxsize=None)
def _one_device(problem: str, options: tuple[tuple[str, Any], ...] = ()) -> Run:
  """`problem` on one device, on the whole batch; `options` of the estimator."""
  loss_fn, params, batch = _problem(problem)
  est = jkfac.estimator(loss_fn, params, *batch, mode="exact", **dict(options))
  # Committed to the device, as a restored checkpoint is (test_checkpoint.DEVICE).
  return _train(est, _optimizer(est), params, batch, placement=DEVICE)


def _pair_of_runs() -> tuple[Run, Run]:
  """The normalised stack, scanned and unrolled, trained on fractions of the batch."""
  return (_one_device("norm_scanned", FRACTIONS), _one_device("norm_unrolled", FRACTIONS))


def _stacked_layers(name: str) -> list[str]:
  """The unrolled names of the stacked layer `name`'s layers: "stack#1" -> "blocks/0#1", ..."""
  return [name.replace("stack", f"blocks/{l}", 1) for l in range(DEPTH)]


def _assert_close(got, want, rtol=1e-8, atol=1e-12):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol), got, want)


# --------------------------------------------------------------------------- #
# Data parallel: pmap and sharded jit
# --------------------------------------------------------------------------- #


def _pmapped(problem: str) -> tuple[Any, Any]:
  """`problem` data-parallel over `DEVICES` under pmap: the final parameters and state."""
  loss_fn, params, batch = _problem(problem)
  est = jkfac.estimator(loss_fn, params, *(a[:N // DEVICES] for a in batch), mode="exact")
  tx = _optimizer(est, axis_name="devices")

  def step(params, state, *batch):
    _, grads, stats = est(params, *batch)
    grads = jax.lax.pmean(grads, "devices")
    updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state

  step = jax.pmap(step, axis_name="devices")
  # Placed as pmap places its outputs, so that the step is compiled once.
  place = lambda tree: jax.device_put(tree, NamedSharding(
      Mesh(np.array(jax.devices()[:DEVICES]), ("devices",)), PartitionSpec("devices")))
  replicate = lambda tree: place(jax.tree.map(lambda a: np.stack([a] * DEVICES), tree))
  shards = place([np.reshape(a, (DEVICES, -1) + a.shape[1:]) for a in batch])
  params, state = replicate(params), replicate(tx.init(params))
  for _ in range(STEPS):
    params, state = step(params, state, *shards)
  return params, state


def test_a_pmapped_stack_equals_the_unrolled_model_on_one_device():
  assert jax.device_count() >= DEVICES
  many, state = _pmapped("scanned")
  want = restack(_one_device("unrolled").trajectory[-1].params)
  for device in range(DEVICES):
    _assert_close(jax.tree.map(lambda a: a[device], many), want)
  # Each device averages its own statistics (synchronised at refreshes only):
  # the stack's factors, one per layer, differ between devices.
  factors = state.preconditioner.factors["stack"]["A"]
  assert factors.shape == (DEVICES, DEPTH, WIDTH + 1, WIDTH + 1)
  assert not np.allclose(factors[0], factors[1])


@_ONCE
def test_a_stack_under_sharded_jit_equals_the_unrolled_model_on_one_device():
  mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("data",))
  loss_fn, params, batch = _problem("scanned")
  batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
  est = jkfac.estimator(loss_fn, params, *batch, mode="exact")
  run = _train(est, _optimizer(est, mesh=mesh), params, batch,
               placement=NamedSharding(mesh, PartitionSpec()))
  _assert_close(run.trajectory[-1].params,
                restack(_one_device("unrolled").trajectory[-1].params))
  # The inverses were spread over the mesh (the stack's are one work item).
  jaxpr = jax.make_jaxpr(run.step)(params, run.tx.init(params), *batch)
  switches = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "cond"
              and len(e.params["branches"]) == DEVICES]
  assert len(switches) == 1


@_ONCE
def test_a_pmapped_rnn_equals_the_unrolled_rnn_on_one_device():
  many, _ = _pmapped("scanned_rnn")
  want = _one_device("unrolled_rnn").trajectory[-1].params
  for device in range(DEVICES):
    _assert_close(jax.tree.map(lambda a: a[device], many), want)


# --------------------------------------------------------------------------- #
# Checkpoints
# --------------------------------------------------------------------------- #


@_ONCE
@pytest.mark.parametrize("save_and_restore", [_orbax_standard, _flax_bytes],
                         ids=["orbax", "flax_bytes"])
def test_a_stacks_state_restored_from_a_checkpoint_resumes_bit_for_bit(save_and_restore,
                                                                      tmp_path):
  run, _ = _pair_of_runs()  # the fractions test's run: its step is compiled once for both
  k = 2
  # The resumed steps recompute the stack's inverses (from the restored factors).
  assert int(run.trajectory[-1].opt_state.preconditioner.last_refresh) > k
  saved = {"params": run.trajectory[k - 1].params, "opt_state": run.trajectory[k - 1].opt_state}
  factors = saved["opt_state"].preconditioner.factors
  assert factors["stack"]["G"].shape == (DEPTH, WIDTH, WIDTH)
  assert factors["stack#1"]["diag"].shape == (DEPTH, 2 * WIDTH)
  init = lambda: {"params": run.params, "opt_state": run.tx.init(run.params)}
  restored = save_and_restore(saved, init, tmp_path, k)
  _assert_bitwise_equal(restored, saved, "restored: ")
  state = (restored["params"], restored["opt_state"])
  for i in range(k, STEPS):
    got = run.step(*state, *run.batch)
    _assert_bitwise_equal(got[:2], run.trajectory[i][:2], f"step {i + 1}: ")
    state = got[:2]
  # The check can fail: the parameters with a fresh optimizer state go elsewhere.
  state = (restored["params"], jax.device_put(init()["opt_state"], DEVICE))
  for _ in range(k, STEPS):
    state = run.step(*state, *run.batch)[:2]
  assert not np.allclose(state[0]["stack"]["w"], run.trajectory[-1].params["stack"]["w"])


# --------------------------------------------------------------------------- #
# Diagnostics
# --------------------------------------------------------------------------- #


def _assert_same_figure(got, want, name):
  """Equal figures; a singular factor's condition numbers (the softmax head's G,
  rank `CLASSES - 1`) are round-off over round-off: both huge or inf."""
  got, want = float(got), float(want)
  if max(got, want) > 1e12:
    assert min(got, want) > 1e12, (name, got, want)
  else:
    np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)  # norms: float32 sums


@_ONCE
def test_a_stacks_diagnostics_sum_traces_and_take_the_largest_condition_and_pi():
  scanned, unrolled = _pair_of_runs()
  # After the last step taken (a rejected step's update is zero, as its norms).
  taken = max(i for i, step in enumerate(scanned.trajectory) if np.any(step.updates["w_in"]))
  (overall, layers), (overall_u, layers_u) = (  # compiled: eager dispatch is slower
      jax.jit(functools.partial(jkfac.diagnostics, run.est))(*run.trajectory[taken][1:4])
      for run in (scanned, unrolled))
  stacks = {l.name: l.kind for l in scanned.est.layers if l.stack}
  assert stacks == {"stack": "dense", "stack#1": "scale_and_shift"}, str(scanned.est)
  assert set(overall) == set(overall_u)
  for figure in overall:
    _assert_same_figure(overall[figure], overall_u[figure], figure)
  for name in ("w_in", "head"):
    assert set(layers[name]) == set(layers_u[name])
    for figure in layers[name]:
      _assert_same_figure(layers[name][figure], layers_u[name][figure], f"{name} {figure}")
  root_sum_of_squares = lambda v: np.sqrt(np.sum(np.square(v)))
  rules = {"trace": np.sum, "condition": np.max, "damped_condition": np.max, "pi": np.max,
           "damping_A": np.max, "damping_G": np.min,  # π√λ and √λ/π of the largest π
           "update_norm": root_sum_of_squares, "grad_norm": root_sum_of_squares}
  for name in stacks:
    per_layer = [layers_u[layer] for layer in _stacked_layers(name)]
    assert set(layers[name]) == set(per_layer[0]), name
    for figure, value in layers[name].items():
      values = np.array([float(f[figure]) for f in per_layer])
      if figure == "damping":  # λ, the same for every layer
        assert np.all(values == float(value)), name
        continue
      assert len(set(values)) == DEPTH, figure  # the layers' figures differ: the rule matters
      rule = rules.get(figure) or rules[figure.rpartition("_")[0]]
      _assert_same_figure(value, rule(values), f"{name} {figure}")
  assert {"pi", "trace_A", "condition_G", "damped_condition_A"} <= set(layers["stack"])
  assert {"trace_diag", "condition_diag", "damped_condition_diag"} <= set(layers["stack#1"])


# --------------------------------------------------------------------------- #
# Statistics and curvature on a fraction of the batch
# --------------------------------------------------------------------------- #


def test_fractions_of_the_batch_give_the_unrolled_models_statistics_and_steps():
  scanned, unrolled = _pair_of_runs()
  stats, stats_u = scanned.trajectory[0].stats, unrolled.trajectory[0].stats
  for name, factors in stats.factors.items():
    if name in ("w_in", "head"):
      _assert_close(factors, stats_u.factors[name], rtol=1e-10, atol=0)
      continue
    for key, factor in factors.items():
      expected = np.stack([stats_u.factors[layer][key] for layer in _stacked_layers(name)])
      assert factor.shape == expected.shape, (name, key)
      np.testing.assert_allclose(factor, expected, rtol=1e-10, err_msg=f"{name} {key}")
  # The first layer's A is the second moment of the first quarter of the inputs.
  x = np.asarray(scanned.batch[0])
  quarter = x[:N // 4]
  np.testing.assert_allclose(stats.factors["w_in"]["A"], quarter.T @ quarter / len(quarter),
                             rtol=1e-12)
  assert not np.allclose(stats.factors["w_in"]["A"], x.T @ x / N)
  for got, want in zip(scanned.trajectory, unrolled.trajectory):
    _assert_close(norm_unrolled_params(got.updates), want.updates, atol=1e-14)
  _assert_close(norm_unrolled_params(scanned.trajectory[-1].params),
                unrolled.trajectory[-1].params)
  # The quadratic model (α, μ, ρ, λ) on the first half: the same numbers.
  last, last_u = scanned.trajectory[-1].opt_state, unrolled.trajectory[-1].opt_state
  _assert_close((last.quadratic_model.learning_rate, last.quadratic_model.momentum,
                 last.reduction_ratio, last.damping),
                (last_u.quadratic_model.learning_rate, last_u.quadratic_model.momentum,
                 last_u.reduction_ratio, last_u.damping))


# --------------------------------------------------------------------------- #
# Per-example passes: the stack given a diagonal block
# --------------------------------------------------------------------------- #


@_ONCE
def test_a_stack_given_the_diagonal_block_equals_the_unrolled_layers_diagonals():
  loss_fn, params, batch = _problem("scanned")
  scanned = jkfac.estimator(loss_fn, params, *batch, mode="exact",
                            overrides={"stack": "diagonal"})
  unrolled = jkfac.estimator(unrolled_loss, unrolled_params(params), *batch, mode="exact",
                             overrides={"blocks/*": "diagonal"})
  kinds = {l.name: l.kind for l in scanned.layers}
  assert kinds["stack/w"] == kinds["stack/b"] == "diagonal", str(scanned)

  def precondition(est, params):
    tx = jkfac.scale_by_kfac(est, damping=1e-2)
    _, grads, stats = est(params, *batch)
    return stats, tx.update(grads, tx.init(params), params, stats=stats)[0]

  stats, updates = jax.jit(functools.partial(precondition, scanned))(params)
  stats_u, updates_u = jax.jit(functools.partial(precondition, unrolled))(
      unrolled_params(params))
  for leaf in ("w", "b"):
    expected = np.stack([stats_u.factors[f"{layer}/{leaf}"]["diag"]
                         for layer in _stacked_layers("stack")])
    assert stats.factors[f"stack/{leaf}"]["diag"].shape == expected.shape
    np.testing.assert_allclose(stats.factors[f"stack/{leaf}"]["diag"], expected, rtol=1e-10)
  _assert_close(updates, restack(updates_u), rtol=1e-10, atol=0)
