"""KFC convolution blocks against explicit patch matrices and dense Kronecker inverses."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import brute_force as bf
import jkfac

KEY = jax.random.PRNGKey(0)
N = 4

# name: (input shape without batch, in channel-last-free form), kernel spatial, conv kwargs
CASES = {
    "2d_same": dict(x=(5, 5, 2), k=(3, 3), out=3, args=dict(padding="SAME")),
    "2d_valid_strided": dict(x=(6, 5, 2), k=(3, 2), out=3,
                             args=dict(padding="VALID", window_strides=(2, 1))),
    "2d_explicit_padding_dilated": dict(x=(6, 6, 2), k=(2, 3), out=3,
                                        args=dict(padding=((1, 2), (0, 1)),
                                                  rhs_dilation=(2, 1))),
    "2d_transposed": dict(x=(3, 3, 2), k=(3, 3), out=2,
                          args=dict(padding=((2, 2), (1, 2)), lhs_dilation=(2, 2))),
    "2d_grouped": dict(x=(4, 4, 4), k=(2, 2), out=6, args=dict(padding="SAME",
                                                                feature_group_count=2)),
    "2d_depthwise": dict(x=(4, 4, 3), k=(3, 3), out=6, args=dict(padding="SAME",
                                                                  feature_group_count=3)),
    "2d_nchw": dict(x=(2, 5, 4), k=(3, 2), out=3, layout=("NCHW", "OIHW", "NCHW"),
                    args=dict(padding="SAME")),
    "2d_no_bias": dict(x=(4, 4, 2), k=(3, 3), out=3, bias=False, args=dict(padding="VALID")),
    "1d": dict(x=(7, 2), k=(3,), out=3, layout=("NWC", "WIO", "NWC"),
               args=dict(padding="SAME", window_strides=(2,))),
    "3d": dict(x=(3, 4, 3, 2), k=(2, 2, 2), out=2, layout=("NDHWC", "DHWIO", "NDHWC"),
               args=dict(padding="VALID")),
}


def _setup(case):
  spatial = len(case["k"])
  layout = case.get("layout", ("NHWC", "HWIO", "NHWC"))
  numbers = lax.conv_dimension_numbers((1,) * (spatial + 2), (1,) * (spatial + 2), layout)
  groups = case["args"].get("feature_group_count", 1)
  x_shape = (N,) + case["x"]
  channels = x_shape[numbers.lhs_spec[1]]
  kernel_shape = [0] * (spatial + 2)
  kernel_shape[numbers.rhs_spec[0]] = case["out"]
  kernel_shape[numbers.rhs_spec[1]] = channels // groups
  for axis, size in zip(numbers.rhs_spec[2:], case["k"]):
    kernel_shape[axis] = size
  kx, kk, kb, ky = jax.random.split(KEY, 4)
  params = {"k": 0.5 * jax.random.normal(kk, tuple(kernel_shape), jnp.float64)}
  if case.get("bias", True):
    params["b"] = 0.5 * jax.random.normal(kb, (case["out"],), jnp.float64)
  x = jax.random.normal(kx, x_shape, jnp.float64)
  y = jax.random.randint(ky, (N,), 0, case["out"])
  args = dict(dict(window_strides=(1,) * spatial), **case["args"], dimension_numbers=layout)

  def conv_out(p, x):
    s = lax.conv_general_dilated(x, p["k"], **args)
    if "b" in p:
      shape = [1] * s.ndim
      shape[numbers.out_spec[1]] = -1
      s = s + p["b"].reshape(shape)
    return s

  def loss_fn(p, x, y):
    s = conv_out(p, x)
    logits = jnp.mean(s, axis=tuple(numbers.out_spec[2:]))
    return jkfac.softmax_cross_entropy(logits, y)

  return params, x, y, numbers, groups, args, conv_out, loss_fn


def _kernel_matrix(kernel, numbers):
  order = (numbers.rhs_spec[1],) + tuple(numbers.rhs_spec[2:]) + (numbers.rhs_spec[0],)
  k = np.transpose(np.asarray(kernel), order)
  return k.reshape(-1, k.shape[-1])


def _brute_force(case, params, x, y, numbers, groups, args, conv_out, loss_fn):
  """A and G per group from the explicit patch matrix and per-example gradients.

  Also returns the patch matrix and the output derivatives' rows (examples x
  locations, the output's spatial order), unscaled.
  """
  spatial = len(case["k"])
  pad = args["padding"]
  x_ncs = np.transpose(np.asarray(x), numbers.lhs_spec)
  kernel_spatial = tuple(params["k"].shape[a] for a in numbers.rhs_spec[2:])
  if isinstance(pad, str):
    pad = lax.padtype_to_pads(
        [(s - 1) * d + 1
         for s, d in zip(x_ncs.shape[2:], args.get("lhs_dilation", (1,) * spatial))],
        [(k - 1) * d + 1 for k, d in zip(kernel_spatial, args.get("rhs_dilation", (1,) * spatial))],
        args.get("window_strides", (1,) * spatial), pad)
  patches, out = bf.conv_patches(
      x_ncs, kernel_spatial, args.get("window_strides", (1,) * spatial), pad,
      args.get("lhs_dilation", (1,) * spatial), args.get("rhs_dilation", (1,) * spatial))
  s = conv_out(params, x)
  s_rows = np.moveaxis(np.asarray(s), numbers.out_spec[1], -1).reshape(-1, case["out"])
  w = _kernel_matrix(params["k"], numbers)
  per_group_in, per_group_out = w.shape[0], case["out"] // groups
  # the patch matrix reproduces the convolution: the brute force is self-consistent
  for j in range(groups):
    cols = slice(j * per_group_in, (j + 1) * per_group_in)
    outs = slice(j * per_group_out, (j + 1) * per_group_out)
    expected = patches[:, cols] @ w[:, outs] + (np.asarray(params["b"])[outs] if "b" in params
                                                  else 0.0)
    np.testing.assert_allclose(expected, s_rows[:, outs], rtol=1e-10, atol=1e-12)
  # per-example output derivatives g = d loss_n / d s (empirical targets)
  logits_of = lambda s: jnp.mean(s, axis=tuple(numbers.out_spec[2:]))
  g = N * jax.grad(lambda s: jkfac.softmax_cross_entropy(logits_of(s), y))(s)
  g_rows = np.moveaxis(np.asarray(g), numbers.out_spec[1], -1).reshape(-1, case["out"])
  factors = []
  for j in range(groups):
    p = patches[:, j * per_group_in:(j + 1) * per_group_in]
    if "b" in params:
      p = np.concatenate([p, np.ones((p.shape[0], 1))], axis=1)
    gj = g_rows[:, j * per_group_out:(j + 1) * per_group_out]
    factors.append((p.T @ p / p.shape[0], gj.T @ gj / N))
  return factors, w, per_group_in, per_group_out, patches, g_rows


@pytest.mark.parametrize("name", sorted(CASES))
def test_statistics_and_update_equal_the_patch_matrix_computation(name):
  case = CASES[name]
  setup = _setup(case)
  params, x, y, numbers, groups, args, conv_out, loss_fn = setup
  factors, w, per_in, per_out, *_ = _brute_force(case, *setup)
  est = jkfac.estimator(loss_fn, params, x, y, mode="empirical")
  assert [l.kind for l in est.layers] == ["conv"], est.table()
  _, grads, stats = est(params, x, y)
  found = stats.factors[est.layers[0].name]
  for j, (a, g) in enumerate(factors):
    np.testing.assert_allclose(found["A"][j], a, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(found["G"][j], g, rtol=1e-10, atol=1e-12)
  damping = 0.1
  tx = jkfac.scale_by_kfac(est, damping=damping)
  updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
  w_grad, w_update = _kernel_matrix(grads["k"], numbers), _kernel_matrix(updates["k"], numbers)
  for j, (a, g) in enumerate(factors):
    outs = slice(j * per_out, (j + 1) * per_out)
    v = w_grad[:, outs]
    if "b" in params:
      v = np.concatenate([v, np.asarray(grads["b"])[None, outs]], axis=0)
    u = bf.kron_update(a, g, v, damping)
    np.testing.assert_allclose(w_update[:, outs], u[:per_in], rtol=1e-8, atol=1e-12)
    if "b" in params:
      np.testing.assert_allclose(updates["b"][outs], u[-1], rtol=1e-8, atol=1e-12)


def test_chunked_patches_equal_the_whole_patch_matrix(monkeypatch):
  case = CASES["2d_grouped"]
  params, x, y, *_, loss_fn = _setup(case)
  est = jkfac.estimator(loss_fn, params, x, y, mode="empirical")
  whole = est(params, x, y)[2].factors
  monkeypatch.setattr(jkfac.blocks.conv, "PATCH_BYTES", 1000)  # one or two examples a chunk
  chunked = jkfac.estimator(loss_fn, params, x, y, mode="empirical")(params, x, y)[2].factors
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), whole,
                         chunked)


def test_register_conv_tags_a_convolution_the_same_as_detection():
  case = CASES["2d_valid_strided"]
  params, x, y, numbers, groups, args, conv_out, loss_fn = _setup(case)

  def tagged_loss(p, x, y):
    s = lax.conv_general_dilated(x, p["k"], **args)
    s = jkfac.register_conv(s + p["b"], x, p["k"], p["b"], **args)
    return jkfac.softmax_cross_entropy(jnp.mean(s, axis=(1, 2)), y)

  found = jkfac.estimator(loss_fn, params, x, y, mode="empirical")
  tagged = jkfac.estimator(tagged_loss, params, x, y, mode="empirical")
  assert [(l.kind, l.note) for l in tagged.layers] == [("conv", "tagged")]
  assert tagged.layers[0].options == found.layers[0].options
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12),
                         found(params, x, y)[2].factors, tagged(params, x, y)[2].factors)


def test_register_conv_checks_shapes():
  x = jnp.zeros((2, 5, 5, 3))
  w = jnp.zeros((3, 3, 3, 4))
  y = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  with pytest.raises(ValueError, match="shapes do not match"):
    jkfac.register_conv(y, x, w, jnp.zeros(3), window_strides=(1, 1), padding="SAME",
                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_invariance_to_affine_transformations_of_input_channels():
  """KFC: with VALID padding, same function after one step, damping -> 0."""
  kx, k1, k2, kb, kt = jax.random.split(KEY, 5)
  numbers = ("NHWC", "HWIO", "NHWC")
  conv = lambda x, w, b: lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                                  dimension_numbers=numbers) + b

  def net(p, x):
    h = jnp.tanh(conv(x, p["c1"]["k"], p["c1"]["b"]))
    return jnp.mean(conv(h, p["c2"]["k"], p["c2"]["b"]), axis=(1, 2))

  params = {"c1": {"k": 0.5 * jax.random.normal(k1, (2, 2, 2, 3), jnp.float64),
                   "b": 0.1 * jax.random.normal(kb, (3,), jnp.float64)},
            "c2": {"k": 0.5 * jax.random.normal(k2, (2, 2, 3, 2), jnp.float64),
                   "b": jnp.zeros((2,), jnp.float64)}}
  x = jax.random.normal(kx, (8, 5, 5, 2), jnp.float64)
  t = jax.random.normal(kt, (8, 2), jnp.float64)
  m = jnp.array([[2.0, 0.5], [-0.3, 1.0]], jnp.float64)
  c = jnp.array([1.0, -2.0], jnp.float64)
  transform = lambda x: x @ m + c  # per location, over channels
  m_inv = jnp.linalg.inv(m)
  k2_first = jnp.einsum("ij,hwjo->hwio", m_inv, params["c1"]["k"])
  params2 = {"c1": {"k": k2_first,
                    "b": params["c1"]["b"] - jnp.einsum("j,hwjo->o", c, k2_first)},
             "c2": params["c2"]}
  np.testing.assert_allclose(net(params, x), net(params2, transform(x)), rtol=1e-10)
  mse = lambda p, inputs, t: jkfac.squared_error(net(p, inputs), t)

  def step(p, inputs):
    est = jkfac.estimator(mse, p, inputs, t, mode="exact")
    assert [l.kind for l in est.layers] == ["conv", "conv"]
    tx = optax.chain(jkfac.scale_by_kfac(est, damping=1e-20), optax.scale(-0.5))
    _, grads, stats = est(p, inputs, t)
    updates, _ = tx.update(grads, tx.init(p), p, stats=stats)
    return optax.apply_updates(p, updates)

  new, new2 = step(params, x), step(params2, transform(x))
  x_test = jax.random.normal(jax.random.PRNGKey(7), (3, 5, 5, 2), jnp.float64)
  np.testing.assert_allclose(net(new, x_test), net(new2, transform(x_test)), rtol=1e-5,
                             atol=1e-7)
  sgd = lambda p, inputs: jax.tree_util.tree_map(lambda v, g: v - 0.5 * g, p,
                                                 jax.grad(mse)(p, inputs, t))
  assert not np.allclose(net(sgd(params, x), x_test),
                         net(sgd(params2, transform(x)), transform(x_test)), rtol=1e-2)


def test_flax_convolutions_are_found_unmodified():
  import flax.linen as nn
  from flax import nnx

  class Linen(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2))(x))
      x = nn.relu(nn.ConvTranspose(3, (3, 3), strides=(2, 2))(x))
      x = nn.relu(nn.Conv(6, (3, 3), feature_group_count=3)(x))
      return nn.Dense(3)(x.mean(axis=(1, 2)))

  x = jax.random.normal(KEY, (N, 8, 8, 2))
  y = jax.random.randint(KEY, (N,), 0, 3)
  model = Linen()
  params = model.init(KEY, x)["params"]
  loss_fn = lambda p, x, y: jkfac.softmax_cross_entropy(model.apply({"params": p}, x), y)
  est = jkfac.estimator(loss_fn, params, x, y)
  assert [(l.name, l.kind) for l in est.layers] == [
      ("Conv_0", "conv"), ("ConvTranspose_0", "conv"), ("Conv_1", "conv"), ("Dense_0", "dense")]
  assert est.layers[2].option("conv").groups == 3
  assert "A 10x10, G 2x2 per group, 3 groups" in str(est)
  tx = jkfac.kfac(est, learning_rate=0.2, momentum=0.5, damping=1e-2)
  _, _, losses, traces = bf.train_jitted(est, tx, params, (x, y), steps=10)
  assert losses[-1] < losses[0] and traces == 1

  class Nnx(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
      self.out = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
      return self.out(nnx.relu(self.conv(x)).mean(axis=(1, 2)))

  graph, state = nnx.split(Nnx(nnx.Rngs(0)))
  nnx_loss = lambda s, x, y: jkfac.softmax_cross_entropy(nnx.merge(graph, s)(x), y)
  est = jkfac.estimator(nnx_loss, state, x, y)
  assert [l.kind for l in est.layers] == ["conv", "dense"]
