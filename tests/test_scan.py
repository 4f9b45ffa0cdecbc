"""Layers inside `lax.scan`: stacks of layers (scan over layers) and weights
shared over iterations (an RNN over time), against the same models unrolled
in Python with the same weights."""

import os
import subprocess
import sys

import equinox as eqx
import flax.linen as nn
from flax import nnx
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import brute_force as bf
import jkfac

KEY = jax.random.PRNGKey(0)
_ONCE = pytest.mark.skipif(
    os.environ.get("JKFAC_SKIP_ZOO") == "1",
    reason="JKFAC_SKIP_ZOO=1: the flax model tests and the longer runs ran in the "
           "newest-JAX suite (CI time); the plain-JAX scans run in both")

FEATURES, WIDTH, CLASSES, DEPTH, BATCH, STEPS_IN_TIME = 4, 5, 3, 3, 12, 4


def _normal(key, shape, scale=0.5):
  return scale * jax.random.normal(key, shape, jnp.float64) / np.sqrt(shape[-2] if len(shape) > 1 else 1)


# --------------------------------------------------------------------------- #
# Scan over layers: a stack of DEPTH tanh layers of width WIDTH
# --------------------------------------------------------------------------- #


def stack_params(key):
  k = jax.random.split(key, 5)
  return {"w_in": _normal(k[0], (FEATURES, WIDTH)),
          "stack": {"w": _normal(k[1], (DEPTH, WIDTH, WIDTH), 1.0),
                    "b": 0.1 * jax.random.normal(k[2], (DEPTH, WIDTH), jnp.float64)},
          "head": {"w": _normal(k[3], (WIDTH, CLASSES)),
                   "b": 0.1 * jax.random.normal(k[4], (CLASSES,), jnp.float64)}}


def scanned_loss(params, x, y):
  h = jnp.tanh(x @ params["w_in"])

  def block(h, layer):
    return jnp.tanh(h @ layer["w"] + layer["b"]), None

  h, _ = jax.lax.scan(block, h, params["stack"])
  return jkfac.softmax_cross_entropy(h @ params["head"]["w"] + params["head"]["b"], y)


def unrolled_params(params):
  return {"w_in": params["w_in"],
          "blocks": [{"w": params["stack"]["w"][l], "b": params["stack"]["b"][l]}
                     for l in range(DEPTH)],
          "head": params["head"]}


def unrolled_loss(params, x, y):
  h = jnp.tanh(x @ params["w_in"])
  for layer in params["blocks"]:
    h = jnp.tanh(h @ layer["w"] + layer["b"])
  return jkfac.softmax_cross_entropy(h @ params["head"]["w"] + params["head"]["b"], y)


def restack(unrolled):
  """The unrolled model's tree (parameters, updates) in the scanned layout."""
  return {"w_in": unrolled["w_in"],
          "stack": {k: jnp.stack([layer[k] for layer in unrolled["blocks"]])
                    for k in ("w", "b")},
          "head": unrolled["head"]}


def _pair(mode="exact"):
  params = stack_params(KEY)
  x, y = bf.classification_data(BATCH, FEATURES, CLASSES)
  scanned = jkfac.estimator(scanned_loss, params, x, y, mode=mode)
  unrolled = jkfac.estimator(unrolled_loss, unrolled_params(params), x, y, mode=mode)
  return params, (x, y), scanned, unrolled


def _stats(est, params, *batch):
  """`est(params, *batch)`, compiled (eager evaluation dispatches every operation)."""
  return jax.jit(lambda p, *b: est(p, *b))(params, *batch)


def test_a_stack_is_found_as_one_stacked_layer():
  _, _, scanned, unrolled = _pair()
  layer = next(l for l in scanned.layers if l.name == "stack")
  assert layer.kind == "dense" and layer.stack == (DEPTH,)
  assert [p.role for p in layer.params] == ["kernel", "bias"]
  assert not [l for l in scanned.layers if l.kind == "diagonal"]
  assert len(scanned.layers) == 3 and len(unrolled.layers) == DEPTH + 2
  table = str(scanned)
  assert f"{DEPTH} x (A {WIDTH + 1}x{WIDTH + 1}, G {WIDTH}x{WIDTH})" in table
  assert "no parameter is left to a fallback block" in table


