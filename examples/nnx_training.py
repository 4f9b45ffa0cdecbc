# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""K-FAC in a flax nnx training loop: nnx.Optimizer, nnx.jit, a masked sequence loss.

A small per-token classifier (an embedding, a dense layer mixing a token with
its predecessor, a read-out) on padded sequences of random tokens: the loss
of each sequence counts its real tokens only (`mask=`), and so does its
curvature. The model is an ordinary `nnx.Module`; jkfac sees its parameters
as `nnx.state(model, nnx.Param)` and `nnx.Optimizer` applies the updates.

Run: `python examples/nnx_training.py` (a few seconds on a CPU).
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jkfac

VOCAB, WIDTH, CLASSES, BATCH, LENGTH, STEPS = 32, 32, 4, 64, 12, 40


class Tagger(nnx.Module):
  """Predicts a class per token from the token and its predecessor."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
    self.mix = nnx.Linear(2 * WIDTH, WIDTH, rngs=rngs)
    self.out = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

  def __call__(self, tokens):
    h = self.embed(tokens)
    previous = jnp.pad(h, ((0, 0), (1, 0), (0, 0)))[:, :-1]
    return self.out(nnx.gelu(self.mix(jnp.concatenate([h, previous], axis=-1))))


def make_batch(key):
  """Padded sequences: tokens, a label per token, and the mask of real tokens."""
  k_tokens, k_lengths = jax.random.split(key)
  tokens = jax.random.randint(k_tokens, (BATCH, LENGTH), 1, VOCAB)
  labels = (tokens + jnp.pad(tokens, ((0, 0), (1, 0)))[:, :-1]) % CLASSES
  lengths = jax.random.randint(k_lengths, (BATCH, 1), 3, LENGTH + 1)
  mask = jnp.arange(LENGTH)[None, :] < lengths
  return jnp.where(mask, tokens, 0), labels, mask


def main():
  model = Tagger(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)

  def loss_fn(params, tokens, labels, mask):  # the mean over real tokens
    logits = nnx.merge(graphdef, params)(tokens)
    return jkfac.softmax_cross_entropy(logits, labels, mask=mask)

  est = jkfac.estimator(loss_fn, params, *make_batch(jax.random.key(0)))
  print(est)
  optimizer = nnx.Optimizer(model, jkfac.kfac(est), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, tokens, labels, mask, key):
    loss, grads, stats = est(nnx.state(model, nnx.Param), tokens, labels, mask, rng=key)
    optimizer.update(model, grads, stats=stats)
    return loss

  for step in range(STEPS):
    key = jax.random.key(step + 1)
    loss = train_step(model, optimizer, *make_batch(key), jax.random.fold_in(key, 1))
    if step % 10 == 0 or step == STEPS - 1:
      print(f"step {step:3d}  loss {float(loss):.4f}")
  return float(loss)


if __name__ == "__main__":
  main()
