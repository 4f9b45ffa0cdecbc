# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Where a jkfac step's time goes, next to Adam's step and the arithmetic floor.

For each model and batch size, every part is compiled on its own and timed
(median of repeats, interleaved so that machine noise hits all parts alike):

- forward and backward alone (`jax.value_and_grad` of the plain objective);
- the estimator (`est`): the same plus the curvature statistics;
- the factor moving averages, the inverse refresh, the preconditioning;
- the whole jkfac step without and with an inverse refresh, and Adam's step;
- the first step of jkfac and of Adam (tracing and compiling included).

The floor of each part is its floating-point operation count (`flops.py`)
divided by this machine's measured float32 matrix-multiply throughput.

`--transformer` times the language model of `lm_pydocs.py` instead (its
sizes from the same options: `--width`, `--depth`, ...; blocks stacked by
`nn.scan`), part by part against AdamW's step: the forward and backward
passes, the estimator with statistics on the whole batch and on the
adaptive run's fraction (`--kfac-fraction`; K-FAC-expand and -reduce), the
preconditioner's update without and with an inverse refresh, the quadratic
model's curvature products, and the whole steps, fixed and adaptive.

    python benchmarks/step_cost.py [--quick]
    python benchmarks/step_cost.py --transformer [--width 256 ...]

Results: `benchmarks/results/local/step_cost.json` and `.png` (git-ignored),
or `--out PATH_STEM`; the committed results were written with
`--out benchmarks/results/step_cost`.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time
from typing import Any, Callable

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import optax

import autoencoder
import flops
import harness
import jkfac
from jkfac import blocks
from jkfac.damping import Damping

MODELS = {
    "autoencoder": autoencoder.SIZES,
    "wide_mlp": (784, 2048, 2048, 2048, 784),
}


def matmul_throughput(n: int = 2048, repeats: int = 10) -> float:
  """Measured float32 matrix-multiply operations per second."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n ** 3 / float(np.median(times))


def _first_call(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def measure(sizes: tuple[int, ...], batch: int, repeats: int, stats_fraction: float,
            inverse_every: int) -> dict[str, Any]:
  """Times every part for one model and batch size."""
  key = jax.random.PRNGKey(0)
  params = autoencoder.init_params(key, sizes)
  images = jax.random.uniform(key, (batch, sizes[0]), jnp.float32)
  objective = functools.partial(autoencoder.objective, activation="tanh")
  loss_fn = functools.partial(autoencoder.jkfac_objective, activation="tanh")
  est = jkfac.estimator(loss_fn, params, images, stats_fraction=stats_fraction)
  damping = 1.0
  kfac_tx = jkfac.kfac(est, learning_rate=1e-3, momentum=0.9, damping=damping,
                       inverse_every=10 ** 9, inverse_warmup=0)
  refresh_tx = jkfac.kfac(est, learning_rate=1e-3, momentum=0.9, damping=damping,
                          inverse_every=1, inverse_warmup=0)
  adam_tx = optax.adam(1e-3)

  def kfac_step(tx, params, state, batch, key):
    loss, grads, stats = est(params, batch, rng=key)
    updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state, loss

  def adam_step(params, state, batch):
    loss, grads = jax.value_and_grad(objective)(params, batch)
    updates, state = adam_tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  step = jax.jit(functools.partial(kfac_step, kfac_tx))
  refresh_step = jax.jit(functools.partial(kfac_step, refresh_tx))
  adam = jax.jit(adam_step)
  first = {
      "jkfac": _first_call(lambda: step(params, kfac_tx.init(params), images, key)),
      "adam": _first_call(lambda: adam(params, adam_tx.init(params), images)),
  }

  _, grads, stats = jax.jit(lambda p, b, k: est(p, b, rng=k))(params, images, key)
  factors = stats.factors
  layers = {layer.name: layer for layer in est.layers}
  ema = jax.jit(lambda old, new: jax.tree.map(lambda o, n: 0.95 * o + 0.05 * n, old, new))
  lam = Damping(jnp.float32(damping))
  inverse = jax.jit(lambda f: {n: blocks.for_layer(l).refresh(l, f[n], lam)
                               for n, l in layers.items()})
  inverses = inverse(factors)
  flat_grads = jax.tree.leaves(grads)

  def precondition_all(inv, flat):
    return [blocks.for_layer(l).precondition(l, inv[n], [flat[p.index] for p in l.params])
            for n, l in layers.items()]

  kfac_state = step(params, kfac_tx.init(params), images, key)[1]
  refresh_state = refresh_step(params, refresh_tx.init(params), images, key)[1]
  adam_state = adam(params, adam_tx.init(params), images)[1]
  parts: dict[str, Callable[[], Any]] = {
      "forward_backward": functools.partial(jax.jit(jax.value_and_grad(objective)),
                                            params, images),
      "estimator": functools.partial(jax.jit(lambda p, b, k: est(p, b, rng=k)),
                                     params, images, key),
      "moving_averages": functools.partial(ema, factors, factors),
      "inverses": functools.partial(inverse, factors),
      "precondition": functools.partial(jax.jit(precondition_all), inverses, flat_grads),
      "jkfac_step": functools.partial(step, params, kfac_state, images, key),
      "jkfac_step_with_refresh": functools.partial(refresh_step, params, refresh_state,
                                                   images, key),
      "adam_step": functools.partial(adam, params, adam_state, images),
  }
  median = _median_times(parts, repeats)
  median["estimator_extra"] = median["estimator"] - median["forward_backward"]
  return dict(median_s=median, first_step_s=first)


def _median_times(parts: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
  """Each part's median time: compiled and run once first, then timed interleaved."""
  times: dict[str, list[float]] = {name: [] for name in parts}
  for fn in parts.values():
    jax.block_until_ready(fn())  # compile and warm up
  for _ in range(repeats):
    for name, fn in parts.items():  # interleaved
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