@jax.custom_vjp
def _softsign(x):
  return x / (1 + jnp.abs(x))


_softsign.defvjp(lambda x: (_softsign(x), x),
                 lambda x, g: (g / (1 + jnp.abs(x)) ** 2,))


def test_a_body_under_remat_jit_and_custom_vjp_is_the_same_stack():
  # The body wrapped as libraries wrap it: checkpointed, jitted, with a
  # custom-derivative activation; its stack is found and its statistics agree.
  params, (x, y), scanned, _ = _pair()

  @jax.checkpoint
  @jax.jit
  def block(h, layer):
    return _softsign(jnp.tanh(h @ layer["w"] + layer["b"])), None

  def wrapped_loss(params, x, y):
    h, _ = jax.lax.scan(block, jnp.tanh(x @ params["w_in"]), params["stack"])
    return jkfac.softmax_cross_entropy(h @ params["head"]["w"] + params["head"]["b"], y)

  def plain_loss(params, x, y):  # the same function, no wrappers
    def body(h, layer):
      t = jnp.tanh(h @ layer["w"] + layer["b"])
      return t / (1 + jnp.abs(t)), None
    h, _ = jax.lax.scan(body, jnp.tanh(x @ params["w_in"]), params["stack"])
    return jkfac.softmax_cross_entropy(h @ params["head"]["w"] + params["head"]["b"], y)

  wrapped, plain = (jkfac.estimator(f, params, x, y, mode="exact")
                    for f in (wrapped_loss, plain_loss))
  assert [(l.name, l.kind, l.stack) for l in wrapped.layers] == [
      (l.name, l.kind, l.stack) for l in scanned.layers], str(wrapped)
  _, _, stats = _stats(wrapped, params, x, y)
  _, _, stats_p = _stats(plain, params, x, y)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), stats.factors,
               stats_p.factors)


@pytest.mark.parametrize("mode", ["exact", "empirical"])
def test_stacked_statistics_equal_the_unrolled_layers(mode):
  params, batch, scanned, unrolled = _pair(mode)
  _, grads, stats = _stats(scanned, params, *batch)
  _, grads_u, stats_u = _stats(unrolled, unrolled_params(params), *batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10),
               grads, restack(grads_u))
  for name in ("A", "G"):
    expected = np.stack([stats_u.factors[f"blocks/{l}"][name] for l in range(DEPTH)])
    assert stats.factors["stack"][name].shape == expected.shape
    np.testing.assert_allclose(stats.factors["stack"][name], expected, rtol=1e-10)
  for name in ("w_in", "head"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10),
                 stats.factors[name], stats_u.factors[name])


def _train(est, tx, params, batch, steps):
  state = tx.init(params)
  step = jax.jit(lambda p, s: _step(est, tx, p, s, batch))
  for _ in range(steps):
    params, state, updates = step(params, state)
  return params, updates


def _step(est, tx, params, state, batch):
  _, grads, stats = est(params, *batch)
  updates, state = tx.update(grads, state, params, stats=stats)
  return optax.apply_updates(params, updates), state, updates


def test_a_stack_takes_any_block_kind_per_layer():
  # The exact Fisher block of each layer (per-example gradients), stacked.
  params = stack_params(KEY)
  x, y = bf.classification_data(BATCH, FEATURES, CLASSES)
  scanned = jkfac.estimator(scanned_loss, params, x, y, mode="exact",
                            overrides={"stack": "full"})
  unrolled = jkfac.estimator(unrolled_loss, unrolled_params(params), x, y, mode="exact",
                             overrides={"blocks/*": "full"})
  assert {l.name: (l.kind, l.stack) for l in scanned.layers}["stack"] == ("full", (DEPTH,))
  _, grads, stats = _stats(scanned, params, x, y)
  _, grads_u, stats_u = _stats(unrolled, unrolled_params(params), x, y)
  (name,) = stats.factors["stack"]
  expected = np.stack([stats_u.factors[f"blocks/{l}"][name] for l in range(DEPTH)])
  np.testing.assert_allclose(stats.factors["stack"][name], expected, rtol=1e-10)
  updates = [jkfac.scale_by_kfac(est, damping=1e-2) for est in (scanned, unrolled)]
  (u, _), (u_u, _) = [tx.update(g, tx.init(p), p, stats=st) for tx, g, p, st in zip(
      updates, (grads, grads_u), (params, unrolled_params(params)), (stats, stats_u))]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9), u, restack(u_u))


