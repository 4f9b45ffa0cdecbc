"""A zoo of small models, written as their libraries' users write them, trained
by `jkfac.kfac` on real MNIST and CIFAR-10 batches.

Models (flax linen unless said, nothing adapted to jkfac):

- `cnn`: the flax examples' MNIST CNN (two 3x3 convolutions, average pooling,
  two dense layers, no normalisation), at 8/16 channels and a dense width of 64;
- `mlp`: a ReLU MLP in plain JAX with separate bias parameters;
- `resnet`: a small ResNet with BatchNorm (the flax examples' block, batch
  statistics `mutable` and returned as the loss's aux) on CIFAR-10 images
  averaged down to 8x8 pixels;
- `transformer`: one pre-LayerNorm block (self-attention and an MLP, fixed
  sinusoidal positions) over the 28 rows of an MNIST digit, mean-pooled;
- `rnn`: `nn.RNN(nn.SimpleCell)` over the rows of an MNIST digit, a dense head
  on the last state;
- `dropout`: an MLP with `nn.Dropout`, its key passed to the loss and on to
  `rngs={"dropout": key}`.

Settings: the adaptive optimizer from several initial dampings, a fixed
learning rate with momentum 0.9 at several rates, and `jkfac.kfac(est)`.
Every run takes 30 steps, each on its own batch of 64 examples (see
`_batches`); the check: every loss finite, none above twice the first, and the
mean of the last five below 0.7 times the first.

For speed, each (model, optimizer form) is compiled once: the 30 steps run
in one `jax.jit` (`lax.scan`), the damping or learning rate a traced argument
given to `jkfac.kfac` inside it, and the settings that share a program are one
test (so that pytest-xdist workers do not each compile it). `jkfac.kfac(est)`
runs on the adaptive program at the default damping (see `_losses`).

`python tests/test_zoo.py` prints the zoo's table (first loss, largest loss,
mean of the last five, pass or fail) for every model and setting;
`python tests/test_zoo.py cnn resnet` for some models only; `--adam` adds
Adam at four learning rates as a reference (a setting the criteria accept
exists for every model).
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable, NamedTuple, Optional

if __name__ == "__main__":  # as tests/conftest.py does, before JAX starts
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jkfac
import repo_modules

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 30
BATCH = 64
CLASSES = 10


# --------------------------------------------------------------------------- #
# Data: a fixed stream of STEPS batches, one per step
# --------------------------------------------------------------------------- #


def _datasets():
  """benchmarks/datasets.py, imported under the name the other tests use."""
  return repo_modules.load("benchmarks/datasets.py", "jkfac_benchmarks_datasets")


@functools.cache
def _batches(dataset: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
  """`(x, y)` of shapes `(STEPS, BATCH, ...)` and `(STEPS, BATCH)`, or None
  if the dataset's files are not found.

  MNIST: the first STEPS * BATCH training digits, a new batch each step.
  CIFAR-10: the first 128 training images, averaged down to 8x8 pixels and
  standardised per channel; each step's batch is BATCH of them drawn at random
  (a fixed draw), so that the small ResNet can fit them in STEPS steps.
  """
  ds = _datasets()
  try:
    ds.find_data_dir(dataset)
  except FileNotFoundError:
    return None
  if dataset == "mnist":
    x, y = ds.load_mnist("train", flatten=False)   # (n, 28, 28, 1) in [0, 1]
    index = np.arange(STEPS * BATCH).reshape(STEPS, BATCH)
  else:
    x, y = ds.load_cifar10("train")              # (n, 32, 32, 3) in [0, 1]
    x = x[:128].reshape(128, 8, 4, 8, 4, 3).mean(axis=(2, 4))
    x = (x - x.mean(axis=(0, 1, 2))) / x.std(axis=(0, 1, 2))
    rng = np.random.default_rng(0)
    index = np.stack([rng.choice(128, BATCH, replace=False) for _ in range(STEPS)])
  return x[index].astype(np.float32), y[index].astype(np.int32)


# --------------------------------------------------------------------------- #
# The models
# --------------------------------------------------------------------------- #


class CNN(nn.Module):
  """The flax examples' MNIST CNN, narrower."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(features=8, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(features=16, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))  # flatten
    x = nn.Dense(features=64)(x)
    x = nn.relu(x)
    x = nn.Dense(features=10)(x)
    return x


