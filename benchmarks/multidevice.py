# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""jkfac under `pmap` on 1, 2, 4 and 8 devices: correctness, inverse work per
device, communication, step and refresh times.

For each model (the MNIST autoencoder, the KFC-style CIFAR-10 convnet) and
device count D, the same global batch split D ways trains for a few steps
with `jkfac.kfac(est, learning_rate, momentum, damping, axis_name=...)`
(empirical statistics: deterministic, so the runs are comparable), with
the inverses spread over the devices (`spread_inverses=True`, the default)
and, for comparison, replicated. Recorded: the largest parameter difference
from D = 1 (round-off), the largest device's share of the inverse work
(cubic cost of its factorisations), the bytes each refresh gathers, and the
median step time with and without a refresh. On CPU devices that share two
cores (`XLA_FLAGS=--xla_force_host_platform_device_count=8`, set here) the
times show overheads, not speed-ups; on a machine with D accelerators they
are real.

    python benchmarks/multidevice.py            # a few minutes on 2 CPU cores
    python benchmarks/multidevice.py --quick    # smaller batches

Results: `benchmarks/results/local/multidevice[_quick].json` and `.png`
(git-ignored), or `--out PATH_STEM`; the committed results were written
with `--out benchmarks/results/multidevice`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # pylint: disable=g-import-not-at-top
import jkfac  # pylint: disable=g-import-not-at-top
from jkfac import distributed  # pylint: disable=g-import-not-at-top

COUNTS = (1, 2, 4, 8)


def _models(quick: bool, data_dir=None):
  """name -> (loss_fn, params, (inputs, labels or None), batch)."""
  import autoencoder
  import cifar10_convnet
  import datasets
  images, _ = datasets.load_mnist("train", data_dir=data_dir)
  batch = 256 if quick else 1000
  ae = (lambda p, x: autoencoder.jkfac_objective(p, x), autoencoder.init_params(
      jax.random.PRNGKey(0)), (jnp.asarray(images[:batch]),))
  cifar_x, cifar_y = datasets.load_cifar10("train", data_dir=data_dir)
  model = cifar10_convnet._flax()["kfc"]()  # pylint: disable=protected-access
  size = 64 if quick else 128
  x, y = jnp.asarray(cifar_x[:size]), jnp.asarray(cifar_y[:size])
  params = model.init(jax.random.PRNGKey(0), x[:2])["params"]
  conv = (lambda p, x, y: jkfac.softmax_cross_entropy(model.apply({"params": p}, x), y),
          params, (x, y))
  return {"mnist autoencoder": ae, "cifar-10 kfc convnet": conv}