@pytest.mark.parametrize("settings", [dict(), dict(learning_rate=0.1, momentum=0.9)],
                         ids=["adaptive", "fixed"])
def test_scanned_training_equals_unrolled(settings):
  params, batch, scanned, unrolled = _pair()
  final, updates = _train(scanned, jkfac.kfac(scanned, inverse_every=2, **settings),
                          params, batch, 5)
  final_u, updates_u = _train(unrolled, jkfac.kfac(unrolled, inverse_every=2, **settings),
                              unrolled_params(params), batch, 5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-14),
               updates, restack(updates_u))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-8),
               final, restack(final_u))


# --------------------------------------------------------------------------- #
# Weights shared over iterations: an RNN over time
# --------------------------------------------------------------------------- #


def rnn_params(key):
  k = jax.random.split(key, 4)
  return {"wx": _normal(k[0], (FEATURES, WIDTH)), "wh": _normal(k[1], (WIDTH, WIDTH), 1.0),
          "head": {"w": _normal(k[2], (WIDTH, CLASSES)),
                   "b": 0.1 * jax.random.normal(k[3], (CLASSES,), jnp.float64)}}


def _cell(params, h, x):
  return jnp.tanh(x @ params["wx"] + h @ params["wh"])


def _recurrent_losses(cell):
  """The loss of an RNN of `cell` over the sequence, by `lax.scan` and in a Python loop."""
  def scanned(params, xs, y):
    h0 = jnp.zeros((xs.shape[0], WIDTH), xs.dtype)
    h, _ = jax.lax.scan(lambda h, x: (cell(params, h, x), None), h0, jnp.swapaxes(xs, 0, 1))
    return jkfac.softmax_cross_entropy(h @ params["head"]["w"] + params["head"]["b"], y)

  def unrolled(params, xs, y):
    h = jnp.zeros((xs.shape[0], WIDTH), xs.dtype)
    for t in range(xs.shape[1]):
      h = cell(params, h, xs[:, t])
    return jkfac.softmax_cross_entropy(h @ params["head"]["w"] + params["head"]["b"], y)

  return scanned, unrolled


scanned_rnn_loss, unrolled_rnn_loss = _recurrent_losses(_cell)


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
def test_a_scanned_rnn_equals_its_unrolled_form(weight_sharing):
  params = rnn_params(KEY)
  x, y = bf.classification_data(BATCH, FEATURES * STEPS_IN_TIME, CLASSES)
  xs = x.reshape(BATCH, STEPS_IN_TIME, FEATURES)
  scanned, unrolled = (jkfac.estimator(f, params, xs, y, mode="exact",
                                       weight_sharing=weight_sharing)
                       for f in (scanned_rnn_loss, unrolled_rnn_loss))
  assert [(l.name, l.kind, l.stack) for l in scanned.layers] == [
      (l.name, l.kind, ()) for l in unrolled.layers]
  assert not [l for l in scanned.layers if l.kind == "diagonal"]
  _, grads, stats = _stats(scanned, params, xs, y)
  _, grads_u, stats_u = _stats(unrolled, params, xs, y)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), grads, grads_u)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-16),
               stats.factors, stats_u.factors)
  # Training is compared on the biased cell below (the optimizer depends on
  # nothing but these statistics and the blocks).


# Cells summing products before one bias: x @ Wx + h @ Wh + b, and a GRU


def biased_rnn_params(key):
  params = rnn_params(key)
  params["b"] = 0.1 * jax.random.normal(jax.random.fold_in(key, 9), (WIDTH,), jnp.float64)
  return params


