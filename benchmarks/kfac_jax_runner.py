# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""kfac-jax (google-deepmind/kfac-jax) on the MNIST autoencoder, as a comparison target.

kfac-jax is *not* a dependency of jkfac: it is imported lazily, only inside
the functions below, so this module imports fine where kfac-jax is absent
(check :func:`available` first). It was written against kfac-jax 0.0.8.

Example:
    >>> ok, why = available()
    >>> runner = make_optimizer(params, images, adaptive=True)
    >>> state = runner.init(params, images)
    >>> params, state, loss = runner.step(params, state, images, key)

Notes on how the objective maps onto kfac-jax (read from the 0.0.8 source,
``kfac_jax/_src/optimizer.py``):

* ``l2_reg`` does *not* touch the loss or the gradient: the gradient is exactly
  what ``value_and_grad_func`` returns (``_compute_loss_and_grads``). The
  coefficient only (a) is added to the damping, as ``identity_weight=l2_reg +
  precon_damping``, when the curvature factors are updated and inverted, and
  (b) adds ``l2_reg * R`` to the quadratic model that picks the adaptive
  learning rate / momentum and the Levenberg-Marquardt rho, where ``R`` is the
  Gram matrix of the update vectors with the parameters listed in
  ``regularized_parameters_path_exclusions`` masked out. (It is also added to
  the ``loss_registered`` statistic, which we don't request.) So the L2 term
  stays in our loss function, and the optimizer minimises
  ``autoencoder.objective`` exactly. Our L2 penalises the weights only, so we
  pass ``regularized_parameters_path_exclusions="b"`` so that the quadratic
  model's ``R`` matches (kfac-jax's own example regularises the biases too).
* The loss is registered with ``register_sigmoid_cross_entropy_loss(logits,
  images)``, which assumes ``sum(CE) / batch_size``: summed over pixels, mean
  over the batch, i.e. ``autoencoder.data_loss``.
* ``Optimizer.step`` jits internally (``utils.staged`` is ``jax.jit`` when
  ``multi_device=False``), and ``stats["loss"]`` is the value at the
  parameters *before* the step.
* ``Optimizer.step`` donates ``params`` and the optimizer state (``_step`` has
  ``donate_argnums=(params, state, func_state)``). :meth:`Runner.step` copies
  the parameters on the first step, so the caller's initial parameters stay
  valid (several optimizers can start from them); on later steps the
  parameters passed in (the ones the previous step returned) are consumed.
* With ``num_burnin_steps > 0`` kfac-jax wants a ``data_iterator`` on the
  first step; our step gets a single batch, so the burn-in (curvature-only
  updates) uses that batch ``num_burnin_steps`` times before the first real
  step. The burn-in runs inside the first :meth:`Runner.step` call.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

try:  # as part of a package
  from . import autoencoder  # type: ignore[no-redef]
except ImportError:  # as a script / module next to autoencoder.py
  _HERE = str(Path(__file__).resolve().parent)
  if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
  import autoencoder  # type: ignore[no-redef]

__all__ = ["ADAPTIVE_SETTINGS", "KfacJaxState", "Runner", "available", "make_optimizer"]

#: Settings of kfac-jax's examples/autoencoder_mnist/pipeline.py (adaptive mode).
ADAPTIVE_SETTINGS: dict[str, Any] = dict(
    use_adaptive_learning_rate=True,
    use_adaptive_momentum=True,
    use_adaptive_damping=True,
    inverse_update_period=5,
    damping_adaptation_interval=5,
    num_burnin_steps=5,
    curvature_ema=0.95,
    damping_adaptation_decay=0.95,
    initial_damping=150.0,
    min_damping=1e-5,
    max_damping=1000.0,
    l2_reg=1e-5,
)


