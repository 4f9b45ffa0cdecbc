# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Each framework's own way of training (flax nnx and linen, equinox, haiku), and
jkfac inside optax's partitions.

Every model is written as its library's users write it; each trains 30 steps
with jkfac's defaults and with Adam from the same start, and K-FAC must end
lower.
"""

import pathlib
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jkfac
from test_scan import _ONCE  # the frameworks' loops run in the newest-JAX suite only

STEPS, FEATURES, CLASSES = 30, 16, 4
X = jax.random.normal(jax.random.key(0), (128, FEATURES), jnp.float32)
Y = jnp.argmax(X @ jax.random.normal(jax.random.key(1), (FEATURES, CLASSES)), axis=-1)
ADAM = optax.adam(1e-2)


def _assert_kfac_beats_adam(train):
  kfac_loss, adam_loss = train(kfac=True), train(kfac=False)
  print(f"loss after {STEPS} steps: jkfac {kfac_loss:.4g}, Adam {adam_loss:.4g}")
  assert np.isfinite(kfac_loss) and kfac_loss < adam_loss, (kfac_loss, adam_loss)


@_ONCE
@pytest.mark.parametrize("jit", [True, False])
def test_nnx_optimizer(jit):
  """nnx.Optimizer(model, jkfac.kfac(est), wrt=nnx.Param), under nnx.jit and eagerly."""
  nnx = pytest.importorskip("flax.nnx")

  class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.hidden = nnx.Linear(FEATURES, 32, rngs=rngs)
      self.out = nnx.Linear(32, CLASSES, rngs=rngs)

    def __call__(self, x):
      return self.out(nnx.relu(self.hidden(x)))

  def train(kfac):
    model = MLP(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(params, x, y):
      return jkfac.softmax_cross_entropy(nnx.merge(graphdef, params)(x), y)

    est = jkfac.estimator(loss_fn, params, X, Y)
    optimizer = nnx.Optimizer(model, jkfac.kfac(est) if kfac else ADAM, wrt=nnx.Param)

    def step(model, optimizer, x, y, key):
      loss, grads, stats = est(nnx.state(model, nnx.Param), x, y, rng=key)
      optimizer.update(model, grads, **({"stats": stats} if kfac else {}))
      return loss

    step = nnx.jit(step) if jit else step
    for i in range(STEPS if jit else 1):
      step(model, optimizer, X, Y, jax.random.key(i))
    return float(loss_fn(nnx.state(model, nnx.Param), X, Y))

  if jit:
    _assert_kfac_beats_adam(train)
    # The estimator takes the state with or without its Variables, and answers alike.
    model = MLP(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    est = jkfac.estimator(lambda p, x, y: jkfac.softmax_cross_entropy(
        nnx.merge(graphdef, p)(x), y), params, X, Y)
    pure = jax.tree.map(lambda v: v[...], params, is_leaf=lambda v: isinstance(v, nnx.Variable))
    _, grads, _ = est(pure, X, Y, rng=jax.random.key(0))
    _, wrapped, _ = est(params, X, Y, rng=jax.random.key(0))
    assert jax.tree.structure(grads) == jax.tree.structure(pure)
    jax.tree.map(np.testing.assert_array_equal, grads, jkfac.trees.unwrap(wrapped))
  else:  # eager nnx: the same code runs, more slowly (a few steps)
    assert np.isfinite(train(kfac=True))


@_ONCE
def test_nnx_example_trains_a_masked_sequence_model(capsys):
  """examples/nnx_training.py: nnx.Optimizer, nnx.jit and a token mask."""
  pytest.importorskip("flax.nnx")
  path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "nnx_training.py"
  assert runpy.run_path(str(path))["main"]() < 0.05
  assert "masked over (64, 12)" in capsys.readouterr().out


@_ONCE
def test_linen_train_state():
  """flax linen's TrainState, with apply_gradients taking the statistics (README)."""
  nn = pytest.importorskip("flax.linen")
  from flax.training import train_state

  class KFACTrainState(train_state.TrainState):
    """A TrainState whose apply_gradients passes the curvature statistics on."""

    def apply_gradients(self, *, grads, stats, **kwargs):
      updates, opt_state = self.tx.update(grads, self.opt_state, self.params, stats=stats)
      return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                          opt_state=opt_state, **kwargs)

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(CLASSES)(nn.relu(nn.Dense(32)(x)))

  model = MLP()
  params = model.init(jax.random.key(0), X)["params"]
  loss_fn = lambda params, x, y: jkfac.softmax_cross_entropy(
      model.apply({"params": params}, x), y)
  est = jkfac.estimator(loss_fn, params, X, Y)

  def train(kfac):
    cls = KFACTrainState if kfac else train_state.TrainState
    state = cls.create(apply_fn=model.apply, params=params,
                       tx=jkfac.kfac(est) if kfac else ADAM)

    @jax.jit
    def step(state, x, y, key):
      loss, grads, stats = est(state.params, x, y, rng=key)
      if kfac:
        return state.apply_gradients(grads=grads, stats=stats)
      return state.apply_gradients(grads=grads)

    for i in range(STEPS):
      state = step(state, X, Y, jax.random.key(i))
    return float(loss_fn(state.params, X, Y))

  _assert_kfac_beats_adam(train)