def _biased_cell(params, h, x):
  return jnp.tanh(x @ params["wx"] + h @ params["wh"] + params["b"])


def _gru_params(key):
  k = jax.random.split(key, 8)
  gates = {g: {"w": _normal(k[i], (FEATURES, WIDTH)), "u": _normal(k[i + 3], (WIDTH, WIDTH), 1.0),
               "b": 0.1 * jax.random.normal(jax.random.fold_in(k[i], 1), (WIDTH,), jnp.float64)}
           for i, g in enumerate("zrn")}
  return {"gates": gates, "head": {"w": _normal(k[6], (WIDTH, CLASSES)),
                                   "b": 0.1 * jax.random.normal(k[7], (CLASSES,), jnp.float64)}}


def _gru_cell(params, h, x):
  """A GRU cell as written by hand (Cho et al. 2014): each gate `x W + h U + b`."""
  g = params["gates"]
  z = jax.nn.sigmoid(x @ g["z"]["w"] + h @ g["z"]["u"] + g["z"]["b"])
  r = jax.nn.sigmoid(x @ g["r"]["w"] + h @ g["r"]["u"] + g["r"]["b"])
  n = jnp.tanh(x @ g["n"]["w"] + (r * h) @ g["n"]["u"] + g["n"]["b"])
  return (1 - z) * n + z * h



def _sequences():
  x, y = bf.classification_data(BATCH, FEATURES * STEPS_IN_TIME, CLASSES)
  return x.reshape(BATCH, STEPS_IN_TIME, FEATURES), y


def test_an_rnn_cell_with_one_bias_is_one_dense_layer_over_x_h_and_1():
  params, (xs, y) = biased_rnn_params(KEY), _sequences()
  scanned_loss_fn, _ = _recurrent_losses(_biased_cell)
  est = jkfac.estimator(scanned_loss_fn, params, xs, y, mode="exact")
  cell = next(l for l in est.layers if l.name != "head")
  assert [(p.path, p.role) for p in cell.params] == [("wx", "kernel"), ("b", "bias"),
                                                     ("wh", "kernel")], str(est)
  assert len(est.layers) == 2 and not [l for l in est.layers if l.kind == "diagonal"]
  assert f"A {FEATURES + WIDTH + 1}x{FEATURES + WIDTH + 1}, G {WIDTH}x{WIDTH}" in str(est)
  _, grads, stats = _stats(est, params, xs, y)
  # A: the mean over examples and time steps of [x_t, h_{t-1}, 1] [x_t, h_{t-1}, 1]^T.
  h, rows = jnp.zeros((BATCH, WIDTH)), []
  for t in range(STEPS_IN_TIME):
    rows.append(jnp.concatenate([xs[:, t], h, jnp.ones((BATCH, 1))], axis=1))
    h = _biased_cell(params, h, xs[:, t])
  a = jnp.concatenate(rows)
  np.testing.assert_allclose(stats.factors[cell.name]["A"], a.T @ a / a.shape[0], rtol=1e-12)
  # The update: A^{-1} [∇Wx; ∇Wh; ∇b] G^{-1}, split back into the three parameters.
  tx = jkfac.scale_by_kfac(est, damping=1e-2)
  updates, state = tx.update(grads, tx.init(params), params, stats=stats)
  inv = state.inverses[cell.name]
  stacked = jnp.concatenate([grads["wx"], grads["wh"], grads["b"][None]])
  expected = inv["A_inv"] @ stacked @ inv["G_inv"]
  for got, want in ((updates["wx"], expected[:FEATURES]),
                    (updates["wh"], expected[FEATURES:-1]), (updates["b"], expected[-1])):
    np.testing.assert_allclose(got, want, rtol=1e-10)


@pytest.mark.parametrize("cell", [_biased_cell, pytest.param(_gru_cell, marks=_ONCE)],
                         ids=["rnn", "gru"])