@functools.lru_cache(maxsize=None)
def available() -> tuple[bool, str]:
  """(True, version) if kfac_jax imports and works with the installed JAX, else (False, reason).

  "Works" means a tiny two-layer model with a sigmoid cross-entropy loss gets
  through ``init`` and one ``step`` with finite loss. The result is cached.
  """
  try:
    import kfac_jax  # pylint: disable=import-outside-toplevel
  except Exception as e:  # pylint: disable=broad-except
    return False, f"kfac_jax does not import: {type(e).__name__}: {e}"
  version = str(getattr(kfac_jax, "__version__", "unknown"))
  try:
    key = jax.random.PRNGKey(0)
    k1, k2, k3 = jax.random.split(key, 3)
    params = [
        {"w": 0.3 * jax.random.normal(k1, (6, 3), jnp.float32), "b": jnp.zeros((3,), jnp.float32)},
        {"w": 0.3 * jax.random.normal(k2, (3, 6), jnp.float32), "b": jnp.zeros((6,), jnp.float32)},
    ]
    x = jax.random.uniform(k3, (8, 6), jnp.float32)

    def loss(p, batch):
      z = jnp.tanh(batch @ p[0]["w"] + p[0]["b"]) @ p[1]["w"] + p[1]["b"]
      kfac_jax.register_sigmoid_cross_entropy_loss(z, batch)
      ce = jnp.maximum(z, 0) - z * batch + jnp.log1p(jnp.exp(-jnp.abs(z)))
      return jnp.sum(ce) / batch.shape[0]

    opt = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss), l2_reg=0.0,
        use_adaptive_learning_rate=False, use_adaptive_momentum=False,
        use_adaptive_damping=False, num_burnin_steps=0, multi_device=False)
    state = opt.init(params, key, x)
    _, _, stats = opt.step(params, state, key, batch=x, global_step_int=0,
                           learning_rate=jnp.asarray(0.1, jnp.float32),
                           momentum=jnp.asarray(0.0, jnp.float32),
                           damping=jnp.asarray(1.0, jnp.float32))
    if not bool(jnp.isfinite(stats["loss"])):
      return False, f"kfac_jax {version}: smoke test gave a non-finite loss"
  except Exception as e:  # pylint: disable=broad-except
    return False, (f"kfac_jax {version} does not work with jax {jax.__version__}: "
                   f"{type(e).__name__}: {e}")
  return True, version


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["opt_state"], meta_fields=["step"])
@dataclasses.dataclass(frozen=True)
class KfacJaxState:
  """The kfac-jax optimizer state plus the Python step count.

  ``step`` is static (not a leaf): it is passed to kfac-jax as
  ``global_step_int`` so that it doesn't read the step counter off the device
  every step.
  """
  opt_state: Any
  step: int = 0


def _loss_fn(activation: str, kfac_jax) -> Callable[..., jax.Array]:
  """``autoencoder.objective`` with the output loss registered for kfac-jax."""

  def loss(params, images):
    z = autoencoder.logits(params, images, activation)
    kfac_jax.register_sigmoid_cross_entropy_loss(z, images)
    # Same as autoencoder.data_loss (which recomputes the logits internally,
    # so we can't register its logits): Bernoulli CE summed over pixels, mean
    # over the batch. The L2 stays here: kfac-jax's l2_reg doesn't add it.
    per_pixel = jnp.maximum(z, 0) - z * images + jnp.log1p(jnp.exp(-jnp.abs(z)))
    return jnp.sum(per_pixel) / images.shape[0] + autoencoder.l2_penalty(params)

  return loss


def _copy(tree):
  return jax.tree_util.tree_map(jnp.copy, tree)


class Runner:
  """kfac-jax's optimizer behind an init / step interface.

  Attributes:
    optimizer: the ``kfac_jax.Optimizer``.
    adaptive: whether learning rate, momentum and damping are adaptive.
    settings: the keyword arguments the optimizer was built with (minus the
      value-and-grad function).
  """

  def __init__(self, optimizer, *, adaptive: bool, settings: dict[str, Any],
               learning_rate=None, momentum=None, damping=None, seed: int = 0):
    self.optimizer = optimizer
    self.adaptive = adaptive
    self.settings = settings
    self._seed = seed
    if adaptive:
      self._hyper: dict[str, Any] = {}
    else:
      # A value left None is the optimizer's own (a `learning_rate_schedule`, say).
      fixed = dict(learning_rate=learning_rate, momentum=momentum, damping=damping)
      self._hyper = {name: jnp.asarray(value, jnp.float32) for name, value in fixed.items()
                     if value is not None}
    self._burnin = int(settings.get("num_burnin_steps", 0))

  def init(self, params, images) -> KfacJaxState:
    """The optimizer state (traces the loss to find the layers; no step taken)."""
    rng = jax.random.PRNGKey(self._seed)
    opt_state = self.optimizer.init(params, rng, images)
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    if opt_state.damping.dtype != dtype:
      # kfac-jax makes the damping `jnp.array(initial_damping, dtype=float)`:
      # float64 under jax_enable_x64, which then breaks a lax.cond between
      # float32 and float64 curvature inverses. Keep it in the params' dtype.
      opt_state = opt_state.copy()
      opt_state.damping = opt_state.damping.astype(dtype)
    return KfacJaxState(opt_state, 0)

  def step(self, params, state: KfacJaxState, images, key):
    """One training step: ``(params, state, loss)``.

    ``loss`` (a scalar jax array) is the training objective at the parameters
    before the step. The first call also runs the burn-in (adaptive mode) and
    the compilation. ``params`` and ``state`` are donated to kfac-jax, except
    the parameters on the first step, which are copied.
    """
    if state.step == 0:
      params = _copy(params)
    with warnings.catch_warnings():
      # kfac-jax donates buffers (the batch, in the burn-in) that XLA can't
      # reuse; harmless, but JAX warns when compiling.
      warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
      if state.step == 0 and self._burnin > 0:
        # Burn-in batches, then the step's batch; copies because kfac-jax's
        # burn-in donates the batch.
        batches = iter([_copy(images) for _ in range(self._burnin)] + [images])
        params, opt_state, stats = self.optimizer.step(
            params, state.opt_state, key, data_iterator=batches,
            global_step_int=0, **self._hyper)
      else:
        params, opt_state, stats = self.optimizer.step(
            params, state.opt_state, key, batch=images,
            global_step_int=state.step, **self._hyper)
    return params, KfacJaxState(opt_state, state.step + 1), stats["loss"]

  @staticmethod
  def state_bytes(state) -> int:
    """Bytes of all array leaves of the optimizer state."""
    return int(sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(state)
                   if hasattr(leaf, "nbytes")))