#: The transformer's settings timed: jkfac's fixed and adaptive runs of `transformer.py`.
TRANSFORMER_SETTINGS = {"fixed": dict(learning_rate=0.1, momentum=0.9, damping=0.1),
                        "adaptive": {}}


def measure_transformer(lm_argv: list[str], repeats: int) -> dict[str, Any]:
  """Times the parts of a step of `lm_pydocs.py`'s model (see the module's docstring)."""
  import datasets
  import lm_pydocs
  import transformer

  args = lm_pydocs.parse_args(lm_argv)
  model = lm_pydocs.make_model(args)
  batch = tuple(jnp.asarray(a) for a in lm_pydocs.batches(
      args, datasets.load_pydocs("valid", data_dir=args.data_dir))(0))
  params = model.init(jax.random.PRNGKey(0), batch[0][:2])["params"]
  key = jax.random.PRNGKey(1)
  apply = lambda p, x: model.apply({"params": p}, x)
  loss_fn = lambda p, t, y: jkfac.softmax_cross_entropy(apply(p, t), y)
  objective = lambda p, t, y: transformer.cross_entropy(apply(p, t), y)
  run_est = lambda est: jax.jit(lambda p, t, y, k: est(p, t, y, rng=k))
  parts: dict[str, Callable[[], Any]] = {
      "forward_backward": functools.partial(jax.jit(jax.value_and_grad(objective)), params,
                                            *batch)}
  for sharing in ("expand", "reduce"):
    for fraction in (1.0, args.kfac_fraction):
      est = jkfac.estimator(loss_fn, params, *batch, stats_fraction=fraction,
                            weight_sharing=sharing)
      parts[f"estimator_{sharing}_stats_{fraction:g}"] = functools.partial(
          run_est(est), params, *batch, key)
  fractions = transformer.adaptive_fractions(args)
  est = jkfac.estimator(loss_fn, params, *batch, **fractions)
  _, grads, stats = run_est(est)(params, *batch, key)
  parts["curvature_products"] = functools.partial(
      jax.jit(lambda s, v: s.extras["curvature"](v)), stats, [grads, grads])
  first = {}
  for label, settings in TRANSFORMER_SETTINGS.items():
    for every, suffix in ((10 ** 9, ""), (1, "_with_refresh")):
      tx = jkfac.kfac(est, inverse_every=every, inverse_warmup=0, **settings)

      def step(p, state, b, k, tx=tx):
        loss, g, s = est(p, *b, rng=k)
        updates, state = tx.update(g, state, p, stats=s)
        return optax.apply_updates(p, updates), state, loss

      update = jax.jit(lambda g, state, p, s, tx=tx: tx.update(g, state, p, stats=s))
      state = update(grads, tx.init(params), params, stats)[1]
      step = jax.jit(step)
      if not suffix:
        first[f"jkfac_{label}"] = _first_call(lambda: step(params, tx.init(params), batch, key))
      parts[f"update_{label}{suffix}"] = functools.partial(update, grads, state, params, stats)
      parts[f"step_{label}{suffix}"] = functools.partial(step, params, state, batch, key)
  adamw = transformer.make_step(dict(kind="adam", learning_rate=1e-3), args, apply, params,
                                batch)
  first["adamw"] = _first_call(lambda: adamw[1](params, adamw[0](params), batch, key))
  parts["adamw_step"] = functools.partial(adamw[1], params, adamw[0](params), batch, key)
  return dict(model=f"lm_pydocs width {args.width} depth {args.depth}",
              batch=f"{args.batch_size} x {args.sequence}", settings=fractions,
              median_s=_median_times(parts, repeats), first_step_s=first)