def test_a_scanned_recurrent_cell_equals_its_unrolled_form(cell):
  params = biased_rnn_params(KEY) if cell is _biased_cell else _gru_params(KEY)
  xs, y = _sequences()
  scanned, unrolled = (jkfac.estimator(f, params, xs, y, mode="exact")
                       for f in _recurrent_losses(cell))
  gates = 1 if cell is _biased_cell else 3  # one dense layer over [x, h, 1] per gate
  assert [l.kind for l in scanned.layers] == ["dense"] * (gates + 1), str(scanned)
  assert [(l.name, l.params) for l in scanned.layers] == [
      (l.name, l.params) for l in unrolled.layers]
  _, grads, stats = _stats(scanned, params, xs, y)
  _, grads_u, stats_u = _stats(unrolled, params, xs, y)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), grads, grads_u)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-16),
               stats.factors, stats_u.factors)
  if cell is _gru_cell:
    return  # training depends only on the statistics and the blocks (the RNN trains below)
  final, _ = _train(scanned, jkfac.kfac(scanned, inverse_every=2), params, (xs, y), 5)
  final_u, _ = _train(unrolled, jkfac.kfac(unrolled, inverse_every=2), params, (xs, y), 5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-8), final, final_u)


def _deep_rnn_params(key):
  """DEPTH recurrent layers of width FEATURES, stacked, and a head."""
  k = jax.random.split(key, 4)
  return {"cells": {"wx": _normal(k[0], (DEPTH, FEATURES, FEATURES), 1.0),
                    "wh": _normal(k[1], (DEPTH, FEATURES, FEATURES), 1.0),
                    "b": 0.1 * jax.random.normal(k[2], (DEPTH, FEATURES), jnp.float64)},
          "head": {"w": _normal(k[3], (FEATURES, CLASSES)), "b": jnp.zeros(CLASSES)}}


def _deep_rnn_loss(scanned):
  """A stacked RNN: a scan over layers of scans over time, or Python loops."""
  def layer(cell, xs):  # xs: (time, batch, features)
    step = lambda h, x: (_biased_cell(cell, h, x),) * 2
    if scanned:
      return jax.lax.scan(step, jnp.zeros_like(xs[0]), xs)[1]
    h, out = jnp.zeros_like(xs[0]), []
    for x in xs:
      h, _ = step(h, x)
      out.append(h)
    return jnp.stack(out)

  def loss_fn(params, xs, y):
    xs = jnp.swapaxes(xs, 0, 1)
    if scanned:
      xs, _ = jax.lax.scan(lambda xs, cell: (layer(cell, xs), None), xs, params["cells"])
    else:
      for cell in params["cells"]:
        xs = layer(cell, xs)
    return jkfac.softmax_cross_entropy(xs[-1] @ params["head"]["w"] + params["head"]["b"], y)

  return loss_fn


@_ONCE
def test_nested_scans_over_layers_and_time_equal_python_loops():
  params, (xs, y) = _deep_rnn_params(KEY), _sequences()
  loops = {"cells": [jax.tree.map(lambda a, l=l: a[l], params["cells"]) for l in range(DEPTH)],
           "head": params["head"]}
  scanned = jkfac.estimator(_deep_rnn_loss(True), params, xs, y, mode="exact")
  unrolled = jkfac.estimator(_deep_rnn_loss(False), loops, xs, y, mode="exact")
  cells = scanned.layers[0]
  assert (cells.kind, cells.stack, len(scanned.layers)) == ("dense", (DEPTH,), 2), str(scanned)
  assert f"{DEPTH} x (A {2 * FEATURES + 1}x{2 * FEATURES + 1}" in str(scanned)
  _, grads, stats = _stats(scanned, params, xs, y)
  _, grads_u, stats_u = _stats(unrolled, loops, xs, y)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10),
               grads["cells"], jax.tree.map(lambda *a: jnp.stack(a), *grads_u["cells"]))
  for l in range(DEPTH):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[l], b, rtol=1e-10, atol=1e-16),
                 stats.factors[cells.name], stats_u.factors[unrolled.layers[l].name])