def make_optimizer(params, images_example, *, activation: str = "tanh", adaptive: bool = True,
                   learning_rate=None, momentum=None, damping=None,
                   inverse_every: int = 5, seed: int = 0,
                   num_burnin_steps: int | None = None,
                   initial_damping: float | None = None) -> Runner:
  """kfac-jax on ``autoencoder.objective`` (single device).

  Args:
    params: the autoencoder's parameters (``autoencoder.init_params``); used
      only to check the structure.
    images_example: a batch of images ``[B, 784]``; used only to check shapes.
    activation: the hidden activation (``"tanh"`` or ``"sigmoid"``).
    adaptive: ``True``: kfac-jax's own autoencoder example settings
      (:data:`ADAPTIVE_SETTINGS`: adaptive learning rate, momentum and
      damping, initial damping 150, 5 burn-in steps), with
      ``inverse_update_period=inverse_every`` (5 there). ``False``: fixed
      ``learning_rate``, ``momentum`` and ``damping`` (all required),
      ``inverse_update_period=inverse_every``, curvature EMA 0.95, no burn-in.
    learning_rate, momentum, damping: the fixed values (``adaptive=False``).
    inverse_every: steps between inverse (cache) updates.
    seed: seeds the optimizer's ``init``.
    num_burnin_steps: overrides the burn-in (5 adaptive, 0 fixed).
    initial_damping: where the adaptive damping starts (``adaptive=True``
      only; default: :data:`ADAPTIVE_SETTINGS`' 150, kfac-jax's example's;
      jkfac's benchmark starts at 1).

  Returns:
    A :class:`Runner`.
  """
  import kfac_jax  # pylint: disable=import-outside-toplevel

  if activation not in autoencoder.ACTIVATIONS:
    raise ValueError(f"unknown activation {activation!r}")
  if not isinstance(params, (list, tuple)) or not all("w" in l and "b" in l for l in params):
    raise ValueError("params must be a list of {'w', 'b'} dicts (autoencoder.init_params)")
  if images_example.ndim != 2 or images_example.shape[1] != params[0]["w"].shape[0]:
    raise ValueError(f"images_example has shape {images_example.shape}; expected "
                     f"[batch, {params[0]['w'].shape[0]}]")

  if adaptive:
    if any(v is not None for v in (learning_rate, momentum, damping)):
      raise ValueError("learning_rate/momentum/damping are adaptive when adaptive=True")
    settings = dict(ADAPTIVE_SETTINGS, inverse_update_period=inverse_every)
    if initial_damping is not None:
      if not initial_damping > 0:
        raise ValueError(f"initial_damping must be positive, got {initial_damping}")
      settings["initial_damping"] = float(initial_damping)
  else:
    if any(v is None for v in (learning_rate, momentum, damping)):
      raise ValueError("adaptive=False needs learning_rate, momentum and damping")
    if initial_damping is not None:
      raise ValueError("initial_damping is for adaptive=True; the fixed damping is `damping`")
    settings = dict(
        use_adaptive_learning_rate=False,
        use_adaptive_momentum=False,
        use_adaptive_damping=False,
        inverse_update_period=inverse_every,
        num_burnin_steps=0,
        curvature_ema=0.95,
        l2_reg=autoencoder.L2,
    )
  if num_burnin_steps is not None:
    settings["num_burnin_steps"] = num_burnin_steps
  if settings["l2_reg"] != autoencoder.L2:
    raise AssertionError("l2_reg must match autoencoder.L2")
  settings.update(
      regularized_parameters_path_exclusions="b",  # our L2 is on the weights only
      value_func_has_aux=False,
      value_func_has_state=False,
      value_func_has_rng=False,
      multi_device=False,
  )
  optimizer = kfac_jax.Optimizer(
      value_and_grad_func=jax.value_and_grad(_loss_fn(activation, kfac_jax)), **settings)
  return Runner(optimizer, adaptive=adaptive, settings=settings, learning_rate=learning_rate,
                momentum=momentum, damping=damping, seed=seed)