def report_transformer(r: dict[str, Any], inverse_every: int) -> None:
  m = r["median_s"]
  print(f"\n{r['model']}, batch {r['batch']} ({r['settings']}): first step "
        + ", ".join(f"{name} {t:.1f} s" for name, t in r["first_step_s"].items()))
  print(f"  {'part':<34}{'measured (ms)':>14}{'x adamw step':>14}")
  for name, t in m.items():
    print(f"  {name:<34}{1e3 * t:14.1f}{t / m['adamw_step']:14.2f}")
  for label in TRANSFORMER_SETTINGS:
    refresh = m[f"step_{label}_with_refresh"] - m[f"step_{label}"]
    amortised = m[f"step_{label}"] + refresh / inverse_every
    print(f"  jkfac {label} step, a refresh every {inverse_every} amortised: "
          f"{1e3 * amortised:.1f} ms = {amortised / m['adamw_step']:.2f}x AdamW's", flush=True)


def floors(sizes: tuple[int, ...], batch: int, stats_fraction: float, inverse_every: int,
           throughput: float) -> dict[str, float]:
  layers = list(zip(sizes[:-1], sizes[1:]))
  stats_rows = max(1, round(batch * stats_fraction))
  parts = flops.kfac_step(layers, batch, stats_rows, inverse_every)
  fwd_bwd = parts["forward"] + parts["backward"]
  out = {
      "forward_backward": fwd_bwd,
      "estimator_extra": parts["estimator_extra"],
      "moving_averages": parts["moving_averages"],
      "inverses": flops.inverses(layers),
      "precondition": parts["precondition"],
      "jkfac_step": fwd_bwd + parts["estimator_extra"] + parts["moving_averages"]
                    + parts["precondition"],
      "adam_step": fwd_bwd + flops.adam_update(layers),
  }
  out["jkfac_step_amortised"] = out["jkfac_step"] + parts["inverses_amortised"]
  return {name: count / throughput for name, count in out.items()}