def test_a_layer_tagged_inside_a_scan_is_the_layer_found_there():
  params = rnn_params(KEY)
  x, y = bf.classification_data(BATCH, FEATURES * STEPS_IN_TIME, CLASSES)
  xs = x.reshape(BATCH, STEPS_IN_TIME, FEATURES)

  def tagged_loss(params, xs, y):
    def cell(h, x):
      pre = x @ params["wx"] + jkfac.register_dense(h @ params["wh"], h, params["wh"])
      return jnp.tanh(pre), None
    h, _ = jax.lax.scan(cell, jnp.zeros((xs.shape[0], WIDTH), xs.dtype), jnp.swapaxes(xs, 0, 1))
    return jkfac.softmax_cross_entropy(h @ params["head"]["w"] + params["head"]["b"], y)

  found, tagged = (jkfac.estimator(f, params, xs, y, mode="exact")
                   for f in (scanned_rnn_loss, tagged_loss))
  assert {l.name: l.note.split(",")[0] for l in tagged.layers}["wh"] == "tagged"
  _, _, stats = _stats(found, params, xs, y)
  _, _, stats_t = _stats(tagged, params, xs, y)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), stats.factors,
               stats_t.factors)


# --------------------------------------------------------------------------- #
# flax linen: a transformer whose blocks are stacked by nn.scan (with nn.remat)
# --------------------------------------------------------------------------- #

VOCAB, SEQUENCE, HEADS, LM_DEPTH = 7, 6, 2, 2


class Block(nn.Module):
  """A pre-LayerNorm transformer block, written as flax users write it."""
  width: int

  @nn.compact
  def __call__(self, x, _):
    h = nn.LayerNorm()(x)
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS)(h, h, mask=mask)
    h = nn.Dense(2 * self.width)(nn.LayerNorm()(x))
    return x + nn.Dense(self.width)(nn.gelu(h)), None


class LM(nn.Module):
  """The language model, its blocks stacked by `nn.scan(nn.remat(...))` or in a loop."""
  width: int = 8
  depth: int = LM_DEPTH
  scanned: bool = True

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, self.width)(tokens)
    if self.scanned:
      stack = nn.scan(nn.remat(Block), variable_axes={"params": 0},
                      split_rngs={"params": True}, length=self.depth)
      x, _ = stack(self.width, name="blocks")(x, None)
    else:
      for i in range(self.depth):
        x, _ = Block(self.width, name=f"block_{i}")(x, None)
    return nn.Dense(VOCAB)(nn.LayerNorm()(x))


def _lm_loss(model):
  def loss_fn(params, tokens, targets):
    return jkfac.softmax_cross_entropy(model.apply({"params": params}, tokens), targets)
  return loss_fn


def _lm_unroll(tree):
  """The scanned model's tree (parameters, updates) in the unrolled layout."""
  tree = dict(tree)
  blocks = tree.pop("blocks")
  for i in range(LM_DEPTH):
    tree[f"block_{i}"] = jax.tree.map(lambda a, i=i: a[i], blocks)
  return tree


def _lm_problem():
  tokens = jax.random.randint(jax.random.PRNGKey(3), (BATCH, SEQUENCE), 0, VOCAB)
  targets = jnp.roll(tokens, -1, axis=1)
  model = LM()
  params = jax.tree.map(lambda a: a.astype(jnp.float64),
                        model.init(KEY, tokens)["params"])
  scanned = jkfac.estimator(_lm_loss(model), params, tokens, targets, mode="exact")
  unrolled = jkfac.estimator(_lm_loss(LM(scanned=False)), _lm_unroll(params), tokens, targets,
                             mode="exact")
  return params, (tokens, targets), scanned, unrolled