def init_mlp(key, sizes=(784, 128, 64, 10)):
  """A plain-JAX MLP: {"w1", "b1", "w2", ...}, He-initialised."""
  params = {}
  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
    key, sub = jax.random.split(key)
    params[f"w{i}"] = jax.random.normal(sub, (fan_in, fan_out), jnp.float32) * math.sqrt(2 / fan_in)
    params[f"b{i}"] = jnp.zeros((fan_out,), jnp.float32)
  return params


def mlp(params, x):
  x = x.reshape((x.shape[0], -1))
  h = jax.nn.relu(x @ params["w1"] + params["b1"])
  h = jax.nn.relu(h @ params["w2"] + params["b2"])
  return h @ params["w3"] + params["b3"]


class ResNetBlock(nn.Module):
  """The flax examples' ResNet block."""
  filters: int
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5)
    residual = x
    y = nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(x)
    y = norm()(y)
    y = nn.relu(y)
    y = nn.Conv(self.filters, (3, 3), use_bias=False)(y)
    y = norm(scale_init=nn.initializers.zeros)(y)
    if residual.shape != y.shape:
      residual = nn.Conv(self.filters, (1, 1), self.strides, use_bias=False,
                         name="conv_proj")(residual)
      residual = norm(name="norm_proj")(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """A small CIFAR ResNet: a 3x3 stem, a block per width, global average pooling."""
  widths: tuple[int, ...] = (8, 16)

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(self.widths[0], (3, 3), use_bias=False, name="conv_init")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     name="bn_init")(x)
    x = nn.relu(x)
    for i, width in enumerate(self.widths):
      x = ResNetBlock(width, strides=(1, 1) if i == 0 else (2, 2))(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(CLASSES)(x)


def sinusoidal_positions(length: int, width: int) -> np.ndarray:
  """The fixed position encoding of Vaswani et al. (2017), `(length, width)`."""
  position = np.arange(length)[:, None]
  frequency = np.exp(-math.log(10000.0) * np.arange(0, width, 2) / width)
  encoding = np.zeros((length, width), np.float32)
  encoding[:, 0::2] = np.sin(position * frequency)
  encoding[:, 1::2] = np.cos(position * frequency)
  return encoding


class Transformer(nn.Module):
  """Pre-LayerNorm transformer over the rows of an image; a zero-initialised
  head, as in ViT."""
  width: int = 32
  heads: int = 4
  depth: int = 1

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], x.shape[1], -1))           # (batch, rows, pixels)
    x = nn.Dense(self.width)(x)
    x = x + sinusoidal_positions(x.shape[1], self.width)
    for _ in range(self.depth):
      h = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h)
      h = nn.LayerNorm()(x)
      h = nn.Dense(2 * self.width)(h)
      h = nn.gelu(h)
      x = x + nn.Dense(self.width)(h)
    x = nn.LayerNorm()(x)
    return nn.Dense(CLASSES, kernel_init=nn.initializers.zeros, name="head")(x.mean(axis=1))


class RNN(nn.Module):
  """A tanh RNN over the rows of an image, a dense head on the last state."""
  hidden: int = 64

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], x.shape[1], -1))           # (batch, rows, pixels)
    h = nn.RNN(nn.SimpleCell(features=self.hidden))(x)
    return nn.Dense(CLASSES)(h[:, -1])


