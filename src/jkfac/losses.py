# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Loss functions that register their predictive distribution.

Each loss returns the batch mean of the per-example negative log-likelihood
and tags its prediction in the traced graph (`tags.loss_tag`), so that the
estimator knows the model's predictive distribution `p(y|x)`. A distribution
here knows how to sample targets (mode `"fisher"`), the gradient of the
negative log-likelihood with respect to its prediction, and a square root of
its Fisher matrix (mode `"exact"`): with `F_out = B B^T`, the exact Fisher of
the network is `J^T B B^T J`, one backward pass per column of `B`.

Examples: a categorical prediction of shape `(..., classes)` has one example
per leading position; Bernoulli and Gaussian predictions of shape `(n, ...)`
have `n` examples, every other axis being output dimensions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jkfac import tags

Array = jax.Array


def _float(x: Array) -> Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


@dataclasses.dataclass(frozen=True)
class Distribution:
  """A predictive distribution parametrised by a network output.

  Attributes:
    name: the name used in loss tags.
    example_axes: how many leading axes of the prediction index examples
      (`None`: all but the last).
    sample: `(key, prediction) -> target`, a draw from `p(y|prediction)`.
    nll_grad: `(prediction, target) -> d(-log p(target|prediction))/dprediction`.
    fisher_sqrt: `prediction -> B`, shape `(columns, *prediction.shape)`, with
      `sum_k B[k] B[k]^T` the Fisher of the distribution for each example.
    fisher_product: `(prediction, u) -> F u`, the distribution's Fisher
      (the Hessian of the negative log-likelihood in its prediction) applied
      to `u` of the prediction's shape, example by example.
    classes_last: whether the prediction's last axis holds one variable's
      class scores (categorical) rather than one variable per element.
  """
  name: str
  example_axes: int | None
  sample: Callable[[Array, Array], Array]
  nll_grad: Callable[[Array, Array], Array]
  fisher_sqrt: Callable[[Array], Array]
  fisher_product: Callable[[Array, Array], Array]
  classes_last: bool = False

  def num_examples(self, prediction_shape: tuple[int, ...]) -> int:
    """Returns how many terms the loss averages over.

    Args:
      prediction_shape: the shape of the prediction; its leading
        `example_axes` axes index the terms.
    """
    axes = len(prediction_shape) - 1 if self.example_axes is None else self.example_axes
    return math.prod(prediction_shape[:axes])

  def variables_per_term(self, prediction_shape: tuple[int, ...]) -> int:
    """Returns how many random variables one averaged term predicts.

    Args:
      prediction_shape: the shape of the prediction.
    """
    axes = len(prediction_shape) - 1 if self.example_axes is None else self.example_axes
    event = prediction_shape[axes:]
    return math.prod(event[:-1] if self.classes_last else event)


def _categorical_fisher_sqrt(logits: Array) -> Array:
  probs = jax.nn.softmax(_float(logits), axis=-1)
  classes = logits.shape[-1]
  eye = jnp.eye(classes, dtype=probs.dtype)
  # Column k: sqrt(p_k) (e_k - p), so that sum_k col col^T = diag(p) - p p^T.
  cols = jnp.sqrt(probs)[..., None] * (eye - probs[..., None, :])
  return jnp.moveaxis(cols, -2, 0)


def _categorical_fisher_product(logits: Array, u: Array) -> Array:
  """`(diag(p) - p p^T) u` along the class axis."""
  probs = jax.nn.softmax(_float(logits), axis=-1)
  return probs * u - probs * jnp.sum(probs * u, axis=-1, keepdims=True)


def _elementwise_fisher_sqrt(scale: Array) -> Array:
  """Columns e_k * scale_k, one per output element of an example."""
  n = scale.shape[0]
  flat = scale.reshape(n, -1)
  dims = flat.shape[1]
  cols = jnp.eye(dims, dtype=flat.dtype)[:, None, :] * flat[None]
  return cols.reshape((dims,) + scale.shape)


