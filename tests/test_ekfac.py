"""EK-FAC (overrides "ekfac") against brute-force projected moments and exact Fisher blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import brute_force as bf
import jkfac
from test_conv import CASES, _brute_force, _kernel_matrix, _setup
from test_conv import N as CONV_N
from test_scan import _ONCE  # in the newest-JAX suite only (CI time)

KEY = jax.random.PRNGKey(0)
SIZES = (3, 5, 4)
N = 12
DAMPING = 0.1


def _two_updates(est, params, args, damping=DAMPING, decay=0.0):
  """A refresh (the eigenbases of this batch's factors), then an update that measures `S`.

  With `decay` 0, `S` is then the batch's alone. Returns the state after both
  and the second update's preconditioned gradient.
  """
  tx = jkfac.scale_by_kfac(est, damping=damping, decay=decay, inverse_every=100,
                           inverse_warmup=0)
  _, grads, stats = est(params, *args)
  state = tx.init(params)
  _, state = tx.update(grads, state, params, stats=stats)
  ekfac = [l.name for l in est.layers if l.block == "ekfac"]
  assert all(int(state.inverses[name]["count"].max()) == 0 for name in ekfac)  # S restarted
  updates, state = tx.update(grads, state, params, stats=stats)
  return state, updates, grads, stats


def _basis(inverse):
  return np.kron(np.asarray(inverse["U_A"]), np.asarray(inverse["U_G"]))


def _projected_rows(u_a, u_g, a_rows, g_rows, scale):
  """`Σ_r (U_A^T ā_r)² (U_G^T g_r)^2ᵀ · scale`, from the explicit per-row gradients `ā_r g_r^T`."""
  total = 0.0
  for a, g in zip(a_rows, g_rows):
    total = total + np.square(u_a.T @ np.outer(a, g) @ u_g)
  return total * scale


def _exact_fisher_block(logits_fn, params, layer, x):
  """`mean_n J_n^T H_n J_n` of one dense layer's `[w; b]`, row-major as `(in + 1, out)`."""
  total = 0.0
  for n in range(x.shape[0]):
    z = logits_fn(params, x[n:n + 1])[0]
    jac = jax.jacobian(lambda p: logits_fn(dict(params, **{layer: p}), x[n:n + 1])[0])(
        params[layer])
    rows = np.concatenate([np.asarray(jac["w"]).reshape(z.shape[0], -1),
                           np.asarray(jac["b"])], axis=1)
    total = total + rows.T @ np.asarray(bf.output_fisher("categorical", z)) @ rows
  return total / x.shape[0]


def test_dense_corrected_eigenvalues_are_the_exact_fisher_diagonal_in_the_kronecker_basis():
  params = bf.mlp_params(KEY, SIZES)
  x, y = bf.classification_data(N, SIZES[0], SIZES[-1])
  est = jkfac.estimator(bf.ce_loss, params, x, y, mode="exact", overrides={"*": "ekfac"})
  assert [(l.kind, l.block) for l in est.layers] == [("dense", "ekfac")] * 2
  assert "EK-FAC: A 4x4, G 5x5" in str(est)
  state, updates, grads, stats = _two_updates(est, params, (x, y))
  for name in ("l0", "l1"):
    inverse = state.inverses[name]
    a, g = np.asarray(stats.factors[name]["A"]), np.asarray(stats.factors[name]["G"])
    lam_a, u_a = np.linalg.eigh(a)
    lam_g, u_g = np.linalg.eigh(g)
    np.testing.assert_allclose(np.abs(np.asarray(inverse["U_A"]).T @ u_a), np.eye(len(a)),
                               atol=1e-8)  # the eigenbases, up to signs
    fisher = _exact_fisher_block(bf.mlp_forward, params, name, x)
    basis = _basis(inverse)
    s = np.asarray(inverse["S"])
    # One row per example, mode "exact": S is the exact Fisher's diagonal in the basis.
    np.testing.assert_allclose(s.reshape(-1), np.diag(basis.T @ fisher @ basis), rtol=1e-9,
                               atol=1e-14)
    # ... so it is at least as close to the Fisher as K-FAC, and closer here.
    ekfac = basis @ np.diag(s.reshape(-1)) @ basis.T
    kfac = np.kron(a, g)
    assert np.linalg.norm(ekfac - fisher) <= np.linalg.norm(kfac - fisher) * (1 - 1e-3)
    # The update is the dense formula: (basis diag(S + D) basis^T)^{-1} vec([∇w; ∇b]),
    # D the damping K-FAC's factored Tikhonov adds to its eigenvalue products.
    pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
    lam_a, lam_g = np.maximum(lam_a, 0), np.maximum(lam_g, 0)
    shift = (pi * np.sqrt(DAMPING) * lam_g[None, :] + lam_a[:, None] * np.sqrt(DAMPING) / pi
             + DAMPING)
    v = np.concatenate([grads[name]["w"], grads[name]["b"][None]], axis=0).reshape(-1)
    u = basis @ ((basis.T @ v) / (s + shift).reshape(-1))
    np.testing.assert_allclose(updates[name]["w"], u.reshape(-1, SIZES[int(name[1]) + 1])[:-1],
                               rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(updates[name]["b"], u.reshape(-1, SIZES[int(name[1]) + 1])[-1],
                               rtol=1e-9, atol=1e-13)
    assert not np.allclose(s, np.outer(lam_a, lam_g), rtol=1e-3)


def test_at_a_refresh_the_update_is_kfacs():
  """S restarts at K-FAC's eigenvalues and is damped as K-FAC's are: the same update."""
  params = bf.mlp_params(KEY, SIZES)
  x, y = bf.classification_data(N, SIZES[0], SIZES[-1])
  est = jkfac.estimator(bf.ce_loss, params, x, y, mode="exact", overrides={"*": "ekfac"})
  tx = jkfac.scale_by_kfac(est, damping=DAMPING)
  _, grads, stats = est(params, x, y)
  updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
  for name in ("l0", "l1"):
    a, g = np.asarray(stats.factors[name]["A"]), np.asarray(stats.factors[name]["G"])
    w, b = bf.kfac_dense_update(a, g, np.asarray(grads[name]["w"]),
                                np.asarray(grads[name]["b"]), DAMPING)
    np.testing.assert_allclose(updates[name]["w"], w, rtol=1e-8, atol=1e-13)
    np.testing.assert_allclose(updates[name]["b"], b, rtol=1e-8, atol=1e-13)


def test_s_starts_at_kfacs_eigenvalues_decays_towards_the_measured_and_restarts():
  params = bf.mlp_params(KEY, SIZES)
  x, y = bf.classification_data(N, SIZES[0], SIZES[-1])
  est = jkfac.estimator(bf.ce_loss, params, x, y, mode="exact", overrides={"l1": "ekfac"})
  measured = np.asarray(_two_updates(est, params, (x, y))[0].inverses["l1"]["S"])
  decay = 0.7
  tx = jkfac.scale_by_kfac(est, damping=DAMPING, decay=decay, inverse_every=3,
                           inverse_warmup=0)
  _, grads, stats = est(params, x, y)
  state = tx.init(params)
  kfac = None
  for step in range(4):  # a refresh at updates 0 and 3, S measured at 1 and 2
    _, state = tx.update(grads, state, params, stats=stats)
    s, count = np.asarray(state.inverses["l1"]["S"]), int(state.inverses["l1"]["count"])
    if step % 3 == 0:
      kfac = kfac if kfac is not None else s
      lam_a = np.linalg.eigvalsh(np.asarray(stats.factors["l1"]["A"]))
      lam_g = np.linalg.eigvalsh(np.asarray(stats.factors["l1"]["G"]))
      np.testing.assert_allclose(np.sort(s.reshape(-1)), np.sort(np.outer(
          np.maximum(lam_a, 0), np.maximum(lam_g, 0)).reshape(-1)), rtol=1e-8, atol=1e-15)
      assert count == 0
    else:
      np.testing.assert_allclose(s, decay**step * kfac + (1 - decay**step) * measured,
                                 rtol=1e-9, atol=1e-15)
      assert count == step


def test_expand_measures_every_token_as_a_row():
  b, t, d, h, k, classes = 4, 3, 5, 2, 3, 3
  k1, k2, k3, k4, k5 = jax.random.split(KEY, 5)
  params = {"proj": {"kernel": jax.random.normal(k1, (d, h, k), jnp.float64),
                     "bias": jax.random.normal(k2, (h, k), jnp.float64)},
            "out": jax.random.normal(k3, (h * k, classes), jnp.float64)}
  x = jax.random.normal(k4, (b, t, d), jnp.float64)
  y = jax.random.randint(k5, (b,), 0, classes)
  logits_from = lambda s, p: jnp.tanh(s).mean(axis=1).reshape(b, -1) @ p["out"]
  project = lambda p, x: jnp.einsum("btd,dhk->bthk", x, p["proj"]["kernel"]) + p["proj"]["bias"]
  loss_fn = lambda p, x, y: jkfac.softmax_cross_entropy(logits_from(project(p, x), p), y)
  est = jkfac.estimator(loss_fn, params, x, y, mode="empirical", overrides={"proj": "ekfac"})
  state, *_ = _two_updates(est, params, (x, y))
  inverse = state.inverses["proj"]
  rows = bf.homogeneous(np.asarray(x).reshape(-1, d))
  s = project(params, x)
  g = b * jax.grad(lambda s: jkfac.softmax_cross_entropy(logits_from(s, params), y))(s)
  expected = _projected_rows(np.asarray(inverse["U_A"]), np.asarray(inverse["U_G"]), rows,
                             np.asarray(g).reshape(-1, h * k), 1.0 / b)
  np.testing.assert_allclose(inverse["S"], expected, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("name", ["2d_grouped", "2d_nchw"])
def test_convolution_measures_every_location_as_a_row(name):
  case = CASES[name]
  setup = _setup(case)
  params, x, y, numbers, groups, *_, loss_fn = setup
  _, _, per_in, per_out, patches, g_rows = _brute_force(case, *setup)
  est = jkfac.estimator(loss_fn, params, x, y, mode="empirical", overrides={"*": "ekfac"})
  state, *_ = _two_updates(est, params, (x, y))
  inverse = state.inverses[est.layers[0].name]
  for j in range(groups):
    p = patches[:, j * per_in:(j + 1) * per_in]
    p = np.concatenate([p, np.ones((p.shape[0], 1))], axis=1)
    expected = _projected_rows(np.asarray(inverse["U_A"][j]), np.asarray(inverse["U_G"][j]),
                               p, g_rows[:, j * per_out:(j + 1) * per_out], 1.0 / CONV_N)
    np.testing.assert_allclose(inverse["S"][j], expected, rtol=1e-9, atol=1e-14)


def test_a_scanned_stack_equals_its_unrolled_layers():
  depth, width = 3, 4
  ks = jax.random.split(KEY, 3)
  stack = {"w": jax.random.normal(ks[0], (depth, width, width), jnp.float64) / 2,
           "b": 0.1 * jax.random.normal(ks[1], (depth, width), jnp.float64)}
  x = jax.random.normal(ks[2], (N, width), jnp.float64)
  y = jnp.argmax(x[:, :3], axis=1)
  head = lambda h: h[:, :3]

  def scanned(p, x, y):
    h, _ = jax.lax.scan(lambda h, l: (jnp.tanh(h @ l["w"] + l["b"]), None), x, p)
    return jkfac.softmax_cross_entropy(head(h), y)

  def unrolled(p, x, y):
    for l in range(depth):
      x = jnp.tanh(x @ p[f"l{l}"]["w"] + p[f"l{l}"]["b"])
    return jkfac.softmax_cross_entropy(head(x), y)

  layers = {f"l{l}": jax.tree.map(lambda a: a[l], stack) for l in range(depth)}
  est_s = jkfac.estimator(scanned, stack, x, y, mode="exact", overrides={"*": "ekfac"})
  est_u = jkfac.estimator(unrolled, layers, x, y, mode="exact", overrides={"*": "ekfac"})
  assert [l.stack for l in est_s.layers] == [(depth,)]
  state_s, updates_s, *_ = _two_updates(est_s, stack, (x, y))
  state_u, updates_u, *_ = _two_updates(est_u, layers, (x, y))
  (name,) = state_s.inverses
  for l in range(depth):
    np.testing.assert_allclose(state_s.inverses[name]["S"][l], state_u.inverses[f"l{l}"]["S"],
                               rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(updates_s["w"][l], updates_u[f"l{l}"]["w"], rtol=1e-8,
                               atol=1e-13)


@_ONCE
def test_convolution_is_closer_to_the_exact_fisher_than_kfac():
  case = CASES["2d_same"]
  params, x, y, numbers, _, _, conv_out, loss_fn = _setup(case)
  est = jkfac.estimator(loss_fn, params, x, y, mode="exact", overrides={"*": "ekfac"})
  state, _, _, stats = _two_updates(est, params, (x, y))
  logits = lambda p, x: jnp.mean(conv_out(p, x), axis=tuple(numbers.out_spec[2:]))
  fisher = 0.0
  for n in range(x.shape[0]):
    z = logits(params, x[n:n + 1])[0]
    jac = jax.jacobian(lambda p: logits(p, x[n:n + 1])[0])(params)
    kernel = np.stack([_kernel_matrix(j, numbers) for j in np.asarray(jac["k"])])
    rows = np.concatenate([kernel, np.asarray(jac["b"])[:, None]], axis=1).reshape(len(z), -1)
    fisher = fisher + rows.T @ np.asarray(bf.output_fisher("categorical", z)) @ rows
  fisher = fisher / x.shape[0]
  inverse = state.inverses[est.layers[0].name]
  basis = np.kron(np.asarray(inverse["U_A"][0]), np.asarray(inverse["U_G"][0]))
  ekfac = basis @ np.diag(np.asarray(inverse["S"][0]).reshape(-1)) @ basis.T
  factors = stats.factors[est.layers[0].name]
  kfac = np.kron(np.asarray(factors["A"][0]), np.asarray(factors["G"][0]))
  assert np.linalg.norm(ekfac - fisher) <= np.linalg.norm(kfac - fisher)


def test_one_step_solves_linear_least_squares_before_and_after_measuring():
  kx, kw, kn = jax.random.split(KEY, 3)
  x = jax.random.normal(kx, (40, 5), jnp.float64) * jnp.array([1.0, 3.0, 0.1, 2.0, 0.5]) + 1.0
  t = x @ jax.random.normal(kw, (5, 2), jnp.float64) + 0.3 + 0.1 * jax.random.normal(
      kn, (40, 2), jnp.float64)
  params = {"l0": {"w": jnp.zeros((5, 2), jnp.float64), "b": jnp.zeros(2, jnp.float64)}}
  loss_fn = lambda p, x, t: jkfac.squared_error(x @ p["l0"]["w"] + p["l0"]["b"], t)
  est = jkfac.estimator(loss_fn, params, x, t, mode="exact", overrides={"l0": "ekfac"})
  tx = optax.chain(jkfac.scale_by_kfac(est, damping=1e-20, inverse_every=100,
                                       inverse_warmup=0), optax.scale(-1.0))
  design = np.concatenate([np.asarray(x), np.ones((40, 1))], axis=1)
  solution, *_ = np.linalg.lstsq(design, np.asarray(t), rcond=None)
  _, grads, stats = est(params, x, t)
  state = tx.init(params)
  for _ in range(2):  # K-FAC's eigenvalues at the refresh, then the measured S
    updates, state = tx.update(grads, state, params, stats=stats)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["l0"]["w"], solution[:-1], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(new["l0"]["b"], solution[-1], rtol=1e-6, atol=1e-8)


@_ONCE
def test_trains_jitted_with_the_adaptive_optimizer_and_reports_its_figures():
  params = bf.mlp_params(KEY, (6, 16, 4), dtype=jnp.float32)
  x, y = bf.classification_data(64, 6, 4)
  x = x.astype(jnp.float32)
  est = jkfac.estimator(bf.ce_loss, params, x, y, overrides={"l1": "ekfac"})
  tx = jkfac.kfac(est)
  params, state, losses, traces = bf.train_jitted(est, tx, params, (x, y), 30)
  assert traces == 1 and np.isfinite(losses).all()
  assert losses[-1] < 0.5 * losses[0]
  figures = jkfac.diagnostics(est, state).layers["l1"]
  assert {"steps_since_basis", "damped_condition_S", "trace_A", "trace_G"} <= set(figures)
  assert np.isfinite(float(figures["damped_condition_S"]))


def test_refused_where_it_cannot_apply():
  params = bf.mlp_params(KEY, SIZES)
  x, y = bf.classification_data(N, SIZES[0], SIZES[-1])
  with pytest.raises(ValueError, match=r"'ln' \(scale_and_shift\) cannot have a 'ekfac' block.*"
                                       r"'ekfac' to \['dense', 'conv'\] layers"):
    jkfac.estimator(_with_norm, NORM_PARAMS, x, y, overrides={"ln": "ekfac"})
  est = jkfac.estimator(bf.ce_loss, params, x, y, overrides={"l0": "ekfac"})
  with pytest.raises(ValueError, match="MultiSteps averages the statistics.*'l0'"):
    jkfac.MultiSteps(jkfac.kfac(est), 2, est)


def _with_norm(p, x, y):
  h = x @ p["l0"]["w"]
  h = jkfac.register_scale_and_shift(h * p["ln"]["scale"], h, p["ln"]["scale"])
  return jkfac.softmax_cross_entropy(h @ p["l1"]["w"], y)


NORM_PARAMS = {"l0": {"w": jnp.ones((3, 4), jnp.float64)}, "ln": {"scale": jnp.ones(4)},
               "l1": {"w": jnp.ones((4, 2), jnp.float64)}}
