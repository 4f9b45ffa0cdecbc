# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""How close the block-diagonal and block-tridiagonal inverses come to the exact
natural gradient (K-FAC section 4.3), on small networks where the exact
Fisher can be formed.

For each network and damping, on one batch in float64 with exact
statistics (`mode="exact"`): the exact update `(F + λ I)^{-1} ∇h` (F the
exact Fisher of the batch, formed densely from per-example Jacobians), and
jkfac's two approximations with the same λ (factored Tikhonov damping);
reported as the cosine similarity of each to the exact update, at the
initial parameters and after 50 steps of Adam. λ is given relative to the
Fisher's mean eigenvalue `tr(F) / dim`, so that it means the same at both
points.

    python benchmarks/tridiagonal_similarity.py     # about a minute

Results: `benchmarks/results/local/tridiagonal_similarity.json` (git-ignored),
or `--out PATH_STEM`; the committed results were written with
`--out benchmarks/results/tridiagonal_similarity`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.flatten_util  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax

import jkfac

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position
NETWORKS = {  # name: (layer sizes, loss)
    "classifier 6-12-12-4": ((6, 12, 12, 4), "softmax"),
    "classifier 10-20-20-20-3": ((10, 20, 20, 20, 3), "softmax"),
    "autoencoder 12-8-4-8-12": ((12, 8, 4, 8, 12), "squared"),
}
RELATIVE_DAMPINGS = (1e-3, 1e-2)
EXAMPLES = 256


def _init(key, sizes):
  params = {}
  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, sub = jax.random.split(key)
    params[f"l{i}"] = {"w": jax.random.normal(sub, (fan_in, fan_out)) / np.sqrt(fan_in),
                       "b": jnp.zeros(fan_out)}
  return params


def _forward(params, x):
  for i in range(len(params)):
    x = x @ params[f"l{i}"]["w"] + params[f"l{i}"]["b"]
    x = jnp.tanh(x) if i < len(params) - 1 else x
  return x


def _task(sizes, loss, key):
  """Inputs, targets from a random teacher network, and the jkfac loss."""
  kx, kt = jax.random.split(key)
  x = jax.random.normal(kx, (EXAMPLES, sizes[0]))
  if loss == "softmax":
    y = jnp.argmax(_forward(_init(kt, sizes), x), axis=-1)
    return x, y, lambda p, x, y: jkfac.softmax_cross_entropy(_forward(p, x), y)
  return x, x, lambda p, x, y: jkfac.squared_error(_forward(p, x), y)


def _output_fisher(loss, z):
  if loss == "softmax":
    p = jax.nn.softmax(z)
    return jnp.diag(p) - jnp.outer(p, p)
  return jnp.eye(z.shape[-1])


def _exact_fisher(params, x, loss):
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  jac = jax.vmap(lambda xn: jax.jacobian(lambda f: _forward(unravel(f), xn[None])[0])(flat))(x)
  h = jax.vmap(lambda z: _output_fisher(loss, z))(_forward(params, x))
  return np.asarray(jnp.einsum("nci,ncd,ndj->ij", jac, h, jac) / x.shape[0])


def _cosine(a, b):
  return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def compare(loss, params, x, y, loss_fn, relative_damping):
  est = jkfac.estimator(loss_fn, params, x, y, mode="exact")
  _, grads, _ = est(params, x, y)
  fisher = _exact_fisher(params, x, loss)
  damping = relative_damping * np.trace(fisher) / len(fisher)
  flat_grad = jax.flatten_util.ravel_pytree(grads)[0]
  exact = np.linalg.solve(fisher + damping * np.eye(len(fisher)), flat_grad)
  out = {"damping": float(damping)}
  for structure in ("block_diagonal", "block_tridiagonal"):
    tx = jkfac.scale_by_kfac(est, damping=damping, structure=structure)
    _, grads, stats = est(params, x, y)  # after the transform asked for cross moments
    update, _ = tx.update(grads, tx.init(params), params, stats=stats)
    out[structure] = _cosine(jax.flatten_util.ravel_pytree(update)[0], exact)
  out["gradient"] = _cosine(jax.flatten_util.ravel_pytree(grads)[0], exact)
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=harness.HelpFormatter)
  harness.add_out_argument(parser, "tridiagonal_similarity", plot=False)
  args = parser.parse_args(argv)
  out = harness.with_suffix(harness.output_stem(args.out, "tridiagonal_similarity"), ".json")
  rows = []
  for index, (name, (sizes, loss)) in enumerate(NETWORKS.items()):
    key = jax.random.PRNGKey(index)
    params = _init(key, sizes)
    x, y, loss_fn = _task(sizes, loss, jax.random.fold_in(key, 1))
    adam = optax.adam(1e-2)
    state = adam.init(params)
    trained = params
    for _ in range(50):
      grads = jax.grad(lambda p: loss_fn(p, x, y))(trained)
      updates, state = adam.update(grads, state)
      trained = optax.apply_updates(trained, updates)
    for point, p in (("initial", params), ("after 50 Adam steps", trained)):
      for relative in RELATIVE_DAMPINGS:
        result = compare(loss, p, x, y, loss_fn, relative)
        rows.append(dict(network=name, parameters=point, relative_damping=relative, **result))
        print(f"{name:<26} {point:<20} λ={relative:g} tr(F)/dim: cosine to the exact update: "
              f"block-diagonal {result['block_diagonal']:.4f}, block-tridiagonal "
              f"{result['block_tridiagonal']:.4f} (gradient {result['gradient']:.4f})",
              flush=True)
  out.write_text(json.dumps(dict(benchmark="tridiagonal_similarity", examples=EXAMPLES,
                                 jax=jax.__version__, rows=rows), indent=1))
  print(f"wrote {out}")


if __name__ == "__main__":
  sys.exit(main())
