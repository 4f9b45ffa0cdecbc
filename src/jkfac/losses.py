# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Loss functions that register their predictive distribution.

Each loss returns the batch mean of the per-example negative log-likelihood
and tags its prediction in the traced graph (`tags.loss_tag`), so that the
estimator knows the model's predictive distribution `p(y|x)`
(`jkfac.distributions`: sampling, gradients and Fisher square roots).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jkfac import tags
from jkfac.distributions import (BERNOULLI, CATEGORICAL, DISTRIBUTIONS,  # noqa: F401
                                 GAUSSIAN, Distribution, _float)

Array = jax.Array


def register_categorical_predictive(logits: Array, labels: Array,
                                    weight: float = 1.0,
                                    mask: Optional[Array] = None) -> Array:
  """Registers a categorical distribution `softmax(logits)` over integer labels.

  Args:
    logits: shape `(..., classes)`.
    labels: integer labels, shape `logits.shape[:-1]`.
    weight: the loss's coefficient in the total loss.
    mask: None, or non-negative weights of the examples or positions,
      shaped as leading axes of `labels` (`(batch,)`, `(batch, positions)`);
      the loss computed from the logits is then `sum(mask * nll) /
      sum(mask)` (see `softmax_cross_entropy`), and so is its curvature.

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
  return tags.loss_tag(logits, labels, distribution="categorical", weight=weight,
                       mask=_term_mask("softmax_cross_entropy", mask, logits, True))


def register_bernoulli_predictive(logits: Array, targets: Array,
                                  weight: float = 1.0,
                                  mask: Optional[Array] = None) -> Array:
  """Registers independent Bernoulli outputs `sigmoid(logits)`.

  Args:
    logits: shape `(batch, ...)`.
    targets: values in [0, 1], the same shape.
    weight: the loss's coefficient in the total loss.
    mask: None, or non-negative weights shaped as leading axes of `logits`:
      each of their positions is a term, its outputs summed (see
      `sigmoid_cross_entropy`).

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
  return tags.loss_tag(logits, targets, distribution="bernoulli", weight=weight,
                       mask=_term_mask("sigmoid_cross_entropy", mask, logits, False))


def register_gaussian_predictive(mean: Array, targets: Array,
                                 weight: float = 1.0,
                                 mask: Optional[Array] = None) -> Array:
  """Registers a unit-variance Gaussian with the given mean.

  Args:
    mean: shape `(batch, ...)`.
    targets: the same shape.
    weight: the loss's coefficient in the total loss.
    mask: None, or non-negative weights shaped as leading axes of `mean`
      (see `squared_error`).

  Returns:
    `mean`, unchanged.
  """
  _check_same_shape("squared_error", mean, targets)
  return tags.loss_tag(mean, targets, distribution="gaussian", weight=weight,
                       mask=_term_mask("squared_error", mask, mean, False))


def _term_mask(name: str, mask: Optional[Array], prediction: Array,
               classes_last: bool) -> Optional[Array]:
  """The mask as float weights of the loss's terms, or None.

  The terms are the prediction's positions over the mask's axes (all but
  the class axis for a categorical prediction, the mask broadcast over the
  others); a mask already in that shape comes back unchanged.
  """
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  mask = mask.reshape(1) if mask.ndim == 0 else mask  # one weight for every term
  limit = prediction.ndim - 1 if classes_last else prediction.ndim
  if not (1 <= mask.ndim <= limit) or any(
      m not in (1, p) for m, p in zip(mask.shape, prediction.shape)):
    raise ValueError(
        f"{name}: mask has shape {mask.shape}, but it weighs the loss's terms and must be "
        f"shaped as leading axes of the prediction {prediction.shape}"
        + (" without its class axis" if classes_last else "") + ": (batch,) to weigh "
        "examples, (batch, positions) to weigh tokens. Reshape it, e.g. "
        "mask.reshape(batch, -1), or drop its trailing size-1 axes.")
  if not (jnp.issubdtype(mask.dtype, jnp.number) or mask.dtype == jnp.bool_):
    raise TypeError(f"{name}: mask must be boolean or numeric, got dtype {mask.dtype}.")
  low, _ = _concrete_range(mask)
  if low is not None and low < 0:
    raise ValueError(f"{name}: mask must be non-negative (weights, 0 to leave a term out), "
                     f"got values down to {low}.")
  axes = limit if classes_last else mask.ndim
  mask = mask.reshape(mask.shape + (1,) * (axes - mask.ndim))
  dtype = _float(prediction).dtype
  return jnp.broadcast_to(mask, prediction.shape[:axes]).astype(dtype)


