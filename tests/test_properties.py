"""Property-based tests: random layer shapes, batch sizes, dtypes and losses.

Hypothesis draws small networks (dense MLPs of 1-3 layers, 1-D and 2-D
convolutions), batches, losses, estimation modes and parameter dtypes. For
each, one jitted training step (`est` then one `scale_by_kfac` update) is
compared with a brute-force computation done in NumPy, float64, from the
very same (dtype-rounded) parameters and data:

- `A = mean ā ā^T` (patches for convolutions, `bf.conv_patches`), and
  `G = mean_n J_n^T M_n J_n`, with `J_n` the explicit per-example Jacobian of
  the network output with respect to the layer's pre-activation and `M_n`
  the predictive distribution's Fisher (mode "exact") or `r_n r_n^T`, `r_n`
  the gradient of the negative log-likelihood of the data's target (mode
  "empirical"); for a convolution, summed over output locations;
- the gradient, from the same per-example output derivatives;
- the update, `(A + π√λ I)^{-1} ⊗ (G + √λ/π I)^{-1}` formed with `np.kron`
  and applied to the row-major vector of `[∇W; ∇b]` (of shape `(in[+1], out)`).

Tolerances follow the dtype: tight in float64 (1e-12 for the statistics,
1e-10 for the update), a few tens to a thousand epsilons in float32; with
bfloat16 and float16 parameters the factors must come out float32 and
finite, the updates finite and of the parameters' dtype, and all of them
within a few of the dtype's epsilons of the computation on the same values
(the update by its backward error: see `_backward_error`).

Everything that runs per example is compiled once (one `jit` per drawn
shape): the brute force is NumPy and the data come from NumPy generators, so
that no eager JAX operation compiles a kernel per shape. Examples are
derandomized, so the suite is reproducible.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import brute_force as bf
import jkfac

LOSSES = ("softmax_cross_entropy", "sigmoid_cross_entropy", "squared_error")
MODES = ("exact", "empirical")
DAMPINGS = (1e-2, 0.1, 1.0)

# name -> (JAX function, NumPy function returning (value, derivative))
ACTIVATIONS: dict[str, tuple[Callable[[Any], Any], Callable[[np.ndarray], tuple]]] = {
    "tanh": (jnp.tanh, lambda s: (np.tanh(s), 1.0 - np.tanh(s) ** 2)),
    "relu": (jax.nn.relu, lambda s: (np.maximum(s, 0.0), (s > 0).astype(s.dtype))),
    "sigmoid": (jax.nn.sigmoid, lambda s: (_sigmoid(s), _sigmoid(s) * _sigmoid(-s))),
    "softplus": (jax.nn.softplus, lambda s: (np.logaddexp(0.0, s), _sigmoid(s))),
    "identity": (lambda s: s, lambda s: (s, np.ones_like(s))),
}

# Relative tolerances (entry-wise, and times the largest entry of the
# reference): statistics, update. In float32, about 40 and 1,700 epsilons: the
# update carries the damped factors' condition number (up to ~1e3 at λ = 1e-2).
# Over 110 random examples per property the largest errors seen were under a
# tenth of these (under 1e-3 of them in float64).
TOLERANCES = {"float64": (1e-12, 1e-10), "float32": (5e-6, 2e-4)}
# Half-precision parameters, in units of the dtype's machine epsilon: the
# norm-wise relative error of the factors and gradients, and the backward
# error of the update (`_backward_error`). Over 80 random examples the largest
# seen were 1.3, 3.2 and 1.5 epsilons.
HALF_TOLERANCE = {"statistics": 10.0, "gradient": 16.0, "update": 8.0}

SMOOTH = ("identity", "sigmoid", "softplus", "tanh")

# Derandomized (the same examples every run), and no shrinking: every example
# compiles a step (about a second), so shrinking a failure would take minutes;
# the failing example is printed as drawn (add `hypothesis.Phase.shrink` to
# `phases` locally to minimise it).
SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                phases=(hypothesis.Phase.explicit, hypothesis.Phase.generate))


def _sigmoid(s: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.tanh(0.5 * s))


# --- configurations -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MLPCase:
  """A dense network: `widths[0]` inputs, one layer per following width."""
  widths: tuple[int, ...]
  activations: tuple[str, ...]  # between layers: len(widths) - 2
  biases: tuple[bool, ...]      # per layer
  batch: int
  loss: str
  mode: str
  damping: float
  seed: int


@dataclasses.dataclass(frozen=True)
class ConvCase:
  """One convolution `s = conv(x, k) + b`, then `z = mean over locations of φ(s)`."""
  spatial: tuple[int, ...]   # input spatial sizes (1 or 2 dimensions)
  kernel: tuple[int, ...]
  strides: tuple[int, ...]
  padding: str
  in_channels: int
  out_channels: int
  bias: bool
  activation: str
  batch: int
  loss: str
  mode: str
  damping: float
  seed: int


@st.composite
def mlp_cases(draw, activations: tuple[str, ...] = tuple(sorted(ACTIVATIONS))) -> MLPCase:
  """Dense MLPs of depth 1-3, widths 1-12, batches 1-16, activations among
  `activations`, random biases, losses, modes and damping."""
  depth = draw(st.integers(1, 3))
  widths = tuple(draw(st.lists(st.integers(1, 12), min_size=depth + 1, max_size=depth + 1)))
  return MLPCase(
      widths=widths,
      activations=tuple(draw(st.lists(st.sampled_from(activations),
                                      min_size=depth - 1, max_size=depth - 1))),
      biases=tuple(draw(st.lists(st.booleans(), min_size=depth, max_size=depth))),
      batch=draw(st.integers(1, 16)),
      loss=draw(st.sampled_from(LOSSES)),
      mode=draw(st.sampled_from(MODES)),
      damping=draw(st.sampled_from(DAMPINGS)),
      seed=draw(st.integers(0, 2 ** 16)))


@st.composite
def conv_cases(draw) -> ConvCase:
  """1-D and 2-D convolutions: kernels 1-3, strides 1-2, SAME or VALID padding."""
  dims = draw(st.integers(1, 2))
  kernel = tuple(draw(st.lists(st.integers(1, 3), min_size=dims, max_size=dims)))
  padding = draw(st.sampled_from(("SAME", "VALID")))
  low = 1 if padding == "SAME" else 0
  # VALID needs at least the kernel's extent; spatial sizes up to 6.
  spatial = tuple(k * (padding == "VALID") + draw(st.integers(low, 6 - k * (padding == "VALID")))
                  for k in kernel)
  return ConvCase(
      spatial=spatial,
      kernel=kernel,
      strides=tuple(draw(st.lists(st.integers(1, 2), min_size=dims, max_size=dims))),
      padding=padding,
      in_channels=draw(st.integers(1, 3)),
      out_channels=draw(st.integers(1, 4)),
      bias=draw(st.booleans()),
      activation=draw(st.sampled_from(sorted(ACTIVATIONS))),
      batch=draw(st.integers(1, 4)),
      loss=draw(st.sampled_from(LOSSES)),
      mode=draw(st.sampled_from(MODES)),
      damping=draw(st.sampled_from(DAMPINGS)),
      seed=draw(st.integers(0, 2 ** 16)))


# --- data and the network under test --------------------------------------


def _targets(rng: np.random.Generator, loss: str, batch: int, out: int) -> np.ndarray:
  if loss == "softmax_cross_entropy":
    return rng.integers(0, out, size=batch).astype(np.int32)
  if loss == "sigmoid_cross_entropy":
    return rng.uniform(0.0, 1.0, size=(batch, out)).astype(np.float32)
  return rng.normal(size=(batch, out)).astype(np.float32)


def _jkfac_loss(name: str) -> Callable[..., Any]:
  return getattr(jkfac, name)


def _mlp_params(case: MLPCase, rng: np.random.Generator) -> dict[str, dict[str, np.ndarray]]:
  """float64 parameters; cast them to the dtype under test."""
  params = {}
  for i, (fan_in, fan_out) in enumerate(zip(case.widths[:-1], case.widths[1:])):
    layer = {"w": rng.normal(size=(fan_in, fan_out)) * 1.2 / math.sqrt(fan_in)}
    if case.biases[i]:
      layer["b"] = 0.5 * rng.normal(size=(fan_out,))
    params[f"l{i}"] = layer
  return params


def _mlp_forward(case: MLPCase, params: Any, x: Any) -> Any:
  h = x
  for i in range(len(case.widths) - 1):
    layer = params[f"l{i}"]
    h = h @ layer["w"] + layer["b"] if "b" in layer else h @ layer["w"]
    if i < len(case.widths) - 2:
      h = ACTIVATIONS[case.activations[i]][0](h)
  return h


def _mlp_setup(case: MLPCase, dtype: Any):
  """Parameters and batch in `dtype` (targets float32 or int32), and the loss."""
  rng = np.random.default_rng(case.seed)
  params = jax.tree_util.tree_map(lambda v: jnp.asarray(v, dtype), _mlp_params(case, rng))
  x = jnp.asarray(rng.normal(size=(case.batch, case.widths[0])), dtype)
  t = jnp.asarray(_targets(rng, case.loss, case.batch, case.widths[-1]))
  loss = _jkfac_loss(case.loss)
  return params, (x, t), lambda p, x, t: loss(_mlp_forward(case, p, x), t)


def _conv_args(case: ConvCase) -> dict[str, Any]:
  layout = ("NWC", "WIO", "NWC") if len(case.kernel) == 1 else ("NHWC", "HWIO", "NHWC")
  return dict(window_strides=case.strides, padding=case.padding, dimension_numbers=layout)


def _conv_forward(case: ConvCase, params: Any, x: Any) -> Any:
  s = lax.conv_general_dilated(x, params["k"], **_conv_args(case))
  if "b" in params:
    s = s + params["b"]
  h = ACTIVATIONS[case.activation][0](s)
  return jnp.mean(h, axis=tuple(range(1, 1 + len(case.kernel))))


def _conv_setup(case: ConvCase, dtype: Any):
  rng = np.random.default_rng(case.seed)
  fan_in = case.in_channels * math.prod(case.kernel)
  params = {"k": rng.normal(size=case.kernel + (case.in_channels, case.out_channels))
                 * 1.2 / math.sqrt(fan_in)}
  if case.bias:
    params["b"] = 0.5 * rng.normal(size=(case.out_channels,))
  params = jax.tree_util.tree_map(lambda v: jnp.asarray(v, dtype), params)
  x = jnp.asarray(rng.normal(size=(case.batch,) + case.spatial + (case.in_channels,)), dtype)
  t = jnp.asarray(_targets(rng, case.loss, case.batch, case.out_channels))
  loss = _jkfac_loss(case.loss)
  return params, (x, t), lambda p, x, t: loss(_conv_forward(case, p, x), t)


def _one_step(loss_fn: Callable[..., Any], params: Any, args: tuple, mode: str,
              damping: float, kind: str,
              extra: Callable[..., Any] = lambda params, *args: None):
  """One compiled step: the estimator, then the first `scale_by_kfac` update.

  Args:
    loss_fn: the jkfac loss, `loss_fn(params, *args)`.
    params: the parameters.
    args: the batch.
    mode: the estimation mode.
    damping: λ.
    kind: the block kind every layer found must have.
    extra: `extra(params, *args)`, computed in the same compiled function.

  Returns:
    `(est, loss, plain loss, grads, factors, updates, extra)`.
  """
  est = jkfac.estimator(loss_fn, params, *args, mode=mode)
  assert [layer.kind for layer in est.layers] == [kind] * len(est.layers), est.table()
  tx = jkfac.scale_by_kfac(est, damping=damping)

  @jax.jit
  def step(params, args):
    loss, grads, stats = est(params, *args)
    updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
    return loss, loss_fn(params, *args), grads, stats.factors, updates, extra(params, *args)

  return (est,) + step(params, args)


# --- the brute force ------------------------------------------------------


def _np64(x: Any) -> np.ndarray:
  """`x` as a float64 NumPy array (on the host: no kernel compiled)."""
  return np.asarray(x).astype(np.float64)


def _as64(tree: Any) -> Any:
  return jax.tree_util.tree_map(_np64, tree)


def _output_terms(loss: str, mode: str, z: np.ndarray, t: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Per example, `r = d NLL / dz` of the data's target and the curvature `M`.

  Args:
    loss: the jkfac loss name.
    mode: "exact" (`M` the predictive distribution's Fisher) or "empirical"
      (`M = r r^T`).
    z: the network outputs, `(batch, out)`, float64.
    t: the targets.

  Returns:
    `r` of shape `(batch, out)` and `M` of shape `(batch, out, out)`.
  """
  if loss == "softmax_cross_entropy":
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    r = p - np.eye(z.shape[1])[t]
    fisher = np.stack([np.diag(q) - np.outer(q, q) for q in p])
  elif loss == "sigmoid_cross_entropy":
    r = _sigmoid(z) - t
    fisher = np.stack([np.diag(q) for q in _sigmoid(z) * _sigmoid(-z)])
  else:
    r = z - t
    fisher = np.broadcast_to(np.eye(z.shape[1]), (z.shape[0],) + (z.shape[1],) * 2)
  if mode == "empirical":
    return r, r[:, :, None] * r[:, None, :]
  return r, fisher


