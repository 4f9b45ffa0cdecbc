# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The predictive distributions the losses register: sampling, gradients, Fisher roots.

A distribution knows how to sample targets (mode `"fisher"`), the gradient
of the negative log-likelihood with respect to its prediction, a square root
of its Fisher matrix (mode `"exact"`: with `F_out = B B^T`, the exact Fisher
of the network is `J^T B B^T J`, one backward pass per column of `B`) and
products with that Fisher (the quadratic model). `DISTRIBUTIONS` holds them
by name.

Examples: a categorical prediction of shape `(..., classes)` has one example
per leading position; Bernoulli and Gaussian predictions of shape `(n, ...)`
have `n` examples, every other axis being output dimensions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

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

  def term_axes(self, prediction_shape: tuple[int, ...]) -> int:
    """How many leading axes of the prediction index the loss's terms.

    Args:
      prediction_shape: the shape of the prediction.

    Returns:
      The number of axes.
    """
    return len(prediction_shape) - 1 if self.example_axes is None else self.example_axes

  def num_examples(self, prediction_shape: tuple[int, ...],
                   term_axes: Optional[int] = None) -> int:
    """Returns how many terms the loss averages over.

    Args:
      prediction_shape: the shape of the prediction; its leading
        `term_axes` axes index the terms.
      term_axes: None for the distribution's own (`example_axes`); a mask
        over more leading axes makes each of their positions a term.

    Returns:
      The number of terms.
    """
    axes = self.term_axes(prediction_shape) if term_axes is None else term_axes
    return math.prod(prediction_shape[:axes])

  def variables_per_term(self, prediction_shape: tuple[int, ...],
                         term_axes: Optional[int] = None) -> int:
    """Returns how many random variables one averaged term predicts.

    Args:
      prediction_shape: the shape of the prediction.
      term_axes: as for `num_examples`.

    Returns:
      The number of variables.
    """
    axes = self.term_axes(prediction_shape) if term_axes is None else term_axes
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
