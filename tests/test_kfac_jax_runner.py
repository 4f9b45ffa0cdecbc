"""Tests of benchmarks/kfac_jax_runner.py (kfac-jax as a comparison target).

Skipped where kfac-jax isn't installed or doesn't work with the installed JAX
(kfac-jax is no dependency of jkfac). A small autoencoder of the paper's depth
(8 layers, the code layer at index 3) on 64 random images.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import pytest

pytest.importorskip("kfac_jax")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = REPO_ROOT / "benchmarks"


def _import_runner():
  """Import benchmarks/kfac_jax_runner.py (benchmarks is not a package)."""
  name = "jkfac_benchmarks_kfac_jax_runner"
  if name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.spec_from_file_location(name, BENCHMARKS / "kfac_jax_runner.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


kjr = _import_runner()
ae = kjr.autoencoder

_OK, _WHY = kjr.available()
if not _OK:
  pytest.skip(f"kfac-jax unusable here: {_WHY}", allow_module_level=True)

SIZES = (784, 64, 32, 16, 4, 16, 32, 64, 784)


@pytest.fixture(scope="module")
def problem():
  params = ae.init_params(jax.random.PRNGKey(0), sizes=SIZES, dtype=jnp.float32)
  images = jax.random.uniform(jax.random.PRNGKey(1), (64, 784), jnp.float32)
  return params, images


def _run(runner, params, images, num_steps):
  state = runner.init(params, images)
  key = jax.random.PRNGKey(2)
  losses = []
  for _ in range(num_steps):
    key, sub = jax.random.split(key)
    params, state, loss = runner.step(params, state, images, sub)
    assert isinstance(loss, jax.Array) and loss.shape == ()
    losses.append(float(loss))
  return params, state, losses


def test_available():
  ok, version = kjr.available()
  assert ok and version


def test_adaptive(problem):
  params, images = problem
  runner = kjr.make_optimizer(params, images, adaptive=True)
  assert runner.settings["initial_damping"] == 150.0
  assert runner.settings["num_burnin_steps"] == 5
  new_params, state, losses = _run(runner, params, images, 10)
  assert all(math.isfinite(l) for l in losses)
  # The reported loss is the training objective before the step.
  assert losses[0] == pytest.approx(float(ae.objective(params, images)), rel=1e-5)
  assert losses[-1] < losses[0]
  assert float(ae.objective(new_params, images)) < losses[0]
  assert runner.state_bytes(state) > 0
  # The caller's initial parameters survive kfac-jax's donation.
  assert float(ae.objective(params, images)) == pytest.approx(losses[0], rel=1e-5)


def test_adaptive_initial_damping(problem):
  params, images = problem
  runner = kjr.make_optimizer(params, images, adaptive=True, initial_damping=1.0)
  assert runner.settings["initial_damping"] == 1.0
  assert float(runner.init(params, images).opt_state.damping) == 1.0
  assert kjr.make_optimizer(params, images).settings["initial_damping"] == 150.0


def test_fixed(problem):
  params, images = problem
  runner = kjr.make_optimizer(params, images, adaptive=False, learning_rate=0.01,
                              momentum=0.9, damping=1.0, inverse_every=20)
  assert runner.settings["inverse_update_period"] == 20
  _, state, losses = _run(runner, params, images, 5)
  assert all(math.isfinite(l) for l in losses)
  assert losses[0] == pytest.approx(float(ae.objective(params, images)), rel=1e-5)
  assert runner.state_bytes(state) > 0


def test_argument_checks(problem):
  params, images = problem
  with pytest.raises(ValueError):
    kjr.make_optimizer(params, images, adaptive=False, learning_rate=0.01)
  with pytest.raises(ValueError):
    kjr.make_optimizer(params, images, adaptive=True, learning_rate=0.01)
  with pytest.raises(ValueError):
    kjr.make_optimizer(params, images[:, :100])
  with pytest.raises(ValueError):
    kjr.make_optimizer(params, images, adaptive=False, learning_rate=0.01, momentum=0.9,
                       damping=1.0, initial_damping=1.0)
  with pytest.raises(ValueError):
    kjr.make_optimizer(params, images, initial_damping=0.0)