@_ONCE
def test_a_flax_scanned_transformer_equals_its_unrolled_form():
  params, batch, scanned, unrolled = _lm_problem()
  stacks = [l for l in scanned.layers if l.stack]
  assert not [l for l in scanned.layers if l.kind == "diagonal"], str(scanned)
  # Per block: 2 LayerNorms, query, key, value, out, 2 Dense, all stacked.
  assert len(stacks) == 8 and all(l.stack == (LM_DEPTH,) for l in stacks), str(scanned)
  _, grads, stats = _stats(scanned, params, *batch)
  _, grads_u, stats_u = _stats(unrolled, _lm_unroll(params), *batch)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
  jax.tree.map(close, _lm_unroll(grads), grads_u)
  for layer in stacks:
    for i in range(LM_DEPTH):
      name = layer.name.replace("blocks", f"block_{i}", 1)
      jax.tree.map(lambda a, b: close(a[i], b), stats.factors[layer.name],
                   stats_u.factors[name])
  final, updates = _train(scanned, jkfac.kfac(scanned, inverse_every=2), params, batch, 5)
  final_u, updates_u = _train(unrolled, jkfac.kfac(unrolled, inverse_every=2),
                              _lm_unroll(params), batch, 5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-8),
               (_lm_unroll(updates), _lm_unroll(final)), (updates_u, final_u))


# --------------------------------------------------------------------------- #
# Each library's own way of stacking layers: every stack found, none left over
# --------------------------------------------------------------------------- #


def _haiku_stack():
  def forward(x):
    x = hk.Linear(WIDTH)(x)
    x = hk.layer_stack(DEPTH)(lambda x: jnp.tanh(hk.LayerNorm(-1, True, True)(hk.Linear(WIDTH)(x))))(x)
    return hk.Linear(CLASSES)(x)
  model = hk.without_apply_rng(hk.transform(forward))
  x, _ = bf.classification_data(BATCH, FEATURES, CLASSES)
  return model.init(KEY, x), lambda p, x: model.apply(p, x)