class DropoutMLP(nn.Module):
  """A ReLU MLP with dropout after each hidden layer."""
  rate: float = 0.3

  @nn.compact
  def __call__(self, x, train: bool):
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(128)(x))
    x = nn.Dropout(self.rate, deterministic=not train)(x)
    x = nn.relu(nn.Dense(64)(x))
    x = nn.Dropout(self.rate, deterministic=not train)(x)
    return nn.Dense(CLASSES)(x)


class Zoo(NamedTuple):
  """A model as the training loop sees it.

  Attributes:
    dataset: "mnist" or "cifar-10".
    init: `(key, x) -> (params, model_state)`; model_state is () if none.
    loss_fn: the user's loss, `loss_fn(params, *args)`.
    args: `(model_state, x, y, key) -> args`, the loss's arguments after params.
    has_aux: the loss returns `(loss, new_model_state)`.
  """
  dataset: str
  init: Callable[..., tuple[Any, Any]]
  loss_fn: Callable[..., Any]
  args: Callable[..., tuple]
  has_aux: bool = False


def _linen_classifier(model: nn.Module) -> Zoo:
  """A flax linen classifier on MNIST: `loss_fn(params, x, y)`, no model state."""
  def loss_fn(params, x, y):
    return jkfac.softmax_cross_entropy(model.apply(params, x), y)
  return Zoo("mnist", lambda key, x: (model.init(key, x), ()), loss_fn,
             lambda state, x, y, key: (x, y))


def _cnn() -> Zoo:
  return _linen_classifier(CNN())


def _mlp() -> Zoo:
  def loss_fn(params, x, y):
    return jkfac.softmax_cross_entropy(mlp(params, x), y)
  return Zoo("mnist", lambda key, x: (init_mlp(key), ()), loss_fn,
             lambda state, x, y, key: (x, y))


def _resnet(**kwargs) -> Zoo:
  model = ResNet(**kwargs)
  def init(key, x):
    variables = model.init(key, x, train=False)
    return variables["params"], variables["batch_stats"]
  def loss_fn(params, batch_stats, x, y):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                  train=True, mutable=["batch_stats"])
    return jkfac.softmax_cross_entropy(logits, y), updates["batch_stats"]
  return Zoo("cifar-10", init, loss_fn, lambda state, x, y, key: (state, x, y), has_aux=True)


def _transformer() -> Zoo:
  return _linen_classifier(Transformer())


def _rnn() -> Zoo:
  return _linen_classifier(RNN())


def _dropout() -> Zoo:
  model = DropoutMLP()
  def loss_fn(params, x, y, dropout_key):
    logits = model.apply(params, x, train=True, rngs={"dropout": dropout_key})
    return jkfac.softmax_cross_entropy(logits, y)
  return Zoo("mnist", lambda key, x: (model.init(key, x, train=False), ()), loss_fn,
             lambda state, x, y, key: (x, y, key))


MODELS = {"cnn": _cnn, "mlp": _mlp, "resnet": _resnet, "transformer": _transformer,
          "rnn": _rnn, "dropout": _dropout}

# (form, value): the initial damping of the adaptive optimizer, the learning
# rate of the fixed one (momentum 0.9), or nothing for `jkfac.kfac(est)`.
# Grouped by the program they compile: one test per model and group.
GROUPS = {
    "adaptive": [("adaptive", d) for d in (1e-4, 1e-2, 1.0, 1e2)] + [("defaults", None)],
    "fixed": [("fixed", lr) for lr in (0.01, 0.1, 0.3)],
}
SETTINGS = [setting for group in GROUPS.values() for setting in group]


def _optimizer(est, form: str, value):
  if form == "adam":   # a reference for the script, not a test
    return optax.with_extra_args_support(optax.adam(value))
  if form == "adaptive":
    return jkfac.kfac(est, damping=value)
  if form == "fixed":
    return jkfac.kfac(est, learning_rate=value, momentum=0.9)
  return jkfac.kfac(est)


# --------------------------------------------------------------------------- #
# Training: 30 steps in one compiled call
# --------------------------------------------------------------------------- #