CATEGORICAL = Distribution(
    name="categorical",
    example_axes=None,
    classes_last=True,
    sample=lambda key, logits: jax.random.categorical(key, _float(logits), axis=-1),
    nll_grad=lambda logits, labels: (
        jax.nn.softmax(_float(logits), axis=-1)
        - jax.nn.one_hot(labels, logits.shape[-1], dtype=_float(logits).dtype)),
    fisher_sqrt=_categorical_fisher_sqrt,
    fisher_product=lambda logits, u: _categorical_fisher_product(logits, u),
)

BERNOULLI = Distribution(
    name="bernoulli",
    example_axes=1,
    sample=lambda key, logits: jax.random.bernoulli(
        key, jax.nn.sigmoid(_float(logits))).astype(_float(logits).dtype),
    nll_grad=lambda logits, targets: jax.nn.sigmoid(_float(logits)) - targets,
    fisher_sqrt=lambda logits: _elementwise_fisher_sqrt(jnp.sqrt(
        jax.nn.sigmoid(_float(logits)) * jax.nn.sigmoid(-_float(logits)))),
    fisher_product=lambda logits, u: (
        jax.nn.sigmoid(_float(logits)) * jax.nn.sigmoid(-_float(logits)) * u),
)

GAUSSIAN = Distribution(
    name="gaussian",
    example_axes=1,
    sample=lambda key, mean: _float(mean) + jax.random.normal(
        key, mean.shape, _float(mean).dtype),
    nll_grad=lambda mean, targets: _float(mean) - targets,
    fisher_sqrt=lambda mean: _elementwise_fisher_sqrt(jnp.ones_like(_float(mean))),
    fisher_product=lambda mean, u: u,
)

DISTRIBUTIONS = {d.name: d for d in (CATEGORICAL, BERNOULLI, GAUSSIAN)}


def register_categorical_predictive(logits: Array, labels: Array,
                                    weight: float = 1.0) -> Array:
  """Registers a categorical distribution `softmax(logits)` over integer labels.

  Args:
    logits: shape `(..., classes)`.
    labels: integer labels, shape `logits.shape[:-1]`.
    weight: the loss's coefficient in the total loss.

  Returns:
    `logits`, unchanged: compute the loss value from it.
  """
  if labels.shape != logits.shape[:-1]:
    raise ValueError(
        f"Categorical loss: labels must have shape {logits.shape[:-1]} (logits "
        f"{logits.shape} without the class axis), got {labels.shape}. Pass one integer "
        "label per example, from a batch whose inputs and labels have the same size "
        "(not one-hot labels: jnp.argmax(one_hot, axis=-1) gives the indices).")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(
        f"Categorical loss: labels must be integer class indices, got dtype {labels.dtype}. "
        "Cast them (labels.astype(jnp.int32)); for soft or multi-label targets in "
        "[0, 1] use jkfac.sigmoid_cross_entropy.")
  classes = logits.shape[-1]
  low, high = _concrete_range(labels)
  if low is not None and (low < 0 or high >= classes):
    raise ValueError(
        f"Categorical loss: labels must be in [0, {classes}) for logits with {classes} "
        f"classes, got labels from {low} to {high}. Give the model one output per class, "
        f"or remap the labels to 0..{classes - 1}.")
  return tags.loss_tag(logits, labels, distribution="categorical", weight=weight)


def register_bernoulli_predictive(logits: Array, targets: Array,
                                  weight: float = 1.0) -> Array:
  """Registers independent Bernoulli outputs `sigmoid(logits)`.

  Args:
    logits: shape `(batch, ...)`.
    targets: values in [0, 1], the same shape.
    weight: the loss's coefficient in the total loss.

  Returns:
    `logits`, unchanged.
  """
  _check_same_shape("sigmoid_cross_entropy", logits, targets)
  low, high = _concrete_range(targets)
  if low is not None and (low < 0 or high > 1):
    raise ValueError(
        f"sigmoid_cross_entropy: targets must be in [0, 1] (probabilities), got values "
        f"from {low} to {high}. Rescale them, e.g. (targets + 1) / 2 for labels in "
        "{-1, 1}; for integer class labels use jkfac.softmax_cross_entropy.")
  return tags.loss_tag(logits, targets, distribution="bernoulli", weight=weight)


