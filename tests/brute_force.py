"""Brute-force references for tiny networks: explicit per-example sums,
exact Fisher matrices from Jacobians, dense Kronecker products."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jkfac


def mlp_params(key, sizes, dtype=jnp.float64, scale=0.5):
  """Dense layers `{"l0": {"w", "b"}, ...}` for the given sizes."""
  params = {}
  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, kw, kb = jax.random.split(key, 3)
    params[f"l{i}"] = {
        "w": (scale * jax.random.normal(kw, (fan_in, fan_out)) / np.sqrt(fan_in)).astype(dtype),
        "b": (0.1 * jax.random.normal(kb, (fan_out,))).astype(dtype),
    }
  return params


def mlp_forward(params, x, record=None):
  """tanh MLP; `record` (a list) receives (input, pre-activation) per layer."""
  n = len(params)
  h = x
  for i in range(n):
    layer = params[f"l{i}"]
    s = h @ layer["w"] + layer["b"]
    if record is not None:
      record.append((h, s))
    h = jnp.tanh(s) if i < n - 1 else s
  return h


def classification_data(n, features, classes):
  """Float64 inputs and integer labels, from a fixed key."""
  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  return (jax.random.normal(kx, (n, features), jnp.float64),
          jax.random.randint(ky, (n,), 0, classes))


def ce_loss(params, x, y):
  """Softmax cross-entropy of the tanh MLP, registered with jkfac."""
  return jkfac.softmax_cross_entropy(mlp_forward(params, x), y)


def homogeneous(x):
  return jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)


def output_fisher(distribution: str, z):
  """The Fisher of the predictive distribution at one example's output z."""
  if distribution == "categorical":
    p = jax.nn.softmax(z)
    return jnp.diag(p) - jnp.outer(p, p)
  if distribution == "bernoulli":
    p = jax.nn.sigmoid(z)
    return jnp.diag(p * (1 - p))
  return jnp.eye(z.shape[-1], dtype=z.dtype)


def exact_g_factors(params, x, distribution):
  """Exact-expectation G of every layer, from per-example Jacobians."""
  n = len(params)
  factors = []
  for i in range(n):
    def output_from_s(s, xn, i=i):
      # Re-run the network from layer i's pre-activation s.
      h = jnp.tanh(s) if i < n - 1 else s
      for j in range(i + 1, n):
        layer = params[f"l{j}"]
        sj = h @ layer["w"] + layer["b"]
        h = jnp.tanh(sj) if j < n - 1 else sj
      return h

    record = []
    mlp_forward(params, x, record)
    s_all = record[i][1]
    total = 0.0
    for m in range(x.shape[0]):
      jac = jax.jacobian(output_from_s)(s_all[m], x[m])  # (out, s_dim)
      z = mlp_forward(params, x[m:m + 1])[0]
      total = total + jac.T @ output_fisher(distribution, z) @ jac
    factors.append(total / x.shape[0])
  return factors


def a_factors(params, x):
  record = []
  mlp_forward(params, x, record)
  return [homogeneous(h).T @ homogeneous(h) / x.shape[0] for h, _ in record]


def kron_update(a, g, v, damping):
  """`((A + πγI) ⊗ (G + γ/πI))^{-1} vec(V)` formed densely, V of shape (dim A, dim G)."""
  pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
  gamma = np.sqrt(damping)
  big = np.kron(a + pi * gamma * np.eye(a.shape[0]), g + gamma / pi * np.eye(g.shape[0]))
  return np.linalg.solve(big, v.reshape(-1)).reshape(v.shape)  # row-major vec


def kfac_dense_update(a, g, grad_w, grad_b, damping):
  """The dense layer's update from the explicit Kronecker product."""
  u = kron_update(a, g, np.concatenate([grad_w, grad_b[None]], axis=0), damping)
  return u[:-1], u[-1]


def conv_patches(x, kernel_spatial, strides, padding, lhs_dilation, rhs_dilation):
  """Patch matrix by explicit loops: x is (N, C, *spatial); rows (n, *out
  location), columns (c, *kernel offset), channel-major."""
  x = np.asarray(x)
  n, c = x.shape[:2]
  dims = len(kernel_spatial)
  dilated = np.zeros((n, c) + tuple((s - 1) * d + 1 for s, d in zip(x.shape[2:], lhs_dilation)))
  dilated[(slice(None), slice(None)) + tuple(slice(None, None, d) for d in lhs_dilation)] = x
  for axis, (lo, hi) in enumerate(padding):
    widths = [(0, 0)] * (dims + 2)
    widths[axis + 2] = (max(lo, 0), max(hi, 0))
    dilated = np.pad(dilated, widths)
    crop = [slice(None)] * (dims + 2)
    crop[axis + 2] = slice(max(-lo, 0), dilated.shape[axis + 2] - max(-hi, 0))
    dilated = dilated[tuple(crop)]
  extent = [(k - 1) * d + 1 for k, d in zip(kernel_spatial, rhs_dilation)]
  out = [(p - e) // s + 1 for p, e, s in zip(dilated.shape[2:], extent, strides)]
  rows = []
  for example in range(n):
    for location in np.ndindex(*out):
      patch = np.empty((c,) + tuple(kernel_spatial))
      for offset in np.ndindex(*kernel_spatial):
        at = tuple(o * s + k * d for o, s, k, d in zip(location, strides, offset, rhs_dilation))
        patch[(slice(None),) + offset] = dilated[(example, slice(None)) + at]
      rows.append(patch.reshape(-1))
  return np.array(rows), tuple(out)


def train_jitted(est, tx, params, args, steps):
  """Runs a jitted K-FAC training step; returns params, state, losses, traces."""
  traces = []

  @jax.jit
  def train_step(params, state, key):
    traces.append(1)
    loss, grads, stats = est(params, *args, rng=key)
    updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state, loss

  state = tx.init(params)
  losses = []
  for i in range(steps):
    params, state, loss = train_step(params, state, jax.random.PRNGKey(i))
    losses.append(float(loss))
  return params, state, losses, len(traces)