@functools.cache
def _setup(model: str):
  """`(zoo, params, model_state, est, xs, ys)` for `model`, or None without its data."""
  zoo = MODELS[model]()
  data = _batches(zoo.dataset)
  if data is None:
    return None
  xs, ys = data
  # Compiled without LLVM's optimisations: ten times faster to compile, and
  # the initialisation runs once.
  init = jax.jit(zoo.init).lower(jax.random.PRNGKey(0), xs[0]).compile(
      {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})
  params, model_state = init(jax.random.PRNGKey(0), xs[0])
  est = jkfac.estimator(zoo.loss_fn, params,
                        *zoo.args(model_state, xs[0], ys[0], jax.random.PRNGKey(0)),
                        has_aux=zoo.has_aux)
  return zoo, params, model_state, est, xs, ys


# The models compiled with LLVM's optimisations (level 1; the others with none).
_OPT_LEVELS = {"cnn": 1, "resnet": 1}


@functools.cache
def _trainer(model: str, form: str):
  """`train(value) -> losses (STEPS,)`, compiled once per (model, form)."""
  setup = _setup(model)
  if setup is None:
    return None
  zoo, params, model_state, est, xs, ys = setup
  keys = jax.random.split(jax.random.PRNGKey(1), STEPS)

  def train(params, model_state, xs, ys, keys, value):
    tx = _optimizer(est, form, value)   # a traced damping or learning rate

    def step(carry, batch):
      params, model_state, opt_state = carry
      x, y, key = batch
      model_key, key = jax.random.split(key)
      out, grads, stats = est(params, *zoo.args(model_state, x, y, model_key), rng=key)
      loss, model_state = out if zoo.has_aux else (out, model_state)
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
      params = optax.apply_updates(params, updates)
      return (params, model_state, opt_state), loss

    _, losses = jax.lax.scan(step, (params, model_state, tx.init(params)), (xs, ys, keys))
    return losses

  # The LLVM optimisation level that takes least time to compile and run the
  # group's settings, whatever the suite's XLA_FLAGS say (measured on two CPU
  # cores): the convnets' 30 steps run ten times slower unoptimised, and level 1
  # runs them as fast as level 3 in half the compilation; the other models run
  # fastest in all, compilation included, unoptimised.
  compiled = jax.jit(train).lower(params, model_state, xs, ys, keys, np.float32(0.0)).compile(
      {"xla_backend_optimization_level": _OPT_LEVELS.get(model, 0)})

  @functools.cache
  def run(value):
    value = np.float32(0.0 if value is None else value)
    return np.asarray(compiled(params, model_state, xs, ys, keys, value))

  return run


def _default_damping() -> Optional[float]:
  """`jkfac.kfac`'s default damping when `jkfac.kfac(est)` is the adaptive
  optimizer from that damping, else None."""
  defaults = {name: p.default for name, p in inspect.signature(jkfac.kfac).parameters.items()}
  damping = defaults.get("damping")
  if damping is None:  # the default of the optimizer's form
    damping = jkfac.transform.ADAPTIVE_DAMPING
  adaptive = defaults.get("learning_rate", 0) is None or defaults.get("momentum", 0) is None
  return float(damping) if adaptive and isinstance(damping, (int, float)) else None


def _losses(model: str, form: str, value, literal_defaults: bool = False) -> np.ndarray:
  """The STEPS losses of `model` trained with the setting `(form, value)`.

  `jkfac.kfac(est)` is, by Python's rules, `jkfac.kfac(est, damping=<its
  default>)`: unless `literal_defaults`, the "defaults" setting runs on the
  adaptive form's compiled program at that value (one compilation fewer per
  model); the script runs it as its own program.
  """
  if form == "defaults" and not literal_defaults and _default_damping() is not None:
    form, value = "adaptive", _default_damping()
  trainer = _trainer(model, form)
  if trainer is None:
    pytest.skip(f"{MODELS[model]().dataset} files not found (looked in $JKFAC_DATA_DIR, "
                "<repo>/../shared/data and the jkfac cache)")
  return trainer(value)


