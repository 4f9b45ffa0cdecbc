# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""First step (trace + compile + run) of a scanned transformer against its depth.

A flax transformer whose pre-LayerNorm blocks are stacked by
`nn.scan(nn.remat(Block))`, as large-model code writes it, trained by
`jkfac.kfac` with its defaults: the first call of the jitted step (estimator,
adaptive update with an inverse refresh, parameter update) timed from the
model's initialisation, for 2 and 12 scanned layers, and 12 layers unrolled in
a Python loop. Stacked layers share one factorisation kernel per factor
shape, so the scanned model's first step should hardly grow with depth.
Each configuration runs in a fresh process (JAX's caches empty), in turns,
`--repeats` times; the medians are reported.

    python benchmarks/scan_first_step.py [--repeats 3]

Results: `benchmarks/results/local/scan_first_step.json` (git-ignored), or
`--out PATH_STEM`; the committed result was written with
`--out benchmarks/results/scan_first_step`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # pylint: disable=g-import-not-at-top

CONFIGS = ((2, True), (12, True), (12, False))


def first_step(depth: int, scanned: bool, width: int = 64) -> float:
  """Seconds from the model's initialisation to the end of the first jkfac step."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  import jkfac  # pylint: disable=g-import-not-at-top

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      h = nn.LayerNorm()(x)
      mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
      x = x + nn.MultiHeadDotProductAttention(num_heads=2)(h, h, mask=mask)
      h = nn.Dense(2 * width)(nn.LayerNorm()(x))
      return x + nn.Dense(width)(nn.gelu(h)), None

  class LM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      x = nn.Embed(64, width)(tokens)
      if scanned:
        stack = nn.scan(nn.remat(Block), variable_axes={"params": 0},
                        split_rngs={"params": True}, length=depth)
        x, _ = stack(name="blocks")(x, None)
      else:
        for i in range(depth):
          x, _ = Block(name=f"block_{i}")(x, None)
      return nn.Dense(64)(nn.LayerNorm()(x))

  key = jax.random.PRNGKey(0)
  tokens = jax.random.randint(key, (16, 32), 0, 64)
  model = LM()
  start = time.perf_counter()
  params = model.init(key, tokens)["params"]
  loss_fn = lambda p, x, y: jkfac.softmax_cross_entropy(model.apply({"params": p}, x), y)
  est = jkfac.estimator(loss_fn, params, tokens, tokens)
  tx = jkfac.kfac(est)

  @jax.jit
  def step(params, state, key):
    _, grads, stats = est(params, tokens, tokens, rng=key)
    updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state

  jax.block_until_ready(step(params, tx.init(params), key))
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=harness.HelpFormatter)
  parser.add_argument("--repeats", type=int, default=3,
                      help="fresh processes per configuration, run in turns")
  harness.add_out_argument(parser, "scan_first_step", plot=False)
  parser.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)  # depth, scanned
  args = parser.parse_args()
  if args.one:
    print(first_step(args.one[0], bool(args.one[1])))
    return
  seconds = {f"{d} {'scanned' if s else 'unrolled'}": [] for d, s in CONFIGS}
  for repeat in range(args.repeats):
    for depth, scanned in CONFIGS:
      done = subprocess.run([sys.executable, __file__, "--one", str(depth), str(int(scanned))],
                            capture_output=True, text=True, check=True)
      name = f"{depth} {'scanned' if scanned else 'unrolled'}"
      seconds[name].append(float(done.stdout.split()[-1]))
      print(f"repeat {repeat + 1}/{args.repeats}  {name:12s}  {seconds[name][-1]:.2f} s",
            flush=True)
  medians = {name: statistics.median(values) for name, values in seconds.items()}
  ratio = medians["12 scanned"] / medians["2 scanned"]
  print("median first step (s):", {k: round(v, 2) for k, v in medians.items()})
  print(f"12 scanned layers / 2 scanned layers: {ratio:.2f}x")
  out = harness.with_suffix(harness.output_stem(args.out, "scan_first_step"), ".json")
  out.write_text(json.dumps({"machine": harness.machine(), "seconds": seconds,
                             "median": medians, "ratio_12_to_2_scanned": ratio}, indent=1))
  print("wrote", out)


if __name__ == "__main__":
  main()