def _homogeneous(x: np.ndarray, bias: bool) -> np.ndarray:
  """`ā`: rows of `x` with a trailing 1 when there is a bias (`bf.homogeneous`, in NumPy)."""
  return np.concatenate([x, np.ones((x.shape[0], 1))], axis=1) if bias else x


def _mlp_brute_force(case: MLPCase, params: Any, x: Any, t: Any) -> list[dict[str, np.ndarray]]:
  """Per layer: `A`, `G` and the gradient matrix `[∇W; ∇b]`, float64."""
  params, x, t = _as64(params), _np64(x), np.asarray(t)
  layers = len(case.widths) - 1
  inputs, derivatives = [], []
  h = x
  for i in range(layers):
    layer = params[f"l{i}"]
    inputs.append(h)
    s = h @ layer["w"] + layer.get("b", 0.0)
    if i < layers - 1:
      h, d = ACTIVATIONS[case.activations[i]][1](s)
      derivatives.append(d)
    else:
      z = s
  r, curvature = _output_terms(case.loss, case.mode, z, t)
  n, out = z.shape
  # jacobians[i][n] = d z_n / d s_{i,n}, shape (out, width of layer i), by the chain rule.
  jacobians = [None] * layers
  jacobians[-1] = np.broadcast_to(np.eye(out), (n, out, out))
  for i in range(layers - 2, -1, -1):
    jacobians[i] = (jacobians[i + 1] @ params[f"l{i + 1}"]["w"].T) * derivatives[i][:, None, :]
  result = []
  for i in range(layers):
    a_bar = _homogeneous(inputs[i], case.biases[i])
    jac = jacobians[i]
    per_example_g = np.einsum("noi,no->ni", jac, r)  # d NLL_n / d s_{i,n}
    result.append({
        "A": a_bar.T @ a_bar / n,
        "G": np.einsum("noi,nop,npj->ij", jac, curvature, jac) / n,
        "grad": a_bar.T @ per_example_g / n,
    })
  return result