@_ONCE
def test_equinox_filter_jit():
  """An equinox MLP split with eqx.partition, trained in a filter_jit loop."""
  eqx = pytest.importorskip("equinox")
  model = eqx.nn.MLP(FEATURES, CLASSES, 32, depth=1, key=jax.random.key(0))
  params, static = eqx.partition(model, eqx.is_array)

  def loss_fn(params, x, y):
    return jkfac.softmax_cross_entropy(jax.vmap(eqx.combine(params, static))(x), y)

  est = jkfac.estimator(loss_fn, params, X, Y)
  assert all(layer.kind == "dense" for layer in est.layers)

  def train(kfac):
    tx = jkfac.kfac(est) if kfac else ADAM
    p, opt_state = params, tx.init(params)

    @eqx.filter_jit
    def step(p, opt_state, x, y, key):
      loss, grads, stats = est(p, x, y, rng=key)
      updates, opt_state = tx.update(grads, opt_state, p,
                                     **({"stats": stats} if kfac else {}))
      return eqx.apply_updates(p, updates), opt_state

    for i in range(STEPS):
      p, opt_state = step(p, opt_state, X, Y, jax.random.key(i))
    return float(loss_fn(p, X, Y))

  _assert_kfac_beats_adam(train)
  with pytest.raises(TypeError, match=r"eqx\.partition"):
    jkfac.estimator(lambda m, x, y: jkfac.softmax_cross_entropy(jax.vmap(m)(x), y), model,
                    X, Y)


@_ONCE
def test_haiku_transform():
  """A haiku MLP under hk.transform."""
  hk = pytest.importorskip("haiku")
  net = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([32, CLASSES])(x)))
  params = net.init(jax.random.key(0), X)
  loss_fn = lambda params, x, y: jkfac.softmax_cross_entropy(net.apply(params, x), y)
  est = jkfac.estimator(loss_fn, params, X, Y)

  def train(kfac):
    tx = jkfac.kfac(est) if kfac else ADAM
    p, opt_state = params, tx.init(params)

    @jax.jit
    def step(p, opt_state, x, y, key):
      loss, grads, stats = est(p, x, y, rng=key)
      updates, opt_state = tx.update(grads, opt_state, p,
                                     **({"stats": stats} if kfac else {}))
      return optax.apply_updates(p, updates), opt_state

    for i in range(STEPS):
      p, opt_state = step(p, opt_state, X, Y, jax.random.key(i))
    return float(loss_fn(p, X, Y))

  _assert_kfac_beats_adam(train)


# --- optax partitions ---------------------------------------------------------

