"""Scale-and-shift blocks (normalisation layers) against per-example Jacobians."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jkfac
from test_scan import _ONCE  # in the newest-JAX suite only (CI time)

KEY = jax.random.PRNGKey(0)
N, CLASSES = 6, 3

NORMS = {
    "layer_norm": lambda: nn.LayerNorm(),
    "rms_norm": lambda: nn.RMSNorm(),
    "group_norm": lambda: nn.GroupNorm(num_groups=2),
    "batch_norm": lambda: nn.BatchNorm(use_running_average=False),
}


class Net(nn.Module):
  norm: str

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(4, (3, 3))(x)
    h = NORMS[self.norm]()(h)
    h = jnp.tanh(h)
    return nn.Dense(CLASSES)(h.mean(axis=(1, 2)))


def _setup(norm):
  model = Net(norm)
  x = jax.random.normal(KEY, (N, 5, 5, 2), jnp.float64)
  y = jax.random.randint(jax.random.PRNGKey(1), (N,), 0, CLASSES)
  variables = model.init(KEY, x)
  params = jax.tree_util.tree_map(  # float64; scale away from 1, shift from 0
      lambda v: v.astype(jnp.float64) + 0.1 * jnp.sin(jnp.arange(v.size).reshape(v.shape)),
      variables["params"])
  extra = {k: v for k, v in variables.items() if k != "params"}

  def logits(p, x):
    if extra:
      return model.apply({"params": p, **extra}, x, mutable=list(extra))[0]
    return model.apply({"params": p}, x)

  loss_fn = lambda p, x, y: jkfac.softmax_cross_entropy(logits(p, x), y)
  per_example = lambda p: -jnp.take_along_axis(jax.nn.log_softmax(logits(p, x)), y[:, None],
                                               axis=1)[:, 0]
  return params, x, y, loss_fn, per_example


@_ONCE
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_flax_normalisation_layers_are_found_with_exact_per_example_statistics(norm):
  params, x, y, loss_fn, per_example = _setup(norm)
  est = jkfac.estimator(loss_fn, params, x, y, mode="empirical")
  kinds = {layer.name: layer.kind for layer in est.layers}
  norm_name = [n for n in params if n not in ("Conv_0", "Dense_0")][0]
  assert kinds == {"Conv_0": "conv", norm_name: "scale_and_shift", "Dense_0": "dense"}, est
  damping = 0.01
  tx = jkfac.scale_by_kfac(est, damping=damping)

  @jax.jit  # one program: eagerly, every operation of the model compiles on its own
  def compute(params):
    _, grads, stats = est(params, x, y)
    updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
    return stats, updates, jax.jacobian(per_example)(params)[norm_name]

  stats, updates, jacobian = compute(params)
  rows = np.concatenate([np.asarray(jacobian[k]).reshape(N, -1)
                         for k in ("scale", "bias") if k in jacobian], axis=1)
  np.testing.assert_allclose(stats.factors[norm_name]["diag"], np.mean(rows ** 2, axis=0),
                             rtol=1e-9, atol=1e-14)
  expected = np.mean(rows, axis=0) / (np.mean(rows ** 2, axis=0) + damping)
  got = np.concatenate([np.asarray(updates[norm_name][k]).reshape(-1)
                        for k in ("scale", "bias") if k in jacobian])
  np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_tagged_scale_and_shift_full_block_equals_the_dense_fisher():
  kx, ks = jax.random.split(KEY)
  x = jax.random.normal(kx, (N, 4, 3), jnp.float64)
  y = jax.random.randint(ks, (N,), 0, CLASSES)
  params = {"norm": {"scale": jnp.array([1.5, -0.5, 2.0]), "shift": jnp.array([0.1, 0.2, -0.3])},
            "out": {"w": jax.random.normal(ks, (3, CLASSES), jnp.float64)}}

  def logits(p, x):
    h = x * p["norm"]["scale"] + p["norm"]["shift"]
    h = jkfac.register_scale_and_shift(h, x, p["norm"]["scale"], p["norm"]["shift"])
    return jnp.tanh(h).mean(axis=1) @ p["out"]["w"]

  loss_fn = lambda p, x, y: jkfac.softmax_cross_entropy(logits(p, x), y)
  est = jkfac.estimator(loss_fn, params, x, y, mode="empirical",
                        overrides={"norm": "full"})
  assert [(l.name, l.kind, l.note) for l in est.layers][0] == ("norm", "scale_and_shift",
                                                                 "override 'full'")
  assert "full 6x6" in str(est)
  per_example = lambda p: -jnp.take_along_axis(jax.nn.log_softmax(logits(p, x)), y[:, None],
                                               axis=1)[:, 0]
  jac = jax.jacobian(per_example)(params)["norm"]
  rows = np.concatenate([jac["scale"], jac["shift"]], axis=1)
  _, grads, stats = est(params, x, y)
  np.testing.assert_allclose(stats.factors["norm"]["full"], rows.T @ rows / N, rtol=1e-9)
  tx = jkfac.scale_by_kfac(est, damping=0.01)
  updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
  expected = np.linalg.solve(rows.T @ rows / N + 0.01 * np.eye(6), rows.mean(axis=0))
  np.testing.assert_allclose(np.concatenate([updates["norm"]["scale"], updates["norm"]["shift"]]),
                             expected, rtol=1e-9)


def test_register_scale_and_shift_checks_shapes():
  x = jnp.ones((2, 4, 3))
  with pytest.raises(ValueError, match="shapes do not match"):
    jkfac.register_scale_and_shift(x, x, jnp.ones(4))


class ResNetBlock(nn.Module):
  """A residual block with BatchNorm, as in ResNets."""

  @nn.compact
  def __call__(self, x):
    y = nn.relu(nn.BatchNorm(use_running_average=False)(nn.Conv(4, (3, 3), use_bias=False)(x)))
    y = nn.BatchNorm(use_running_average=False)(nn.Conv(4, (3, 3), use_bias=False)(y))
    shortcut = nn.Conv(4, (1, 1), use_bias=False)(x)
    return nn.Dense(CLASSES)(nn.relu(shortcut + y).mean(axis=(1, 2)))


def test_resnet_style_model_has_no_parameter_left_to_a_fallback():
  model = ResNetBlock()
  x = jax.random.normal(KEY, (N, 6, 6, 2))
  y = jax.random.randint(KEY, (N,), 0, CLASSES)
  variables = model.init(KEY, x)

  def loss_fn(p, x, y):
    logits, _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x,
                            mutable=["batch_stats"])
    return jkfac.softmax_cross_entropy(logits, y)

  est = jkfac.estimator(loss_fn, variables["params"], x, y)
  assert {l.name: l.kind for l in est.layers} == {
      "Conv_0": "conv", "BatchNorm_0": "scale_and_shift", "Conv_1": "conv",
      "BatchNorm_1": "scale_and_shift", "Conv_2": "conv", "Dense_0": "dense"}, est
  assert "no parameter is left to a fallback block" in str(est)


def test_nnx_normalisation_layers_are_found():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(3, 4, rngs=rngs)
      self.layer_norm = nnx.LayerNorm(4, rngs=rngs)
      self.rms_norm = nnx.RMSNorm(4, rngs=rngs)
      self.out = nnx.Linear(4, CLASSES, rngs=rngs)

    def __call__(self, x):
      return self.out(jnp.tanh(self.rms_norm(self.layer_norm(self.linear(x)))))

  graph, state = nnx.split(Net(nnx.Rngs(0)))
  x = jax.random.normal(KEY, (N, 3))
  y = jax.random.randint(KEY, (N,), 0, CLASSES)
  loss_fn = lambda s, x, y: jkfac.softmax_cross_entropy(nnx.merge(graph, s)(x), y)
  est = jkfac.estimator(loss_fn, state, x, y)
  assert {l.name: l.kind for l in est.layers} == {
      "linear": "dense", "layer_norm": "scale_and_shift", "rms_norm": "scale_and_shift",
      "out": "dense"}, est


def test_a_scale_followed_by_a_reshape_is_found():
  x = jax.random.normal(KEY, (N, 4, 3), jnp.float64)
  y = jax.random.randint(KEY, (N,), 0, CLASSES)
  params = {"s": jnp.linspace(0.5, 1.5, 3), "w": jnp.ones((12, CLASSES)) / 12}
  loss_fn = lambda p, x, y: jkfac.softmax_cross_entropy((x * p["s"]).reshape(N, -1) @ p["w"], y)
  est = jkfac.estimator(loss_fn, params, x, y)
  assert {l.name: l.kind for l in est.layers} == {"s": "scale_and_shift", "w": "dense"}