def _conv_brute_force(case: ConvCase, params: Any, x: Any, t: Any,
                      s_jax: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
  """`A`, `G`, `[∇W; ∇b]` of the convolution from the explicit patch matrix."""
  params, x, t = _as64(params), _np64(x), np.asarray(t)
  dims = len(case.kernel)
  pads = lax.padtype_to_pads(case.spatial, case.kernel, case.strides, case.padding)
  patches, out_spatial = bf.conv_patches(np.moveaxis(x, -1, 1), case.kernel, case.strides,
                                         pads, (1,) * dims, (1,) * dims)
  # The kernel as a matrix with rows (input channel, kernel offset), as the patches.
  w = np.moveaxis(params["k"], -2, 0).reshape(-1, case.out_channels)
  s = patches @ w + params.get("b", 0.0)  # rows (example, location)
  if s_jax is not None:  # the patch matrix reproduces the convolution
    np.testing.assert_allclose(s, s_jax.reshape(s.shape), rtol=1e-10, atol=1e-12)
  locations = math.prod(out_spatial)
  h, d = ACTIVATIONS[case.activation][1](s)
  n = case.batch
  z = h.reshape(n, locations, -1).mean(axis=1)
  r, curvature = _output_terms(case.loss, case.mode, z, t)
  # d z_n / d s_{n,l} = diag(φ'(s_{n,l})) / locations.
  jac = d.reshape(n, locations, -1) / locations
  g = np.einsum("nlo,nop,nlp->op", jac, curvature, jac) / n
  per_row_g = (jac * r[:, None, :]).reshape(-1, case.out_channels)
  p_bar = _homogeneous(patches, case.bias)
  return {"A": p_bar.T @ p_bar / p_bar.shape[0], "G": g, "grad": p_bar.T @ per_row_g / n}


def _damped_kron(a: np.ndarray, g: np.ndarray, damping: float, eps: float) -> np.ndarray:
  """`(A + π√λ I) ⊗ (G + √λ/π I)`, formed densely with `np.kron`.

  As in `bf.kron_update`, with the two rules of `jkfac.linalg` for degenerate
  factors: π is 1 when the trace ratio is not positive and finite (a zero
  `G`, e.g. one class or dead units), and each shift is at least
  `8 eps tr(factor)`, `eps` that of the factor dtype.
  """
  ratio = (np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]) if np.trace(g) > 0 else 0.0
  pi = math.sqrt(ratio) if np.isfinite(ratio) and ratio > 0 else 1.0
  gamma = math.sqrt(damping)
  shift_a = max(pi * gamma, 8 * eps * np.trace(a))
  shift_g = max(gamma / pi, 8 * eps * np.trace(g))
  return np.kron(a + shift_a * np.eye(a.shape[0]), g + shift_g * np.eye(g.shape[0]))