VOCAB, WIDTH = 20, 8
TOKENS = jax.random.randint(jax.random.key(2), (64, 5), 0, VOCAB)
TOKEN_Y = jnp.sum(TOKENS, axis=1) % CLASSES


def _bag_of_words():
  k = jax.random.split(jax.random.key(3), 2)
  params = {"embed": jax.random.normal(k[0], (VOCAB, WIDTH)) * 0.3,
            "dense": {"kernel": jax.random.normal(k[1], (WIDTH, CLASSES)) * 0.3,
                      "bias": jnp.zeros(CLASSES)}}

  def loss_fn(p, tokens, y):
    features = jnp.mean(jnp.take(p["embed"], tokens, axis=0), axis=1)
    return jkfac.softmax_cross_entropy(features @ p["dense"]["kernel"] + p["dense"]["bias"], y)

  return params, loss_fn


def _run(est, tx, params, args, steps):

  @jax.jit
  def step(params, state, key):
    loss, grads, stats = est(params, *args, rng=key)
    updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state, loss

  state, losses = tx.init(params), []
  for i in range(steps):
    params, state, loss = step(params, state, jax.random.key(i))
    losses.append(float(loss))
  return params, state, losses[0], float(est(params, *args, rng=jax.random.key(0))[0])


def test_multi_transform_kfac_on_dense_adam_on_embedding():
  params, loss_fn = _bag_of_words()
  est = jkfac.estimator(loss_fn, params, TOKENS, TOKEN_Y)
  labels = {"embed": "adam", "dense": {"kernel": "kfac", "bias": "kfac"}}
  tx = optax.multi_transform({"adam": optax.adam(1e-2), "kfac": jkfac.kfac(est)}, labels)
  after, state, first, last = _run(est, tx, params, (TOKENS, TOKEN_Y), 20)
  assert last < 0.8 * first
  assert not np.allclose(after["embed"], params["embed"])
  kfac_state = state.inner_states["kfac"].inner_state
  assert set(kfac_state.preconditioner.factors) == {"dense"}  # the embedding's kept by Adam
  assert set(jkfac.diagnostics(est, state).layers) == {"dense"}
  # A layer split across two partitions is refused.
  split = {"embed": "adam", "dense": {"kernel": "kfac", "bias": "adam"}}
  with pytest.raises(ValueError, match="both inside and outside"):
    optax.multi_transform({"adam": optax.adam(1e-2), "kfac": jkfac.kfac(est)}, split).init(
        params)


def test_masked_and_partition_precondition_their_own_layers():
  """With a fixed step and no trust region, block-diagonal K-FAC on a subset
  equals whole-model K-FAC on that subset; masked leaves pass through."""
  params, loss_fn = _bag_of_words()
  est = jkfac.estimator(loss_fn, params, TOKENS, TOKEN_Y)
  make = lambda: jkfac.kfac(est, learning_rate=0.1, momentum=0.9, kl_clip=None)
  loss, grads, stats = est(params, TOKENS, TOKEN_Y, rng=jax.random.key(0))
  whole, _ = make().update(grads, make().init(params), params, stats=stats)
  mask = {"embed": False, "dense": {"kernel": True, "bias": True}}
  masked = optax.masked(make(), mask)
  updates, _ = masked.update(grads, masked.init(params), params, stats=stats)
  jax.tree.map(np.testing.assert_allclose, updates["dense"], whole["dense"])
  np.testing.assert_array_equal(updates["embed"], grads["embed"])
  labels = {"embed": "sgd", "dense": {"kernel": "kfac", "bias": "kfac"}}
  partition = optax.partition({"sgd": optax.sgd(0.1), "kfac": make()}, labels)
  updates, _ = jax.jit(partition.update)(grads, partition.init(params), params, stats=stats)
  jax.tree.map(np.testing.assert_allclose, updates["dense"], whole["dense"])
  np.testing.assert_allclose(updates["embed"], -0.1 * grads["embed"])