def main(argv=None) -> None:
  # No abbreviations: --batch-size is lm_pydocs.py's with --transformer, not --batch-sizes.
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=harness.HelpFormatter,
                                   allow_abbrev=False)
  parser.add_argument("--quick", action="store_true",
                      help="the autoencoder only (not the wide MLP), 5 repeats")
  parser.add_argument("--batch-sizes", default="250,1000",
                      help="comma-separated batch sizes, each measured")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed repeats of each part (default: 5 with --quick, else 15)")
  parser.add_argument("--stats-fraction", type=float, default=1.0,
                      help="fraction of the batch the curvature statistics are computed on")
  parser.add_argument("--inverse-every", type=int, default=20,
                      help="inverse refresh period, for the amortised floor")
  parser.add_argument("--transformer", action="store_true",
                      help="time lm_pydocs.py's transformer instead; the options this script "
                           "does not know go to lm_pydocs.py (--width, --depth, --sequence, ...)")
  harness.add_out_argument(parser, "step_cost, or step_cost_transformer with --transformer")
  args, lm_argv = parser.parse_known_args(argv)
  repeats = args.repeats or (5 if args.quick else 15)
  if args.transformer:
    stem = harness.output_stem(args.out, "step_cost_transformer")
    result = measure_transformer(lm_argv, repeats)
    report_transformer(result, args.inverse_every)
    json_path = harness.with_suffix(stem, ".json")
    json_path.write_text(json.dumps(dict(benchmark="step_cost_transformer",
                                         machine=harness.machine(), **result), indent=1))
    print(f"wrote {json_path}")
    return
  if lm_argv:
    parser.error(f"unrecognized arguments: {' '.join(lm_argv)} (only with --transformer)")
  stem = harness.output_stem(args.out, "step_cost")
  models = {"autoencoder": MODELS["autoencoder"]} if args.quick else MODELS
  throughput = matmul_throughput()
  print(f"float32 matmul throughput: {throughput / 1e9:.1f} GFLOP/s", flush=True)
  results = []
  for model, sizes in models.items():
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
      measured = measure(sizes, batch, repeats, args.stats_fraction, args.inverse_every)
      floor = floors(sizes, batch, args.stats_fraction, args.inverse_every, throughput)
      results.append(dict(model=model, sizes=sizes, batch=batch, floor_s=floor, **measured))
      report(results[-1])
  payload = dict(benchmark="step_cost", jax=jax.__version__, devices=[str(d) for d in jax.devices()],
                 throughput_flops=throughput, stats_fraction=args.stats_fraction,
                 inverse_every=args.inverse_every, results=results)
  json_path, png_path = harness.with_suffix(stem, ".json"), harness.with_suffix(stem, ".png")
  json_path.write_text(json.dumps(payload, indent=1))
  plot(results, png_path)
  print(f"wrote {json_path} and {png_path}")


def report(r: dict[str, Any]) -> None:
  m, f = r["median_s"], r["floor_s"]
  print(f"\n{r['model']} batch {r['batch']}: first step jkfac {r['first_step_s']['jkfac']:.2f} s, "
        f"adam {r['first_step_s']['adam']:.2f} s")
  print(f"  {'part':<26}{'measured (ms)':>14}{'floor (ms)':>12}{'x floor':>9}")
  for name in ("forward_backward", "estimator_extra", "moving_averages", "inverses",
               "precondition", "jkfac_step", "jkfac_step_with_refresh", "adam_step"):
    floor = f.get(name)
    ratio = f"{m[name] / floor:9.1f}" if floor else " " * 9
    floor_ms = f"{1e3 * floor:12.1f}" if floor else " " * 12
    print(f"  {name:<26}{1e3 * m[name]:14.1f}{floor_ms}{ratio}")
  print(f"  jkfac step / adam step: {m['jkfac_step'] / m['adam_step']:.2f} "
        f"(amortised with refresh every 20: "
        f"{(m['jkfac_step'] + m['inverses'] / 20) / m['adam_step']:.2f})", flush=True)


def plot(results: list[dict[str, Any]], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  parts = ["forward_backward", "estimator_extra", "moving_averages", "precondition"]
  fig, ax = plt.subplots(figsize=(10, 4.5))
  labels = []
  for i, r in enumerate(results):
    bottom_m = bottom_f = 0.0
    for j, part in enumerate(parts):
      color = f"C{j}"
      ax.bar(3 * i, r["median_s"][part] * 1e3, bottom=bottom_m, color=color,
             label=part if i == 0 else None)
      ax.bar(3 * i + 1, r["floor_s"][part] * 1e3, bottom=bottom_f, color=color, alpha=0.45)
      bottom_m += r["median_s"][part] * 1e3
      bottom_f += r["floor_s"][part] * 1e3
    ax.plot([3 * i - 0.4, 3 * i + 0.4], [r["median_s"]["adam_step"] * 1e3] * 2, "k--",
            label="adam step" if i == 0 else None)
    labels.append(f"{r['model']}\nbatch {r['batch']}")
  ax.set_xticks([3 * i + 0.5 for i in range(len(results))], labels)
  ax.set_ylabel("ms per step (left: measured, right: arithmetic floor)")
  ax.legend()
  ax.set_title("jkfac step: where the time goes (inverse refresh not included)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