def _kron_update(a: np.ndarray, g: np.ndarray, v: np.ndarray, damping: float,
                 eps: float) -> np.ndarray:
  """`_damped_kron(...)^{-1} vec(V)`, V of shape `(dim A, dim G)`, row-major vec.

  With row-major `vec`, `(A ⊗ G) vec(V) = vec(A V G^T)`: this is the update
  `(A + π√λ I)^{-1} V (G + √λ/π I)^{-1}` of the paper's section 4.2.
  """
  return np.linalg.solve(_damped_kron(a, g, damping, eps), v.reshape(-1)).reshape(v.shape)


def _backward_error(a: np.ndarray, g: np.ndarray, v: np.ndarray, u: Any, damping: float,
                    eps: float) -> float:
  """The relative backward error of `u` as the damped K-FAC solve `K u = vec(V)`.

  `|K u - v| / (|K| |u| + |v|)` (2-norms), `K = _damped_kron(...)`: how far
  `u` is from being the exact update of a slightly perturbed gradient and
  curvature. Unlike the forward error, it does not grow with the condition
  number of `K`, which multiplies the rounding of a half-precision gradient
  by up to about `tr A tr G / λ`.
  """
  big = _damped_kron(a, g, damping, eps)
  u = _np64(u).reshape(-1)
  residual = np.linalg.norm(big @ u - v.reshape(-1))
  scale = np.linalg.norm(big, 2) * np.linalg.norm(u) + np.linalg.norm(v)
  return residual / scale if scale > 0 else residual