def register_gaussian_predictive(mean: Array, targets: Array,
                                 weight: float = 1.0) -> Array:
  """Registers a unit-variance Gaussian with the given mean.

  Args:
    mean: shape `(batch, ...)`.
    targets: the same shape.
    weight: the loss's coefficient in the total loss.

  Returns:
    `mean`, unchanged.
  """
  _check_same_shape("squared_error", mean, targets)
  return tags.loss_tag(mean, targets, distribution="gaussian", weight=weight)


def _check_same_shape(name: str, prediction: Array, targets: Array) -> None:
  if prediction.shape != targets.shape:
    raise ValueError(
        f"{name}: predictions {prediction.shape} and targets {targets.shape} must have "
        "the same shape (one target per output, the same batch size). Reshape the "
        "targets (e.g. targets.reshape(predictions.shape)) or fix the model's output "
        "size.")
  if prediction.ndim < 1:
    raise ValueError(f"{name}: predictions need a leading batch axis, got a scalar. "
                     "Add one: pass predictions[None] and targets[None].")


def _concrete_range(values: Array) -> tuple[Any, Any]:
  """`(min, max)` of `values` when they are concrete, else `(None, None)`.

  Only an eager call has concrete values: under `jit`, and always inside
  `est` (which traces the loss), they are abstract and the range is not
  checked, as that would need a host sync. Out-of-range categorical labels
  then give a NaN loss; Bernoulli targets outside [0, 1] a wrong one.
  """
  if isinstance(values, jax.core.Tracer) or (
      isinstance(values, jax.Array) and not values.is_fully_addressable):
    return None, None
  values = np.asarray(values)
  if values.size == 0:
    return None, None
  return values.min().item(), values.max().item()


def softmax_cross_entropy(logits: Array, labels: Array, weight: float = 1.0) -> Array:
  """Mean negative log-likelihood of integer labels under `softmax(logits)`.

  Registers a categorical predictive distribution (K-FAC, section 2).

  Args:
    logits: shape `(..., classes)`.
    labels: integer labels in `[0, classes)`, shape `logits.shape[:-1]`. Out
      of range labels are refused in an eager call; under `jit` and inside
      `est` they cannot be checked without a host sync and give a NaN loss.
    weight: multiplies the returned value and the registered curvature.

  Returns:
    `weight` times the mean over examples of `-log softmax(logits)[label]`.
  """
  logits = _float(register_categorical_predictive(logits, labels, weight))
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
  return weight * jnp.mean(nll)


def sigmoid_cross_entropy(logits: Array, targets: Array, weight: float = 1.0) -> Array:
  """Bernoulli cross-entropy, summed over output dimensions, mean over the batch.

  Registers independent Bernoulli outputs `sigmoid(logits)`.

  Args:
    logits: shape `(batch, ...)`.
    targets: values in [0, 1], the same shape.
    weight: multiplies the returned value and the registered curvature.

  Returns:
    `weight` times the batch mean of the per-example loss.
  """
  logits = _float(register_bernoulli_predictive(logits, targets, weight))
  per_element = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(
      jnp.exp(-jnp.abs(logits)))
  return weight * jnp.sum(per_element) / logits.shape[0]


def squared_error(predictions: Array, targets: Array, weight: float = 1.0) -> Array:
  """Half the squared error, summed over output dimensions, mean over the batch.

  Registers a unit-variance Gaussian, whose Fisher equals the Gauss-Newton
  matrix.

  Args:
    predictions: shape `(batch, ...)`.
    targets: the same shape.
    weight: multiplies the returned value and the registered curvature.

  Returns:
    `weight` times the batch mean of `0.5 * sum((predictions - targets)**2)`.
  """
  predictions = _float(register_gaussian_predictive(predictions, targets, weight))
  return weight * 0.5 * jnp.sum((predictions - targets) ** 2) / predictions.shape[0]