def _nnx_stack():
  class Block(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(WIDTH, WIDTH, rngs=rngs, param_dtype=jnp.float64)
      self.norm = nnx.LayerNorm(WIDTH, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
      return x + jnp.tanh(self.linear(self.norm(x)))

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.inp = nnx.Linear(FEATURES, WIDTH, rngs=rngs, param_dtype=jnp.float64)

      @nnx.split_rngs(splits=DEPTH)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def create(rngs):
        return Block(rngs)

      self.blocks = create(rngs)
      self.out = nnx.Linear(WIDTH, CLASSES, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
      @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
      def body(block, x):
        return block(x)

      return self.out(body(self.blocks, self.inp(x)))

  graphdef, params = nnx.split(Model(nnx.Rngs(0)), nnx.Param)
  return params, lambda p, x: nnx.merge(graphdef, p)(x)


def _equinox_stack():
  keys = jax.random.split(KEY, DEPTH + 2)
  make = lambda key, i, o: eqx.nn.Linear(i, o, key=key, dtype=jnp.float64)
  model = {"inp": make(keys[0], FEATURES, WIDTH),
           "stack": eqx.filter_vmap(lambda k: make(k, WIDTH, WIDTH))(keys[2:]),
           "out": make(keys[1], WIDTH, CLASSES)}
  params, static = eqx.partition(model, eqx.is_inexact_array)

  def one_example(m, x):  # equinox's way: the model of one example, vmapped
    layers, layer_static = eqx.partition(m["stack"], eqx.is_array)
    x, _ = jax.lax.scan(lambda x, layer: (jnp.tanh(eqx.combine(layer, layer_static)(x)), None),
                        m["inp"](x), layers)
    return m["out"](x)

  return params, lambda p, x: jax.vmap(lambda x: one_example(eqx.combine(p, static), x))(x)


@pytest.mark.parametrize("build", [_haiku_stack, _nnx_stack, _equinox_stack],
                         ids=["haiku_layer_stack", "nnx_scan", "equinox_scan"])
def test_each_librarys_stacked_layers_are_found(build):
  params, apply = build()
  x, y = bf.classification_data(BATCH, FEATURES, CLASSES)
  loss_fn = lambda p, x, y: jkfac.softmax_cross_entropy(apply(p, x), y)
  est = jkfac.estimator(loss_fn, params, x, y, mode="exact")
  table = str(est)
  assert "no parameter is left to a fallback block" in table, table
  stacks = [l for l in est.layers if l.stack]
  assert stacks and all(l.stack == (DEPTH,) for l in stacks), table
  assert {l.kind for l in stacks} >= {"dense"}
  # Every bias is folded into its dense layer's block (none is a shift of its own).
  assert not [l for l in est.layers if [p.role for p in l.params] == ["shift"]], table
  loss, grads, stats = _stats(est, params, x, y)
  assert np.isfinite(loss)
  for layer in stacks:
    for factor in jax.tree.leaves(stats.factors[layer.name]):
      assert factor.shape[0] == DEPTH and np.all(np.isfinite(factor))


def test_a_layer_inside_cond_falls_back_with_the_reason():
  params = {"w": _normal(KEY, (FEATURES, WIDTH)), "out": _normal(KEY, (WIDTH, CLASSES))}
  x, y = bf.classification_data(BATCH, FEATURES, CLASSES)

  def loss_fn(params, x, y):
    h = jax.lax.cond(y[0] > 0, lambda: x @ params["w"], lambda: 2.0 * (x @ params["w"]))
    return jkfac.softmax_cross_entropy(jnp.tanh(h) @ params["out"], y)

  est = jkfac.estimator(loss_fn, params, x, y)
  kinds = {l.name: (l.kind, l.note) for l in est.layers}
  assert kinds["w"] == ("diagonal", "used by cond") and kinds["out"][0] == "dense"
  assert "w (4, 5): used by cond" in str(est)


def _factorisations(depth: int) -> int:
  """Cholesky factorisations in the compiled program of a scanned LM's refresh step."""
  tokens = jax.random.randint(jax.random.PRNGKey(3), (4, SEQUENCE), 0, VOCAB)
  model = LM(depth=depth)
  params = model.init(KEY, tokens)["params"]
  est = jkfac.estimator(_lm_loss(model), params, tokens, tokens)
  tx = jkfac.scale_by_kfac(est, damping=1e-2)

  def step(params, state, key):
    _, grads, stats = est(params, tokens, tokens, rng=key)
    return tx.update(grads, state, params, stats=stats)

  text = jax.jit(step).lower(params, tx.init(params), KEY).as_text()
  return text.count("potrf") + text.count("stablehlo.cholesky")


@_ONCE
def test_a_deeper_stack_has_no_more_factorisations():
  # One batched factorisation per stacked factor shape, however many layers.
  shallow, deep = _factorisations(2), _factorisations(12)
  assert shallow == deep > 0


_REFRESH = """
import jax, jax.numpy as jnp, jkfac
width, depth, kernels = 64, 2, 6
keys = jax.random.split(jax.random.PRNGKey(0), kernels + 1)
params = {"stack": [jax.random.normal(k, (depth, width, width)) / 8 for k in keys[1:]],
          "head": jax.random.normal(keys[0], (width, 3)) / 8}
x, y = jax.random.normal(keys[0], (32, width)), jnp.arange(32) % 3

def loss_fn(params, x, y):
  def block(h, ws):
    for w in ws:
      h = jnp.tanh(h @ w)
    return h, None
  h, _ = jax.lax.scan(block, x, params["stack"])
  return jkfac.softmax_cross_entropy(h @ params["head"], y)

est = jkfac.estimator(loss_fn, params, x, y)
tx = jkfac.scale_by_kfac(est, damping=1.0)
_, grads, stats = jax.jit(lambda p: est(p, x, y, rng=keys[0]))(params)
update = jax.jit(lambda g, s, p, st: tx.update(g, s, p, stats=st))
print(jax.block_until_ready(update(grads, tx.init(params), params, stats))[0]["head"].shape)
"""


def test_a_stack_of_wide_layers_refreshes_its_inverses_on_one_cpu_device():
  # Regression: on one CPU device (not the suite's eight), a program of a
  # dozen batched LAPACK calls (the inverses of a stack of 6 dense layers of
  # width 64, as in a scanned transformer) deadlocked XLA:CPU (jaxlib 0.10)
  # on 2 cores.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
  done = subprocess.run([sys.executable, "-c", _REFRESH], env=env, timeout=300,
                        capture_output=True, text=True)
  assert done.returncode == 0 and "(64, 3)" in done.stdout, done.stderr[-2000:]