def _dense_matrix(layer: dict[str, Any]) -> np.ndarray:
  """`[W; b]` of a dense layer's parameters (or gradients, or updates), float64."""
  layer = _as64(layer)
  return np.concatenate([layer["w"], layer["b"][None]], 0) if "b" in layer else layer["w"]


def _conv_matrix(tree: dict[str, Any], channels_out: int) -> np.ndarray:
  tree = _as64(tree)
  w = np.moveaxis(tree["k"], -2, 0).reshape(-1, channels_out)
  return np.concatenate([w, tree["b"][None]], 0) if "b" in tree else w


# --- comparisons ----------------------------------------------------------


def _assert_close(actual: Any, expected: np.ndarray, rtol: float, what: str) -> None:
  """Entry-wise, relative to the largest entry of `expected` (exact zeros stay zero)."""
  actual = _np64(actual)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  assert np.all(np.isfinite(actual)), f"{what}: not finite\n{actual}"
  scale = np.max(np.abs(expected), initial=0.0)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


def _assert_near(actual: Any, expected: Any, rtol: float, what: str) -> None:
  """Norm-wise: `|actual - expected| <= rtol |expected|` (Frobenius)."""
  actual, expected = _np64(actual), _np64(expected)
  assert np.all(np.isfinite(actual)), f"{what}: not finite\n{actual}"
  error, size = np.linalg.norm(actual - expected), np.linalg.norm(expected)
  assert error <= rtol * size, f"{what}: error {error:.3g}, relative to {size:.3g} > {rtol}"


