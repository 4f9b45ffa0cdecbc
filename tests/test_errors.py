"""Bad input gets an error that names the problem and the fix.

One test (or one parametrized case) per message the library raises, through
the public API; each `match=` holds the problem's key words and the fix's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import brute_force as bf
import jkfac
from jkfac import distributed, linalg

KEY = jax.random.PRNGKey(0)
X = jax.random.normal(KEY, (8, 3))
Y = jnp.arange(8) % 2
PARAMS = bf.mlp_params(KEY, (3, 4, 2), dtype=jnp.float32)


def _loss(params, x, y):
  return jkfac.softmax_cross_entropy(bf.mlp_forward(params, x), y)


def _shapes(est, *args):
  """`est(PARAMS, *args, rng=KEY)` traced, not run: the errors are raised while
  tracing, as under `jit`; the results are shapes (enough to reach the checks)."""
  return jax.eval_shape(lambda: est(PARAMS, *args, rng=KEY))


@pytest.fixture(scope="module")
def made():
  """An estimator, and the gradient and statistics of one batch (as shapes)."""
  est = jkfac.estimator(_loss, PARAMS, X, Y)
  _, grads, stats = _shapes(est, X, Y)
  return est, grads, stats


# --- the loss function ---------------------------------------------------------


def test_loss_without_registered_loss():
  plain = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
      bf.mlp_forward(p, x), y).mean()
  with pytest.raises(ValueError, match="registers no loss.*jkfac.softmax_cross_entropy"):
    jkfac.estimator(plain, PARAMS, X, Y)


def _in_cond(p, x, y):  # the loss registered in both branches
  return jax.lax.cond(y[0] > 0, lambda: _loss(p, x, y), lambda: 2 * _loss(p, x, y))


def _in_switch(p, x, y):
  return jax.lax.switch(y[0], [lambda: _loss(p, x, y), lambda: _loss(p, x[::-1], y)])


def _in_scan(p, x, y):
  return jax.lax.scan(lambda c, _: (c + _loss(p, x, y), None), 0.0, None, length=2)[0]


def _in_while(p, x, y):
  return jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] + _loss(p, x, y)),
                            (0, 0.0))[1]


@pytest.mark.parametrize("loss_fn, primitive", [
    (_in_cond, "cond"), (_in_switch, "cond"), (_in_scan, "scan"), (_in_while, "while")])
def test_loss_inside_a_branch(loss_fn, primitive):
  with pytest.raises(ValueError, match=f"(?s)loss is inside a `{primitive}`.*jnp.where.*"
                                       "compute the loss after"):
    jkfac.estimator(loss_fn, PARAMS, X, Y)


def _tagged_in_while(p, x, y):
  def body(_, h):
    return jnp.tanh(jkfac.register_dense(h @ p["w"], h, p["w"]))
  h = jax.lax.fori_loop(0, y[0] + 2, body, x @ p["w_in"])  # a traced bound: a while loop
  return jkfac.softmax_cross_entropy(h @ p["w_out"], y)


def test_layer_tag_inside_a_loop():
  params = {"w_in": jnp.ones((X.shape[1], 4)), "w": jnp.eye(4), "w_out": jnp.ones((4, 3))}
  with pytest.raises(ValueError, match="(?s)layer tag.*inside a `while`.*does not look inside "
                                       "control flow other than lax.scan.*Tag the layer "
                                       "outside it"):
    jkfac.estimator(_tagged_in_while, params, X, Y)


def test_non_scalar_loss():
  with pytest.raises(ValueError, match="(?s)scalar loss.*batch mean.*has_aux=True"):
    jkfac.estimator(lambda p, x, y: (_loss(p, x, y), x), PARAMS, X, Y)
  with pytest.raises(ValueError, match="(?s)scalar loss.*Return the batch mean"):
    jkfac.estimator(lambda p, x, y: (jnp.stack([_loss(p, x, y)] * 2), x), PARAMS, X, Y,
                    has_aux=True)


def test_has_aux_without_a_pair():
  with pytest.raises(ValueError, match="has_aux=True.*return a pair.*has_aux=False"):
    jkfac.estimator(_loss, PARAMS, X, Y, has_aux=True)


def test_tag_with_a_computed_weight():
  def loss_fn(p, x, y):
    w = 2.0 * p["l0"]["w"]
    return jkfac.softmax_cross_entropy(jkfac.register_dense(x @ w, x, w), y)
  params = {"l0": {"w": jnp.ones((3, 2))}}
  with pytest.raises(ValueError, match="not a parameter leaf.*Pass the parameter itself"):
    jkfac.estimator(loss_fn, params, X, Y)


def test_empty_batch(made):
  with pytest.raises(ValueError, match=r"prediction shape \(0, 2\): the batch is empty.*at "
                                       "least one example"):
    jkfac.estimator(_loss, PARAMS, X[:0], Y[:0])
  est, _, _ = made
  with pytest.raises(ValueError, match="the batch is empty"):
    est(PARAMS, X[:0], Y[:0], rng=KEY)


def test_layers_that_depend_on_the_batch_shape():
  def loss_fn(p, x, y):
    h = bf.mlp_forward(p, x)
    if x.shape[0] > 4:  # an extra use of l1/w for large batches only
      h = h @ p["l1"]["w"].T @ p["l1"]["w"]
    return jkfac.softmax_cross_entropy(h, y)
  est = jkfac.estimator(loss_fn, PARAMS, X, Y)
  with pytest.raises(ValueError, match="(?s)different layers than at set-up.*set-up: .*now: "
                                       ".*must not depend on argument shapes.*one estimator "
                                       "per shape"):
    est(PARAMS, X[:4], Y[:4], rng=KEY)


def _two_losses(p, x, y):  # a second loss on half of the batch
  return _loss(p, x, y) + jkfac.squared_error(bf.mlp_forward(p, x)[:4], jnp.zeros((4, 2)))


@pytest.mark.parametrize("options, what", [
    (dict(stats_fraction=0.5), "stats_fraction"),
    (dict(overrides={"l0": "diagonal"}), "the diagonal block of 'l0/[wb]'"),
])
def test_losses_of_different_batch_sizes(options, what):
  est = jkfac.estimator(_two_losses, PARAMS, X, Y, **options)
  with pytest.raises(ValueError, match=f"{what} needs one batch size.*leading dimensions "
                                       r"\[4, 8\].*one prediction per example"):
    _shapes(est, X, Y)


@pytest.mark.parametrize("weight, message", [
    (-1.0, r"weight must be a finite number >= 0, got -1.0.*negative weight"),
    (float("inf"), "weight must be a finite number >= 0, got inf"),
    (None, "traced array.*Pass a Python number"),  # None: computed from the batch
])
def test_loss_weight(weight, message):
  def loss_fn(p, x, y):
    w = jnp.mean(x) ** 0 if weight is None else weight
    return jkfac.softmax_cross_entropy(bf.mlp_forward(p, x), y, weight=w)
  with pytest.raises(ValueError, match=message):
    jkfac.estimator(loss_fn, PARAMS, X, Y)


def test_unused_parameter_is_listed_not_refused():
  # Not an error: a parameter no layer owns gets the diagonal fallback, and the
  # layer table says why.
  est = jkfac.estimator(lambda p, x, y: _loss(p["net"], x, y),
                        {"net": PARAMS, "extra": jnp.ones(3)}, X, Y)
  assert "extra (3,): not used by the loss" in str(est)


# --- estimator options -----------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    (dict(mode="gauss"), "mode must be one of.*'fisher' samples targets"),
    (dict(stats_fraction=0.0), r"stats_fraction must be in \(0, 1\], got 0.0.*first eighth"),
    (dict(curvature_fraction=1.5), r"curvature_fraction must be in \(0, 1\], got 1.5"),
    (dict(weight_sharing="mean"), "weight_sharing must be one of.*'expand'.*'reduce'"),
    (dict(fisher_samples=0), "fisher_samples must be a positive integer.*got 0; use 1"),
    (dict(fisher_samples=2.5), "fisher_samples must be a positive integer.*got 2.5"),
])
def test_estimator_options(options, message):
  with pytest.raises(ValueError, match=message):
    jkfac.estimator(_loss, PARAMS, X, Y, **options)


def _with_norm(p, x, y):  # l0 (dense), then a tagged scale and shift
  h = x @ p["l0"]["w"]
  h = jkfac.register_scale_and_shift(h * p["ln"]["scale"], h, p["ln"]["scale"])
  return jkfac.softmax_cross_entropy(h @ p["l1"]["w"], y)


NORM_PARAMS = {"l0": {"w": jnp.ones((3, 4))}, "ln": {"scale": jnp.ones(4)},
               "l1": {"w": jnp.ones((4, 2))}}


@pytest.mark.parametrize("overrides, message", [
    ({"l0": "kfac"}, "'kfac' is not a block choice: use one of.*'kronecker'"),
    ({"dense*": "diagonal"}, r"patterns \['dense\*'\] match no layer.*The layers are "
                             r"\['l0', 'ln', 'l1'\].*use fnmatch patterns"),
    ({"ln": "kronecker"}, "'ln' \\(scale_and_shift\\) cannot have a 'kronecker' block.*"
                          "'diagonal', 'full' and 'none' apply to every layer"),
])
def test_bad_overrides(overrides, message):
  with pytest.raises(ValueError, match=message):
    jkfac.estimator(_with_norm, NORM_PARAMS, X, Y, overrides=overrides)


def test_full_block_too_large():
  params = {"l0": {"w": jax.ShapeDtypeStruct((80, 60), jnp.float32),  # 4860 entries
                    "b": jax.ShapeDtypeStruct((60,), jnp.float32)},
            "l1": {"w": jax.ShapeDtypeStruct((60, 2), jnp.float32),
                    "b": jax.ShapeDtypeStruct((2,), jnp.float32)}}
  with pytest.raises(ValueError, match=r"'l0' has 4860 parameter entries, too many for a "
                                       r"'full' block.*Use 'kronecker' or 'diagonal'"):
    jkfac.estimator(_loss, params, jax.ShapeDtypeStruct((4, 80), jnp.float32), Y[:4],
                    overrides={"l0": "full"})


@pytest.mark.parametrize("factor_dtype, message", [
    ("no such dtype", "factor_dtype must be jnp.float32 or jnp.float64"),
    (jnp.int32, "factor_dtype must be jnp.float32 or jnp.float64"),
    (jnp.bfloat16, "factor_dtype=bfloat16 is not supported.*leave factor_dtype=None"),
])
def test_factor_dtype(factor_dtype, message):
  with pytest.raises(ValueError, match=message):
    jkfac.estimator(_loss, PARAMS, X, Y, factor_dtype=factor_dtype)


def test_float64_factors_need_x64():
  with jax.enable_x64(False):
    params = {"w": np.ones((3, 2), np.float32)}
    loss = lambda p, x: jkfac.squared_error(x @ p["w"], np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match="float64 needs 64-bit JAX.*jax_enable_x64"):
      jkfac.estimator(loss, params, np.ones((4, 3), np.float32), factor_dtype=jnp.float64)


# --- calling the estimator --------------------------------------------------------


def test_fisher_mode_needs_a_key(made):
  est, _, _ = made
  with pytest.raises(ValueError, match="rng=key"):
    est(PARAMS, X, Y)
  with pytest.raises(TypeError, match="rng must be a jax.random key, got 0.*jax.random.key"):
    est(PARAMS, X, Y, rng=0)
  with pytest.raises(TypeError, match="rng must be a jax.random key, got an array of dtype "
                                      "float"):
    est(PARAMS, X, Y, rng=jnp.zeros(2))


def test_params_that_do_not_match(made):
  est, _, _ = made
  wrong_tree = {"l0": PARAMS["l0"]}
  with pytest.raises(ValueError, match="(?s)does not match the parameters.*new estimator"):
    est(wrong_tree, X, Y, rng=KEY)
  wrong_shape = jax.tree_util.tree_map(lambda v: v, PARAMS)
  wrong_shape["l1"] = {"w": jnp.zeros((4, 5)), "b": jnp.zeros(2)}
  with pytest.raises(ValueError, match=r"'l1/w' has shape \(4, 5\).*expects \(4, 2\).*build "
                                       "a new estimator"):
    est(wrong_shape, X, Y, rng=KEY)
  tx = jkfac.kfac(est, 0.1)
  with pytest.raises(ValueError, match="scale_by_kfac.init"):
    tx.init(wrong_tree)


def test_params_of_another_dtype(made):
  est, _, _ = made
  half = jax.tree_util.tree_map(lambda v: v.astype(jnp.float16), PARAMS)
  with pytest.raises(ValueError, match="'l0/b' has dtype float16, the estimator was built "
                                       "with float32.*build a new estimator"):
    est(half, X, Y, rng=KEY)


def test_another_number_of_arguments(made):
  est, _, _ = made
  with pytest.raises(ValueError, match="got 1 argument.*built with 2.*another estimator"):
    est(PARAMS, X, rng=KEY)
  with pytest.raises(ValueError, match="got 3 argument.*built with 2"):
    est(PARAMS, X, Y, Y, rng=KEY)


def test_inputs_and_labels_of_different_batch_sizes(made):
  est, _, _ = made
  with pytest.raises(ValueError, match=r"labels must have shape \(8,\).*got \(6,\).*inputs "
                                       "and labels have the same size"):
    est(PARAMS, X, Y[:6], rng=KEY)


# --- the loss functions -------------------------------------------------------------


def test_bad_labels():
  logits = jnp.zeros((4, 2))
  with pytest.raises(ValueError, match=r"labels must have shape \(4,\).*jnp.argmax"):
    jkfac.softmax_cross_entropy(logits, jnp.zeros((4, 2), jnp.int32))
  with pytest.raises(TypeError, match="integer class indices, got dtype float.*astype"):
    jkfac.softmax_cross_entropy(logits, jnp.zeros(4))
  with pytest.raises(ValueError, match=r"labels must be in \[0, 2\).*from -1 to 2.*remap the "
                                       "labels to 0..1"):
    jkfac.softmax_cross_entropy(logits, jnp.array([0, 1, 2, -1]))


def test_out_of_range_labels_are_not_checked_under_jit():
  # Not checkable without a host sync: documented, and the loss is NaN.
  loss = jax.jit(jkfac.softmax_cross_entropy)(jnp.zeros((4, 2)), jnp.array([0, 1, 1, 5]))
  assert jnp.isnan(loss)


def test_bad_targets():
  with pytest.raises(ValueError, match=r"predictions \(8, 2\) and targets \(8, 3\) must have "
                                       "the same shape.*Reshape the targets"):
    jkfac.squared_error(jnp.zeros((8, 2)), jnp.zeros((8, 3)))
  with pytest.raises(ValueError, match=r"sigmoid_cross_entropy: predictions \(8, 2\) and "
                                       r"targets \(8,\)"):
    jkfac.sigmoid_cross_entropy(jnp.zeros((8, 2)), jnp.zeros(8))
  with pytest.raises(ValueError, match=r"leading batch axis.*predictions\[None\]"):
    jkfac.squared_error(jnp.zeros(()), jnp.zeros(()))
  with pytest.raises(ValueError, match=r"targets must be in \[0, 1\].*from -1.0 to 1.0.*"
                                       r"\(targets \+ 1\) / 2"):
    jkfac.sigmoid_cross_entropy(jnp.zeros((2, 2)), jnp.array([[1.0, -1.0], [0.0, 1.0]]))


# --- layer tags ----------------------------------------------------------------------


def test_register_dense_shapes():
  w = jnp.ones((3, 2))
  with pytest.raises(ValueError, match=r"w must be 2-D \(in, out\), got shape \(3, 2, 1\).*"
                                       "found automatically"):
    jkfac.register_dense(X @ w, X, jnp.ones((3, 2, 1)))
  with pytest.raises(ValueError, match=r"shapes do not match y = x @ w \+ b: x \(8, 3\), w "
                                       r"\(4, 2\).*pass the layer's own input"):
    jkfac.register_dense(X @ w, X, jnp.ones((4, 2)))
  with pytest.raises(ValueError, match=r"b must have shape \(2,\).*got \(3,\).*Pass the bias"):
    jkfac.register_dense(X @ w, X, w, jnp.ones(3))


CONV = dict(window_strides=(1, 1), padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
CX, CW = jnp.ones((1, 5, 5, 3)), jnp.ones((3, 3, 3, 4))


def test_register_conv_shapes():
  y = jax.lax.conv_general_dilated(CX, CW, **CONV)
  with pytest.raises(ValueError, match=r"shapes do not match y = conv\(x, w\) \+ b.*y \(1, 2, "
                                       r"2, 4\) \(expected \(1, 3, 3, 4\)\).*own input"):
    jkfac.register_conv(y[:, :2, :2], CX, CW, **CONV)
  with pytest.raises(ValueError, match=r"b \(3,\) \(expected \(4,\), the output channels\)"):
    jkfac.register_conv(y, CX, CW, jnp.ones(3), **CONV)
  with pytest.raises(ValueError, match=r"(?s)conv_general_dilated\(x, w, \*\*conv_args\) fails "
                                       r"for x \(1, 5, 5, 3\), w \(3, 3, 2, 4\).*own input"):
    jkfac.register_conv(y, CX, jnp.ones((3, 3, 2, 4)), **CONV)
  with pytest.raises(ValueError, match="(?s)fails.*window_strides and padding are required"):
    jkfac.register_conv(y, CX, CW, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  with pytest.raises(ValueError, match=r"unsupported convolution arguments "
                                       r"\['batch_group_count'\].*leave other convolutions "
                                       "untagged"):
    jkfac.register_conv(y, CX, CW, batch_group_count=1, **CONV)


def test_register_scale_and_shift_shapes():
  with pytest.raises(ValueError, match="needs a scale, a shift or both: pass scale="):
    jkfac.register_scale_and_shift(X, X)
  with pytest.raises(ValueError, match=r"shapes do not match y = x \* scale \+ shift: x "
                                       r"\(8, 3\).*scale \(4,\).*trailing shape"):
    jkfac.register_scale_and_shift(X, X, jnp.ones(4))


# --- the transforms ----------------------------------------------------------------------


def _negative_schedule(count):
  return -1e-3 + 0 * count


@pytest.mark.parametrize("kwargs, message", [
    (dict(damping=-1.0), "damping must be positive, got -1.0.*try 1e-3"),
    (dict(damping=0.0), "damping must be positive, got 0.0"),
    (dict(damping=_negative_schedule), "damping must be positive, got a schedule whose value "
                                       "at update 0 is -0.001.*keep a schedule's values"),
    (dict(damping=1e-3, decay=1.0), r"decay must be in \[0, 1\), got 1.0.*try 0.95"),
    (dict(damping=1e-3, decay=-0.1), r"decay must be in \[0, 1\), got -0.1"),
    (dict(damping=1e-3, inverse_every=0), "inverse_every must be a positive integer, got 0.*"
                                          "try 20"),
    (dict(damping=1e-3, inverse_every=2.5), "inverse_every must be a positive integer, got 2.5"),
    (dict(damping=1e-3, inverse_warmup=-1), "inverse_warmup must be a non-negative integer.*"
                                            "try 3"),
    (dict(damping=1e-3, inverse_method="svd"), "inverse_method must be one of.*'cholesky' "
                                               "\\(the default"),
    (dict(damping=1e-3, structure="banded"), "structure must be one of"),
])
def test_options_out_of_range(made, kwargs, message):
  est, _, _ = made
  with pytest.raises(ValueError, match=message):
    jkfac.scale_by_kfac(est, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(learning_rate=0.1, momentum=-0.1), r"momentum must be in \[0, 1\), got -0.1.*try 0.9"),
    (dict(learning_rate=0.1, momentum=1.0), r"momentum must be in \[0, 1\), got 1.0"),
    (dict(learning_rate=-0.1, momentum=0.9), "learning_rate must be non-negative, got -0.1.*"
                                             "negates it itself"),
    (dict(damping=-1e-3, l2_reg=1e-2), "damping must be positive, got -0.001.*l2_reg is added"),
    (dict(damping=0.0), "damping must be positive, got 0.0"),
    (dict(l2_reg=-1e-5), "l2_reg must be non-negative, got -1e-05.*paper uses 1e-5"),
    (dict(damping_interval=0), "damping_interval must be a positive integer, got 0.*try 5"),
    (dict(gamma_interval=0), "gamma_interval must be a positive integer or None, got 0.*try 20"),
    (dict(learning_rate=0.1, momentum=0.9, gamma_interval=20),
     "gamma_interval re-chooses γ by the quadratic model: leave learning_rate or momentum"),
    (dict(min_damping=0.0), "min_damping must be positive, got 0.0.*try 1e-8"),
    (dict(learning_rate=0.1, momentum=0.9, kl_clip=0.0),
     "kl_clip must be positive or None, got 0.0.*None for no trust region"),
    (dict(nesterov=True, learning_rate=0.1), "nesterov=True needs a fixed learning_rate and "
                                             "momentum.*nesterov=False"),
    (dict(decay=1.0), r"decay must be in \[0, 1\)"),
    (dict(inverse_every=0), "inverse_every must be a positive integer"),
])
def test_kfac_options_out_of_range(made, kwargs, message):
  est, _, _ = made
  with pytest.raises(ValueError, match=message):
    jkfac.kfac(est, **kwargs)


@pytest.mark.parametrize("make", [lambda e: jkfac.kfac(e, 0.1, 0.9, damping=1e-3),
                                  lambda e: jkfac.scale_by_kfac(e, damping=1e-3)],
                         ids=["kfac", "scale_by_kfac"])
def test_transforms_need_an_estimator(make):
  with pytest.raises(TypeError, match="est must be the estimator made by jkfac.estimator, got "
                                      "function.*est = jkfac.estimator"):
    make(_loss)


@pytest.mark.parametrize("which", ["scale_by_kfac", "kfac"])
def test_the_state_of_another_optimizer(made, which):
  est, grads, stats = made
  tx = jkfac.scale_by_kfac(est, damping=1e-3) if which == "scale_by_kfac" else jkfac.kfac(est)
  expected = "ScaleByKFACState" if which == "scale_by_kfac" else "KFACState"
  with pytest.raises(TypeError, match=f"{which}.update: the state is a ScaleByAdamState, not "
                                      f"this transform's {expected}.*tx.init"):
    tx.update(grads, optax.scale_by_adam().init(PARAMS), PARAMS, stats=stats)


def test_update_without_stats(made):
  est, grads, _ = made
  tx = jkfac.kfac(est, 0.1)
  with pytest.raises(ValueError, match=r"(?s)needs the curvature statistics.*stats=stats"):
    tx.update(grads, tx.init(PARAMS), PARAMS)


def test_stats_that_are_not_statistics(made):
  est, grads, stats = made
  tx = jkfac.scale_by_kfac(est, damping=1e-3)
  with pytest.raises(TypeError, match="stats must be the Statistics returned by the "
                                      "estimator, got dict.*stats=stats"):
    tx.update(grads, tx.init(PARAMS), PARAMS, stats=stats.factors)


def test_adaptive_damping_needs_params(made):
  est, grads, stats = made
  tx = jkfac.kfac(est)
  with pytest.raises(ValueError, match="with params"):
    tx.update(grads, tx.init(PARAMS), stats=stats)


def test_stats_from_another_estimator(made):
  est, grads, _ = made
  other = jkfac.estimator(_loss, PARAMS, X, Y)
  tx = jkfac.kfac(est, 0.1)
  _, _, stats = _shapes(other, X, Y)
  with pytest.raises(ValueError, match="another estimator.*jkfac.kfac\\(est"):
    tx.update(grads, tx.init(PARAMS), PARAMS, stats=stats)


def test_stats_without_the_transforms_factors():
  est = jkfac.estimator(_loss, PARAMS, X, Y)
  _, grads, stats = _shapes(est, X, Y)  # before the transform asks for cross moments
  tx = jkfac.scale_by_kfac(est, damping=1e-3, structure="block_tridiagonal")
  with pytest.raises(ValueError, match="do not have the factors this transform keeps.*build "
                                       "the optimizer before tracing"):
    tx.update(grads, tx.init(PARAMS), PARAMS, stats=stats)


def test_grads_that_do_not_match_the_params(made):
  est, grads, stats = made
  tx = jkfac.scale_by_kfac(est, damping=1e-3)
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match=r"(?s)scale_by_kfac.update\(grads, ...\): the pytree "
                                       "does not match.*expected"):
    tx.update({"l0": grads["l0"]}, state, PARAMS, stats=stats)
  wrong = {**grads, "l1": {"w": jnp.zeros((4, 5)), "b": grads["l1"]["b"]}}
  with pytest.raises(ValueError, match=r"'l1/w' has shape \(4, 5\), the estimator expects"):
    tx.update(wrong, state, PARAMS, stats=stats)


def test_diagnostics_of_another_optimizer(made):
  est, _, _ = made
  with pytest.raises(ValueError, match="holding one jkfac scale_by_kfac state, found 0: pass "
                                       "the state of jkfac.kfac"):
    jkfac.diagnostics(est, optax.adam(1e-3).init(PARAMS))


def test_quadratic_model_needs_stats_and_grads(made):
  est, grads, stats = made
  tx = jkfac.scale_by_quadratic_model(est, 1e-3)
  with pytest.raises(ValueError, match="needs stats=.*and grads=.*or use jkfac.kfac"):
    tx.update(grads, tx.init(PARAMS), PARAMS, stats=stats)


# --- Polyak averaging, batch sizes, devices, inverses --------------------------------------


@pytest.mark.parametrize("decay", [1.0, -0.1, None])
def test_polyak_decay_out_of_range(decay):
  with pytest.raises(ValueError, match=r"decay must be in \[0, 1\).*use e.g. decay=0.99"):
    jkfac.polyak_average(decay)


@pytest.mark.parametrize("args, message", [
    ((0, 100), "initial must be >= 1, got 0; pass the first step's batch size"),
    ((200, 100), r"total \(100\) must be >= initial \(200\); pass the training set size"),
    ((10, 100, 0), "full_at must be >= 1, got 0.*e.g. 500"),
    ((10, 100, 50, 0), "round_to must be >= 1 or None, got 0; pass None"),
])
def test_growing_batch_size_arguments(args, message):
  with pytest.raises(ValueError, match=message):
    jkfac.growing_batch_size(*args)


def test_growing_batch_size_is_one_based():
  with pytest.raises(ValueError, match="steps are 1-based, got k=0.*k = step \\+ 1"):
    jkfac.growing_batch_size(10, 100)(0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=-1), "steps must be >= 0, got -1; pass the number of training steps"),
    (dict(steps=5, distinct=1), "distinct must be >= 2.*got 1; e.g. distinct=8"),
])
def test_growing_batch_sizes_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    jkfac.growing_batch_sizes(1, 10, **kwargs)


def test_spread_needs_one_dtype():
  functions = [lambda: jnp.zeros(2, jnp.float32), lambda: jnp.zeros(2, jnp.float64)]
  spread = lambda _: distributed.spread(functions, [1.0, 1.0], "i")[0]
  with pytest.raises(ValueError, match="must share one dtype.*Cast every function's results"):
    jax.pmap(spread, axis_name="i", devices=jax.devices()[:2])(jnp.zeros(2))


def test_unknown_inverse_method():
  with pytest.raises(ValueError, match="inverse method must be one of.*pass 'cholesky'"):
    linalg.damped_inverse(jnp.eye(2), 1.0, "qr")
