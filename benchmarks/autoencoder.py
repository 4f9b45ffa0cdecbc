# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The K-FAC paper's MNIST deep autoencoder, in plain JAX.

784-1000-500-250-30-250-500-1000-784 (Hinton & Salakhutdinov 2006; Martens &
Grosse 2015, section 13): tanh (or logistic) hidden units, a linear code
layer, logistic outputs with Bernoulli cross-entropy summed over pixels,
averaged over the batch, and an L2 penalty of 1e-5. The model runs in the
parameters' dtype; the loss and the penalty are computed in float32 whatever
it is (as jkfac's losses are), since their sums over pixels and weights
overflow float16.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

import jkfac

SIZES = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
CODE_LAYER = 3  # the 250 -> 30 layer has a linear output
L2 = 1e-5

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid}


def init_params(key: jax.Array, sizes=SIZES, dtype=jnp.float32) -> list[dict[str, jax.Array]]:
  """Truncated-normal weights with standard deviation 1/sqrt(fan_in) and zero
  biases (haiku's `Linear` default, as in kfac-jax's autoencoder example)."""
  params = []
  for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
    key, sub = jax.random.split(key)
    w = jax.random.truncated_normal(sub, -2.0, 2.0, (fan_in, fan_out), dtype)
    params.append({"w": w / jnp.sqrt(fan_in).astype(dtype), "b": jnp.zeros((fan_out,), dtype)})
  return params


def logits(params, images: jax.Array, activation: str = "tanh") -> jax.Array:
  """The reconstruction's logits."""
  act = ACTIVATIONS[activation]
  h = images
  last = len(params) - 1
  for i, layer in enumerate(params):
    h = h @ layer["w"] + layer["b"]
    if i != last and i != CODE_LAYER:
      h = act(h)
  return h


def data_loss(params, images: jax.Array, activation: str = "tanh") -> jax.Array:
  """Bernoulli cross-entropy, summed over pixels, mean over the batch (plain)."""
  z = logits(params, images, activation).astype(jnp.float32)
  images = images.astype(jnp.float32)
  per_pixel = jnp.maximum(z, 0) - z * images + jnp.log1p(jnp.exp(-jnp.abs(z)))
  return jnp.sum(per_pixel) / images.shape[0]


def l2_penalty(params) -> jax.Array:
  return 0.5 * L2 * sum(jnp.sum(jnp.square(l["w"].astype(jnp.float32))) for l in params)


def objective(params, images: jax.Array, activation: str = "tanh") -> jax.Array:
  """The training objective: data loss plus L2, without jkfac tags."""
  return data_loss(params, images, activation) + l2_penalty(params)


def jkfac_objective(params, images: jax.Array, activation: str = "tanh") -> jax.Array:
  """The same objective with the loss registered for jkfac."""
  z = logits(params, images, activation)
  return jkfac.sigmoid_cross_entropy(z, images) + l2_penalty(params)