def _weighted_mean(nll: Array, mask: Optional[Array]) -> Array:
  """`sum(mask * nll) / sum(mask)` over the terms (0 if every weight is 0).

  Args:
    nll: the per-term negative log-likelihoods, summed over the outputs of
      a term, shaped as the mask (or the examples, without one).
    mask: the term weights from `_term_mask`, or None for the mean.

  Returns:
    A scalar.
  """
  if mask is None:
    return jnp.mean(nll)
  return jnp.sum(mask * nll) / mask_total(mask)


def mask_total(mask: Array) -> Array:
  """The divisor of a masked loss: `sum(mask)`, or 1 when every weight is 0.

  The estimator scales the curvature's term weights by the same divisor, so
  that the curvature is that of the loss as computed here.

  Args:
    mask: a masked loss's term weights.

  Returns:
    A scalar.
  """
  total = jnp.sum(mask)
  return jnp.where(total > 0, total, 1)


def _summed_to_terms(per_element: Array, mask: Optional[Array]) -> Array:
  """Elementwise losses summed over each term's outputs (examples without a mask)."""
  axes = 1 if mask is None else mask.ndim
  return jnp.sum(per_element.reshape(per_element.shape[:axes] + (-1,)), axis=-1)


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


def softmax_cross_entropy(logits: Array, labels: Array, weight: float = 1.0,
                          mask: Optional[Array] = None) -> Array:
  """Mean negative log-likelihood of integer labels under `softmax(logits)`.

  Registers a categorical predictive distribution (K-FAC, section 2).

  Args:
    logits: shape `(..., classes)`.
    labels: integer labels in `[0, classes)`, shape `logits.shape[:-1]`. Out
      of range labels are refused in an eager call; under `jit` and inside
      `est` they cannot be checked without a host sync and give a NaN loss.
    weight: multiplies the returned value and the registered curvature.
    mask: None, or non-negative weights (boolean or float, traced under
      `jit` as any argument) shaped as leading axes of `labels`: `(batch,)`
      weighs examples, `(batch, positions)` tokens (padding 0). The loss is
      then `sum(mask * nll) / sum(mask)` over the positions, the mask
      broadcast over the axes it lacks, and the statistics weigh every term
      the same way: a term of weight 0 contributes nothing to the loss, the
      gradient or the curvature.

  Returns:
    `weight` times the mean (weighted by `mask`) over examples and positions
    of `-log softmax(logits)[label]`.
  """
  mask = _term_mask("softmax_cross_entropy", mask, logits, True)
  logits = _float(register_categorical_predictive(logits, labels, weight, mask))
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
  return weight * _weighted_mean(nll, mask)


def sigmoid_cross_entropy(logits: Array, targets: Array, weight: float = 1.0,
                          mask: Optional[Array] = None) -> Array:
  """Bernoulli cross-entropy, summed over output dimensions, mean over the batch.

  Registers independent Bernoulli outputs `sigmoid(logits)`.

  Args:
    logits: shape `(batch, ...)`.
    targets: values in [0, 1], the same shape.
    weight: multiplies the returned value and the registered curvature.
    mask: None, or non-negative weights shaped as leading axes of `logits`
      (`(batch,)`, `(batch, positions)`, ...): each position of the mask is
      a term, the cross-entropy summed over its remaining axes, and the loss
      is `sum(mask * term) / sum(mask)` (statistics weighted alike).

  Returns:
    `weight` times the batch mean of the per-example loss (the weighted
    mean of the terms with a mask).
  """
  mask = _term_mask("sigmoid_cross_entropy", mask, logits, False)
  logits = _float(register_bernoulli_predictive(logits, targets, weight, mask))
  per_element = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(
      jnp.exp(-jnp.abs(logits)))
  return weight * _weighted_mean(_summed_to_terms(per_element, mask), mask)


def squared_error(predictions: Array, targets: Array, weight: float = 1.0,
                  mask: Optional[Array] = None) -> Array:
  """Half the squared error, summed over output dimensions, mean over the batch.

  Registers a unit-variance Gaussian, whose Fisher equals the Gauss-Newton
  matrix.

  Args:
    predictions: shape `(batch, ...)`.
    targets: the same shape.
    weight: multiplies the returned value and the registered curvature.
    mask: None, or non-negative weights shaped as leading axes of
      `predictions` (e.g. `(batch, positions)` for `(batch, positions,
      features)`): each position of the mask is a term, its squared errors
      summed, and the loss is `sum(mask * term) / sum(mask)` (statistics
      weighted alike; targets at positions of weight 0 may be any finite
      value).

  Returns:
    `weight` times the batch mean of `0.5 * sum((predictions - targets)**2)`
    (the weighted mean of the terms with a mask).
  """
  mask = _term_mask("squared_error", mask, predictions, False)
  predictions = _float(register_gaussian_predictive(predictions, targets, weight, mask))
  per_element = 0.5 * (predictions - targets) ** 2
  return weight * _weighted_mean(_summed_to_terms(per_element, mask), mask)