def _verdict(losses: np.ndarray) -> Optional[str]:
  """None if the run passes, else what went wrong."""
  first = losses[0]
  if not np.all(np.isfinite(losses)):
    return f"a loss is not finite (first at step {int(np.argmin(np.isfinite(losses)))})"
  if losses.max() > 2 * first:
    return f"loss {losses.max():.4g} at step {int(losses.argmax())} is above twice the first"
  if losses[-5:].mean() >= 0.7 * first:
    return f"mean of the last five {losses[-5:].mean():.4g} is not below 0.7 x the first"
  return None


def _setting_id(setting) -> str:
  form, value = setting
  return form if value is None else f"{form}-{value:g}"


HEADER = (f"{'model':<12} {'setting':<16} {'first':>7} {'max':>7} {'last5':>7}  "
          f"{'result':<6}  problem")


def _row(model: str, setting, losses: np.ndarray, problem: Optional[str]) -> str:
  return (f"{model:<12} {_setting_id(setting):<16} {losses[0]:7.3f} {losses.max():7.3f} "
          f"{losses[-5:].mean():7.3f}  {'pass' if problem is None else 'FAIL':<6}  "
          f"{problem or ''}")


pytestmark = pytest.mark.skipif(
    os.environ.get("JKFAC_SKIP_ZOO") == "1",
    reason="JKFAC_SKIP_ZOO=1: the zoo ran in the newest-JAX suite (CI time)")


@pytest.mark.parametrize("group", list(GROUPS))
@pytest.mark.parametrize("model", list(MODELS))
def test_zoo_trains(model, group):
  """Every setting of the group trains `model`: losses finite, none above
  twice the first, the mean of the last five below 0.7 times the first.

  The settings of a group share one compiled program, so they are one test
  (split over pytest-xdist workers, each would compile it); the failure
  message is the group's table, failing settings with their losses.
  """
  rows, failed = [HEADER], []
  for setting in GROUPS[group]:
    losses = _losses(model, *setting)
    problem = _verdict(losses)
    rows.append(_row(model, setting, losses, problem))
    if problem is not None:
      failed.append(_setting_id(setting))
      rows.append("    losses " + np.array2string(losses, precision=3, max_line_width=1000))
  assert not failed, f"{model}: {', '.join(failed)} failed\n" + "\n".join(rows)


# --------------------------------------------------------------------------- #
# As a script: the zoo's table
# --------------------------------------------------------------------------- #


def main(argv: list[str]) -> int:
  """Prints the zoo's table; `--adam` adds Adam runs as a reference."""
  adam = "--adam" in argv
  models = [a for a in argv if not a.startswith("--")] or list(MODELS)
  settings = SETTINGS + ([("adam", lr) for lr in (1e-3, 3e-3, 1e-2, 3e-2)] if adam else [])
  print(HEADER.replace("  problem", "  seconds  problem"))
  failures = 0
  for model in models:
    for setting in settings:
      start = time.perf_counter()
      try:
        losses = _losses(model, *setting, literal_defaults=True)
      except Exception as e:  # pylint: disable=broad-except
        failures += setting[0] != "adam"
        print(f"{model:<12} {_setting_id(setting):<16} {'':>7} {'':>7} {'':>7}  ERROR   "
              f"{time.perf_counter() - start:7.1f}  {type(e).__name__}: {e}".splitlines()[0])
        continue
      problem = _verdict(losses)
      failures += problem is not None and setting[0] != "adam"
      row = _row(model, setting, losses, problem)
      print(row[:row.index("pass" if problem is None else "FAIL") + 8]
            + f"{time.perf_counter() - start:7.1f}  {problem or ''}", flush=True)
  return 1 if failures else 0


if __name__ == "__main__":
  jax.config.update("jax_enable_x64", True)   # as tests/conftest.py does
  sys.exit(main(sys.argv[1:]))
