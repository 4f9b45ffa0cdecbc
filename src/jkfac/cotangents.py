# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The curvature pass's cotangents on the registered losses' predictions.

Scaled by `sqrt(weight / examples)`: the gradient of the negative
log-likelihood of sampled targets (mode `"fisher"`), of the data's targets
(`"empirical"`), or the columns of the predictive distribution's Fisher square
root (`"exact"`). Pulled back through the one forward pass, they give every
layer's output derivatives `g` (Martens & Grosse, section 5).
"""

from __future__ import annotations

import itertools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from jkfac import losses, term_weights, tracing

Array = jax.Array


def cotangents(program: tracing.Program, preds: list[Array], targets: list[Array],
               weights: list[Optional[Array]], rng: Optional[Array], mode: str,
               fisher_samples: int = 1) -> list[Array]:
  """Per loss, the curvature pass's cotangents, shape `(K, *prediction)`.

  A masked loss's cotangents are scaled term by term by the square root of
  the term's weight (`term_weights.term_weights`), so that the output-side
  factors are the weighted means of the loss.

  Args:
    program: the traced program (its registered losses).
    preds: each loss's prediction.
    targets: each loss's data targets (mode `"empirical"`).
    weights: each loss's term weights, None where unmasked.
    rng: the key targets are sampled with (mode `"fisher"`).
    mode: `"fisher"`, `"empirical"` or `"exact"`.
    fisher_samples: targets sampled per example (mode `"fisher"`).

  Returns:
    Per loss, `K` cotangents stacked on a leading axis: `fisher_samples`
    samples, one for the data's targets, or the columns of the predictive
    distribution's Fisher square root (the losses' columns stacked apart,
    each backward pass one loss's column).
  """
  cots = []
  for index, (loss, pred, target, weight) in enumerate(
      zip(program.losses, preds, targets, weights)):
    dist = losses.DISTRIBUTIONS[loss.distribution]
    pred = jax.lax.stop_gradient(pred)
    scale = math.sqrt(loss.weight / loss.num_examples)
    if mode == "empirical":
      cot = dist.nll_grad(pred, target)[None]
    elif mode == "exact":
      cot = dist.fisher_sqrt(pred)
    else:
      keys = jax.random.split(jax.random.fold_in(rng, index), fisher_samples)
      cot = jax.vmap(lambda k: dist.nll_grad(pred, dist.sample(k, pred)))(keys)
      scale /= math.sqrt(fisher_samples)
    if weight is not None:
      cot = cot * term_weights.over_outputs(jnp.sqrt(weight), pred.ndim).astype(cot.dtype)
    cots.append((scale * cot).astype(pred.dtype))
  if mode == "exact" and len(cots) > 1:  # one backward pass per column, per loss
    total = sum(c.shape[0] for c in cots)
    offsets = itertools.accumulate([0] + [c.shape[0] for c in cots])
    cots = [jnp.zeros((total,) + c.shape[1:], c.dtype).at[o:o + c.shape[0]].set(c)
            for c, o in zip(cots, offsets)]
  return cots

# --- helpers --------------------------------------------------------------