# --- the properties ---------------------------------------------------------


def _check_mlp(case: MLPCase, dtype: str) -> None:
  params, (x, t), loss_fn = _mlp_setup(case, dtype)
  est, loss, plain, grads, factors, updates, _ = _one_step(
      loss_fn, params, (x, t), case.mode, case.damping, "dense")
  stats_tol, update_tol = TOLERANCES[dtype]
  eps = float(jnp.finfo(dtype).eps)
  np.testing.assert_allclose(loss, plain, rtol=stats_tol)
  reference = _mlp_brute_force(case, params, x, t)
  assert sorted(factors) == [f"l{i}" for i in range(len(reference))], est.table()
  for i, ref in enumerate(reference):
    name = f"l{i}"
    for key in ("A", "G"):
      assert factors[name][key].dtype == jnp.dtype(dtype), (name, key, factors[name][key].dtype)
      _assert_close(factors[name][key], ref[key], stats_tol, f"{name} {key}")
    _assert_close(_dense_matrix(grads[name]), ref["grad"], stats_tol, f"{name} gradient")
    assert all(u.dtype == jnp.dtype(dtype) for u in jax.tree_util.tree_leaves(updates[name]))
    # The update, from the brute-force factors and gradient.
    expected = _kron_update(ref["A"], ref["G"], ref["grad"], case.damping, eps)
    _assert_close(_dense_matrix(updates[name]), expected, update_tol, f"{name} update")


@hypothesis.settings(max_examples=8, **SETTINGS)
@hypothesis.given(case=mlp_cases(), dtype=st.sampled_from(("float64", "float32")))
@hypothesis.example(  # batch of one, one layer, no bias, one class: G = 0, π = 1
    case=MLPCase(widths=(3, 1), activations=(), biases=(False,), batch=1,
                 loss="softmax_cross_entropy", mode="exact", damping=0.1, seed=0),
    dtype="float64")
@hypothesis.example(  # batch of one, a width-one bottleneck, float32
    case=MLPCase(widths=(1, 12, 1, 5), activations=("relu", "softplus"),
                 biases=(True, False, True), batch=1, loss="sigmoid_cross_entropy",
                 mode="empirical", damping=1e-2, seed=3),
    dtype="float32")
def test_dense_statistics_and_update_equal_brute_force(case: MLPCase, dtype: str):
  """Dense MLPs: A, G, the gradient and one update equal the dense computation.

  Random depth (1-3 layers), widths (1-12), biases per layer, activations,
  batch sizes (1-16), losses, modes "exact" and "empirical", float64 and
  float32.
  """
  _check_mlp(case, dtype)


@hypothesis.settings(max_examples=10, **SETTINGS)
@hypothesis.given(case=conv_cases(), dtype=st.sampled_from(("float64", "float32")))
@hypothesis.example(  # one example, one output location (kernel = input, VALID)
    case=ConvCase(spatial=(2, 3), kernel=(2, 3), strides=(2, 1), padding="VALID",
                  in_channels=2, out_channels=3, bias=True, activation="tanh", batch=1,
                  loss="softmax_cross_entropy", mode="exact", damping=0.1, seed=0),
    dtype="float64")
