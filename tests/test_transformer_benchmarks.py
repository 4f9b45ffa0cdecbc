"""The transformer benchmarks' models and data: what each run is given is what it says.

kfac-jax gets the models with their blocks in a Python loop (it finds no
layer inside `nn.scan`): the looped model with the unstacked parameters must
be the scanned model, output for output. The language model's batches are
the next bytes of the text, the same in every run.
"""

import importlib.util
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_scan import _ONCE  # in the newest-JAX suite only (CI time)

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
  """benchmarks/<name>.py as a module (benchmarks is not a package)."""
  if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
  spec = importlib.util.spec_from_file_location(f"jkfac_bench_{name}", BENCHMARKS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


lm = _load("lm_pydocs")
vit = _load("vit_cifar10")
harness = _load("harness")
SMALL = ["--width", "16", "--depth", "3", "--heads", "2", "--steps", "5"]


@pytest.mark.parametrize("bench, inputs", [
    (lm, lambda: jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 256)),
    (vit, lambda: jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))),
], ids=["lm", "vit"])
def test_the_looped_model_with_unstacked_parameters_is_the_scanned_model(bench, inputs):
  args = bench.parse_args(SMALL + (["--sequence", "8"] if bench is lm else ["--patch", "8"]))
  x = inputs()
  scanned, looped = bench.make_model(args), bench.make_model(args, scanned=False)
  # Compiled (eagerly, each of the models' operations compiles on its own); the
  # looped model's parameters only as shapes.
  params = jax.jit(scanned.init)(jax.random.PRNGKey(0), x)["params"]
  unstacked = bench.transformer.unstack(params, args.depth, ("Stack_0",))
  assert set(unstacked["Stack_0"]) == {"block_0", "block_1", "block_2"}
  assert (jax.tree.structure(unstacked)
          == jax.tree.structure(jax.eval_shape(looped.init, jax.random.PRNGKey(0), x)["params"]))
  np.testing.assert_allclose(jax.jit(looped.apply)({"params": unstacked}, x),
                             jax.jit(scanned.apply)({"params": params}, x), rtol=1e-5, atol=1e-6)


def test_language_model_batches_are_the_next_bytes_and_the_same_in_every_run():
  args = lm.parse_args(SMALL + ["--sequence", "8", "--batch-size", "3"])
  text = np.frombuffer(b"the quick brown fox jumps over the lazy dog " * 4, np.uint8)
  tokens, targets = lm.batches(args, text)(4)
  again, _ = lm.batches(args, text)(4)
  assert tokens.shape == targets.shape == (3, 8)
  np.testing.assert_array_equal(tokens, again)
  np.testing.assert_array_equal(tokens[:, 1:], targets[:, :-1])
  for row, target in zip(tokens, targets):  # each row is a window of the text
    start = bytes(text).find(bytes(row.astype(np.uint8)) + bytes(target[-1:].astype(np.uint8)))
    assert start >= 0


def test_vit_batches_flip_some_images_and_keep_their_labels():
  args = vit.parse_args(SMALL + ["--batch-size", "16"])
  images = np.random.RandomState(0).rand(40, 4, 4, 3).astype(np.float32)
  labels = np.arange(40)
  x, y = vit.batches(args, images, labels)(1)
  flipped = [np.array_equal(a, images[l][:, ::-1]) and not np.array_equal(a, images[l])
             for a, l in zip(x, y)]
  kept = [np.array_equal(a, images[l]) for a, l in zip(x, y)]
  assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_a_run_that_raises_is_recorded_with_its_error(tmp_path):
  out = tmp_path / "record.json"

  def train(run):
    raise ValueError(f"{run['name']} cannot handle this model\nsecond line")

  harness.worker(json.dumps(dict(run=dict(name="kfac-jax"), out=str(out))), train)
  assert json.loads(out.read_text()) == dict(
      name="kfac-jax", error="ValueError: kfac-jax cannot handle this model")


@_ONCE  # the benchmark's runs, on one JAX (a compilation per optimizer)
def test_every_optimizer_trains_the_language_model_a_few_steps():
  args = lm.parse_args(SMALL + ["--sequence", "8", "--batch-size", "4"])
  text = np.frombuffer(b"abcdefghij" * 20, np.uint8)
  batch = tuple(jnp.asarray(a) for a in lm.batches(args, text)(0))
  model = lm.make_model(args)
  params = model.init(jax.random.PRNGKey(0), batch[0])["params"]
  apply = lambda p, x: model.apply({"params": p}, x)
  for run in lm.transformer.planned_runs(args, kfac_jax_ok=False):
    init, step = lm.transformer.make_step(run, args, apply, params, batch)
    p, state, losses = params, init(params), []
    for k in range(args.steps):
      p, state, loss = step(p, state, batch, jax.random.PRNGKey(k))
      losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], (run["name"], losses)