def measure(loss_fn, params, batch, devices: int, spread: bool, steps: int):
  """Trains `steps` steps on `devices` devices; returns params and figures."""
  shard = lambda a: a.reshape((devices, -1) + a.shape[1:])
  local = tuple(a[:a.shape[0] // devices] for a in batch)
  est = jkfac.estimator(loss_fn, params, *local, mode="empirical")  # deterministic

  def make(every):
    return jkfac.kfac(est, learning_rate=0.05, momentum=0.9, damping=1.0,
                      inverse_every=every, inverse_warmup=0, axis_name="d",
                      spread_inverses=spread)

  def stepper(tx):
    def step(p, state, *args):
      _, grads, stats = est(p, *args)
      updates, state = tx.update(jax.lax.pmean(grads, "d"), state, p, stats=stats)
      return optax.apply_updates(p, updates), state
    return jax.pmap(step, axis_name="d", devices=jax.devices()[:devices])

  replicate = lambda tree: jax.tree_util.tree_map(lambda a: jnp.stack([a] * devices), tree)
  args = [shard(a) for a in batch]
  figures = {}
  for label, every in (("step_with_refresh_s", 1), ("step_without_refresh_s", 10**6)):
    tx = make(every)
    step = stepper(tx)
    p, state = replicate(params), replicate(tx.init(params))
    p, state = step(p, state, *args)  # compile (and the first refresh)
    jax.block_until_ready(p)
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      p, state = step(p, state, *args)
      jax.block_until_ready(p)
      times.append(time.perf_counter() - start)
    figures[label] = float(np.median(times))
    if every == 1:
      trained = jax.tree_util.tree_map(lambda a: np.asarray(a[0]), p)
      factors = jax.tree_util.tree_map(lambda a: a[0], state[0].factors)
  costs = [distributed.cubic_cost(factors[layer.name]) for layer in est.layers]
  shares = distributed.balanced_shares(costs, devices)
  largest = max(sum(costs[i] for i in s) for s in shares) / sum(costs)
  inverse_bytes = [sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(
      jax.tree_util.tree_map(lambda a: a[0], state[0].inverses[l.name]))) for l in est.layers]
  width = max(sum(inverse_bytes[i] for i in s) for s in shares)
  figures.update(largest_inverse_share=largest if spread else 1.0,
                 gathered_bytes_per_refresh=(width * devices) if spread and devices > 1 else 0,
                 inverse_state_bytes=sum(inverse_bytes))
  return trained, figures


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=harness.HelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="smaller batches: 256 autoencoder images (else 1,000), 64 CIFAR-10 "
                           "images (else 128)")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per setting")
  parser.add_argument("--data-dir", default=None,
                      help="folder with mnist/ and cifar-10/ subfolders ("
                           + harness.DATA_DIR_DEFAULT + ")")
  harness.add_out_argument(parser, "multidevice_quick with --quick, else multidevice")
  args = parser.parse_args(argv)
  stem = harness.output_stem(args.out, "multidevice_quick" if args.quick else "multidevice")
  rows = []
  for name, (loss_fn, params, batch) in _models(args.quick, args.data_dir).items():
    reference = None
    for devices in COUNTS:
      for spread in ((False, True) if devices > 1 else (False,)):
        trained, figures = measure(loss_fn, params, batch, devices, spread, args.steps)
        if reference is None:
          reference = trained
        difference = max(float(np.max(np.abs(a - b))) for a, b in zip(
            jax.tree_util.tree_leaves(trained), jax.tree_util.tree_leaves(reference)))
        row = dict(model=name, devices=devices, spread_inverses=spread,
                   largest_difference_from_one_device=difference, **figures)
        rows.append(row)
        print(f"{name:<22} D={devices} {'spread    ' if spread else 'replicated'} "
              f"diff {difference:.1e}  largest inverse share {row['largest_inverse_share']:.2f}"
              f"  gathered {row['gathered_bytes_per_refresh'] / 2**20:7.2f} MiB  step "
              f"{row['step_without_refresh_s']:.3f} s, with refresh "
              f"{row['step_with_refresh_s']:.3f} s", flush=True)
  json_path, png_path = harness.with_suffix(stem, ".json"), harness.with_suffix(stem, ".png")
  json_path.write_text(json.dumps(dict(
      benchmark="multidevice", args=vars(args), machine=harness.machine(), rows=rows), indent=1))
  _plot(rows, png_path)
  print(f"wrote {json_path} and {png_path}")


def _plot(rows, path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  models = sorted({r["model"] for r in rows})
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for model in models:
    for spread, style in ((True, "-o"), (False, "--s")):
      sel = [r for r in rows if r["model"] == model and (r["spread_inverses"] == spread
                                                         or r["devices"] == 1)]
      counts = [r["devices"] for r in sel]
      axes[0].plot(counts, [r["largest_inverse_share"] for r in sel], style,
                   label=f"{model}, {'spread' if spread else 'replicated'}")
      axes[1].plot(counts, [r["step_with_refresh_s"] - r["step_without_refresh_s"] for r in sel],
                   style, label=f"{model}, {'spread' if spread else 'replicated'}")
  axes[0].plot(COUNTS, [1 / d for d in COUNTS], ":", color="gray", label="1/D")
  axes[0].set(ylabel="largest device's share of the inverse work")
  axes[1].set(ylabel="refresh time (s, CPU devices sharing 2 cores)")
  for ax in axes:
    ax.set(xlabel="devices", xscale="log")
    ax.minorticks_off()
    ax.set_xticks(COUNTS, [str(c) for c in COUNTS])
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


if __name__ == "__main__":
  main()