def test_conv_statistics_and_update_equal_patch_matrix(case: ConvCase, dtype: str):
  """Convolutions: A, G, the gradient and one update equal the patch-matrix computation.

  Random 1-D and 2-D inputs (sizes 1-6), kernels (1-3), strides (1-2),
  SAME or VALID padding, channels, bias, activation, batch (1-4), losses,
  modes, float64 and float32.
  """
  params, (x, t), loss_fn = _conv_setup(case, dtype)
  conv = lambda p, x, t: (lax.conv_general_dilated(x, p["k"], **_conv_args(case))
                          + p.get("b", 0.0))
  est, loss, plain, grads, factors, updates, s = _one_step(
      loss_fn, params, (x, t), case.mode, case.damping, "conv", extra=conv)
  stats_tol, update_tol = TOLERANCES[dtype]
  eps = float(jnp.finfo(dtype).eps)
  np.testing.assert_allclose(loss, plain, rtol=stats_tol)
  ref = _conv_brute_force(case, params, x, t, _np64(s) if dtype == "float64" else None)
  (name,) = factors
  for key in ("A", "G"):
    found = factors[name][key]
    assert found.dtype == jnp.dtype(dtype) and found.shape[0] == 1, (key, found.shape)
    _assert_close(found[0], ref[key], stats_tol, f"conv {key}")
  _assert_close(_conv_matrix(grads, case.out_channels), ref["grad"], stats_tol, "conv gradient")
  expected = _kron_update(ref["A"], ref["G"], ref["grad"], case.damping, eps)
  _assert_close(_conv_matrix(updates, case.out_channels), expected, update_tol, "conv update")


@hypothesis.settings(max_examples=8, **SETTINGS)
@hypothesis.given(case=mlp_cases(activations=SMOOTH),
                  dtype=st.sampled_from(("bfloat16", "float16")))
def test_half_precision_parameters_give_float32_factors(case: MLPCase, dtype: str):
  """bfloat16 / float16 parameters: finite float32 factors, and finite updates of
  the parameters' dtype, close to the higher-precision computation on the same
  (rounded) values.

  The reference is the float64 brute force, which the float32 computation
  matches to `TOLERANCES["float32"]` (the dense property above), far below
  these tolerances: comparing with it is comparing with float32, without
  compiling a second step per example. The factors and gradients are
  compared norm-wise; the update by its backward error, since the
  preconditioner amplifies the gradient's half-precision rounding by its
  condition number (a forward error of 0.22 in bfloat16 with λ = 0.1).

  Activations are smooth: a ReLU input within rounding of 0 flips its
  derivative between the two computations (35% off in `G`, seen with
  bfloat16), which is no error of either.
  """
  params, (x, t), loss_fn = _mlp_setup(case, dtype)
  _, _, _, grads, factors, updates, _ = _one_step(loss_fn, params, (x, t), case.mode,
                                                  case.damping, "dense")
  eps = float(jnp.finfo(dtype).eps)
  reference = _mlp_brute_force(case, params, x, t)
  for i, ref in enumerate(reference):
    name = f"l{i}"
    for key in ("A", "G"):
      assert factors[name][key].dtype == jnp.float32, (name, key, factors[name][key].dtype)
      _assert_near(factors[name][key], ref[key], HALF_TOLERANCE["statistics"] * eps,
                   f"{name} {key}")
    _assert_near(_dense_matrix(grads[name]), ref["grad"], HALF_TOLERANCE["gradient"] * eps,
                 f"{name} gradient")
    leaves = jax.tree_util.tree_leaves(updates[name])
    assert all(u.dtype == jnp.dtype(dtype) for u in leaves), (name, [u.dtype for u in leaves])
    u = _dense_matrix(updates[name])
    assert np.all(np.isfinite(u)), f"{name} update: not finite\n{u}"
    error = _backward_error(ref["A"], ref["G"], ref["grad"], u, case.damping,
                            float(jnp.finfo(jnp.float32).eps))
    assert error <= HALF_TOLERANCE["update"] * eps, (
        f"{name} update: backward error {error / eps:.3g} eps > {HALF_TOLERANCE['update']}")
