# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""What the transformer benchmarks (`lm_pydocs.py`, `vit_cifar10.py`) share.

- the pre-LayerNorm block (causal or not) and the stack of them, written as
  flax linen users write them: `nn.scan` over the blocks (as large-model code
  does), or a Python loop for kfac-jax, which finds no layer inside a scan;
- the runs: AdamW with linear warmup, cosine decay to a tenth of the peak,
  gradient clipping at norm 1 and weight decay 0.1 on the matrices, the best
  of a grid of peak learning rates (the standard baseline); jkfac adaptive;
  jkfac with the same schedule shape and fixed momentum and damping;
  kfac-jax with jkfac's fixed settings;
- each run's jitted step on a softmax cross-entropy over `(inputs, labels)`;
- the summary: the table (the metric at given steps, the typical step time
  and its ratio to AdamW's, the first step, the state's size) and the
  verdict (when each K-FAC run reached the best AdamW's final value).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import Any, Callable, Optional

import harness

ALL = ("jkfac", "jkfac_layer_scales", "jkfac_fixed", "adamw", "kfac_jax")
#: jkfac's adaptive learning rate, momentum and damping; statistics and the quadratic
#: model's curvature products on a fraction of the batch (`--kfac-fraction`, each
#: benchmark's default); an L2 term η/2 |θ|² in the loss (η = 1e-5, as the CIFAR
#: ResNet's); λ falls only where the previous step also decreased the next batch's loss
#: (`rho_on_next_batch`: on the step's own batch ρ stays near 1 while the steps fit its
#: noise along the LayerNorm-normalised weights' flat directions, and λ would fall to
#: its floor while |θ| grows); evaluated at the Polyak average of the iterates (decay
#: 0.99, the paper's section 13), which anneals the noise of a run without a
#: learning-rate schedule.
JKFAC: dict[str, Any] = dict(learning_rate=None, momentum=None, damping=None,
                             layer_scales_every=None, l2_reg=1e-5, rho_on_next_batch=True,
                             polyak=0.99)
#: The same, each layer's part of the direction scaled by the quadratic model every 10 steps.
JKFAC_LAYER_SCALES: dict[str, Any] = dict(JKFAC, layer_scales_every=10)
#: jkfac with AdamW's schedule shape (warmup, cosine decay), fixed momentum and damping.
JKFAC_FIXED: dict[str, Any] = dict(learning_rate=0.1, momentum=0.9, damping=0.1,
                                   stats_fraction=0.25, curvature_fraction=1.0, l2_reg=0.0)


def add_arguments(parser: argparse.ArgumentParser, grid: tuple[float, ...],
                  quick_lr: float, kfac_fraction: float, burn_in: int = 0) -> None:
  """The options every transformer benchmark has (optimizers, schedule, model sizes)."""
  parser.add_argument("--optimizers", default=None,
                      help=f"comma-separated subset of {','.join(ALL)} (default: all; kfac_jax "
                           "runs only where kfac-jax is installed)")
  parser.add_argument("--adamw-grid", default=None,
                      help="comma-separated peak learning rates for AdamW (default: "
                           f"{','.join(f'{lr:g}' for lr in grid)}, or {quick_lr:g} with --quick)")
  parser.add_argument("--fixed-lr", type=float, default=JKFAC_FIXED["learning_rate"],
                      help="jkfac_fixed's (and kfac-jax's) peak learning rate")
  parser.add_argument("--fixed-damping", type=float, default=JKFAC_FIXED["damping"],
                      help="jkfac_fixed's (and kfac-jax's) damping")
  parser.add_argument("--kfac-fraction", type=float, default=kfac_fraction,
                      help="the part of each batch the adaptive jkfac runs take their "
                           "statistics and quadratic-model curvature products from")
  parser.add_argument("--burn-in", type=int, default=burn_in,
                      help="estimator passes over slices of the first batch that the adaptive "
                           "jkfac runs average into their factors before the first update "
                           "(jkfac.burn_in; 1 / --kfac-fraction passes cover the batch once; "
                           "0: none)")
  parser.add_argument("--warmup", type=int, default=None,
                      help="warmup steps of the schedules (default: 5%% of the steps)")
  parser.add_argument("--width", type=int, default=128, help="model width")
  parser.add_argument("--depth", type=int, default=2, help="transformer blocks")
  parser.add_argument("--heads", type=int, default=4, help="attention heads")
  parser.add_argument("--seed", type=int, default=0,
                      help="seeds the initialisation and the data order")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def finish_arguments(args: argparse.Namespace, grid: tuple[float, ...], quick_lr: float,
                     steps: tuple[int, int], eval_every: tuple[int, int]) -> None:
  """Fills in the defaults that depend on `--quick`: (quick, full) pairs."""
  if args.steps is None:
    args.steps = steps[0] if args.quick else steps[1]
  if args.eval_every is None:
    args.eval_every = eval_every[0] if args.quick else eval_every[1]
  if args.warmup is None:
    args.warmup = max(1, args.steps // 20)
  args.grid = (tuple(float(x) for x in args.adamw_grid.split(",")) if args.adamw_grid
               else (quick_lr,) if args.quick else grid)


# --- the model ---------------------------------------------------------------

def blocks(width: int, depth: int, heads: int, causal: bool, scanned: bool):
  """`x -> x`: `depth` pre-LayerNorm blocks (self-attention, then a 4x-wide GELU MLP).

  Args:
    width: the model width.
    depth: the blocks.
    heads: attention heads.
    causal: whether each position attends only to itself and those before it.
    scanned: stack the blocks with `nn.scan` (parameters `blocks/...` with a
      leading depth axis), or call them in a Python loop (`block_<i>/...`).

  Returns:
    A flax module.
  """
  import flax.linen as nn
  import jax.numpy as jnp

  class Block(nn.Module):
    """Pre-LayerNorm: self-attention, then the MLP, each a residual branch."""

    @nn.compact
    def __call__(self, x, _):
      h = nn.LayerNorm()(x)
      mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32)) if causal else None
      x = x + nn.MultiHeadDotProductAttention(num_heads=heads)(h, h, mask=mask)
      h = nn.gelu(nn.Dense(4 * width)(nn.LayerNorm()(x)))
      return x + nn.Dense(width)(h), None

  class Stack(nn.Module):
    """The blocks, scanned or looped."""

    @nn.compact
    def __call__(self, x):
      if scanned:
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=depth)
        return stack(name="blocks")(x, None)[0]
      for i in range(depth):
        x = Block(name=f"block_{i}")(x, None)[0]
      return x

  return Stack()


def unstack(params: dict[str, Any], depth: int, path: tuple[str, ...]) -> dict[str, Any]:
  """The scanned model's parameters in the looped model's layout (the same values).

  Args:
    params: the scanned model's parameters.
    depth: the blocks.
    path: the keys leading to the stack's `blocks` entry.

  Returns:
    The parameters with `blocks` replaced by `block_0`, ..., `block_<depth-1>`.
  """
  import jax
  params = dict(params)
  if path:
    params[path[0]] = unstack(params[path[0]], depth, path[1:])
    return params
  stacked = params.pop("blocks")
  for i in range(depth):
    params[f"block_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return params


def cross_entropy(logits, labels):
  """Mean negative log-likelihood, in nats, over every example (and position)."""
  import jax
  import jax.numpy as jnp
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[..., None], axis=-1))


# --- the runs ----------------------------------------------------------------

def adaptive_fractions(args: argparse.Namespace) -> dict[str, float]:
  """The adaptive runs' `stats_fraction` and `curvature_fraction` (`--kfac-fraction`)."""
  return dict(stats_fraction=args.kfac_fraction, curvature_fraction=args.kfac_fraction)


def planned_runs(args: argparse.Namespace, kfac_jax_ok: bool) -> list[dict[str, Any]]:
  """The runs `--optimizers` asks for, AdamW's grid expanded."""
  wanted = set(args.optimizers.split(",")) if args.optimizers else set(ALL)
  unknown = wanted - set(ALL)
  if unknown:
    raise SystemExit(f"unknown optimizers {sorted(unknown)}; choose from {', '.join(ALL)}")
  fixed = dict(JKFAC_FIXED, learning_rate=args.fixed_lr, damping=args.fixed_damping)
  fractions = adaptive_fractions(args)
  runs = []
  if "jkfac" in wanted:
    runs.append(dict(name="jkfac", kind="jkfac", **JKFAC, **fractions))
  if "jkfac_layer_scales" in wanted:
    runs.append(dict(name="jkfac, layer scales", kind="jkfac", **JKFAC_LAYER_SCALES,
                     **fractions))
  if "jkfac_fixed" in wanted:
    runs.append(dict(name=f"jkfac fixed lr={args.fixed_lr:g}", kind="jkfac", **fixed))
  if "adamw" in wanted:
    runs += [dict(name=f"adamw lr={lr:g}", kind="adam", group="adamw", learning_rate=lr)
             for lr in args.grid]
  if kfac_jax_ok and "kfac_jax" in wanted:
    runs.append(dict(name=f"kfac-jax lr={args.fixed_lr:g}", kind="kfac_jax", **fixed))
  return runs


def schedule(peak: float, args: argparse.Namespace):
  """Linear warmup to `peak`, then cosine decay to `peak / 10` at the last step."""
  import optax
  return optax.warmup_cosine_decay_schedule(0.0, peak, args.warmup, args.steps, peak / 10)


def make_step(run: dict[str, Any], args: argparse.Namespace, apply: Callable, params,
              batch) -> tuple[Callable, Callable]:
  """`(init, step)` for one run: `step(params, state, (inputs, labels), key)`.

  Args:
    run: the run's description (`planned_runs`).
    args: the command line (the schedule's length and warmup).
    apply: `(params, inputs) -> logits` (`(..., classes)`, labels `(...)`).
    params: the initial parameters.
    batch: an example `(inputs, labels)`.

  Returns:
    The optimizer's `init(params)` and the step, jitted (kfac-jax's jits inside).
  """
  import jax
  import optax

  if run["kind"] == "kfac_jax":
    return _kfac_jax_step(run, args, apply, batch)
  if run["kind"] == "jkfac":
    import jkfac

    l2_reg = run["l2_reg"]

    def loss_fn(p, inputs, labels):
      loss = jkfac.softmax_cross_entropy(apply(p, inputs), labels)
      if l2_reg:
        loss += 0.5 * l2_reg * optax.tree_utils.tree_norm(p, squared=True)
      return loss

    est = jkfac.estimator(loss_fn, params, *batch, stats_fraction=run["stats_fraction"],
                          curvature_fraction=run["curvature_fraction"])
    print(est, file=sys.stderr)
    lr = run["learning_rate"]
    tx = jkfac.kfac(est, learning_rate=None if lr is None else schedule(lr, args),
                    momentum=run["momentum"], damping=run["damping"], l2_reg=l2_reg,
                    layer_scales_every=run.get("layer_scales_every"),
                    rho_on_next_batch=run.get("rho_on_next_batch", False))

    averaging = jkfac.polyak_average(run["polyak"]) if run.get("polyak") else None

    @jax.jit
    def step(p, state, batch, key):
      opt_state, averages = state
      loss, grads, stats = est(p, *batch, rng=key)
      updates, opt_state = tx.update(grads, opt_state, p, stats=stats)
      p = optax.apply_updates(p, updates)
      if averaging is not None:
        averages = averaging.update(averages, p)
      return p, (opt_state, averages), loss

    if args.burn_in and lr is None:
      step = harness.burning_in_first(step, lambda p, b, k: est(p, *b, rng=k)[2], args.burn_in)
    return lambda p: (tx.init(p), averaging.init(p) if averaging else None), step

  matrices = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule(run["learning_rate"], args), b1=0.9, b2=0.95,
                               weight_decay=0.1, mask=matrices))

  @jax.jit
  def adam_step(p, state, batch, key):
    del key
    loss, grads = jax.value_and_grad(lambda p: cross_entropy(apply(p, batch[0]), batch[1]))(p)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state, loss
  return tx.init, adam_step


def evaluated(run: dict[str, Any]) -> Optional[Callable[[Any, Any], Any]]:
  """`(params, state) -> the parameters to evaluate`: the Polyak average where the
  run keeps one (`harness.train_loop`'s `evaluated`), else None."""
  if not run.get("polyak"):
    return None
  import jkfac
  return lambda params, state: jkfac.averaged_params(state[1], params)


def _kfac_jax_step(run: dict[str, Any], args: argparse.Namespace, apply: Callable, batch):
  """kfac-jax with jkfac's fixed run's schedule, momentum and damping."""
  import jax
  import kfac_jax
  import kfac_jax_runner

  def loss(p, batch):
    logits = apply(p, batch[0])
    kfac_jax.register_softmax_cross_entropy_loss(logits.reshape(-1, logits.shape[-1]),
                                                 batch[1].reshape(-1))
    return cross_entropy(logits, batch[1])

  settings = dict(use_adaptive_learning_rate=False, use_adaptive_momentum=False,
                  use_adaptive_damping=False, inverse_update_period=20, num_burnin_steps=0,
                  curvature_ema=0.95, l2_reg=0.0, value_func_has_aux=False,
                  value_func_has_state=False, value_func_has_rng=False, multi_device=False,
                  learning_rate_schedule=schedule(run["learning_rate"], args))
  optimizer = kfac_jax.Optimizer(value_and_grad_func=jax.value_and_grad(loss), **settings)
  runner = kfac_jax_runner.Runner(optimizer, adaptive=False, settings=settings,
                                  momentum=run["momentum"], damping=run["damping"])
  return (lambda p: runner.init(p, batch)), runner.step


# --- the summary -------------------------------------------------------------

def summarise(records: list[dict[str, Any]], args: argparse.Namespace, metric: str,
              describe: str) -> dict[str, Any]:
  """The table, the ratios to the best AdamW, the failed runs and the verdict."""
  best = harness.best_of_groups(records, metric)
  marks = sorted({s for s in (args.steps // 10, args.steps // 4, args.steps // 2, args.steps)
                  if s > 0})
  table = [dict(optimizer=r["name"],
                **{f"at_{s}": harness.value_at(r, metric, s) for s in marks},
                median_step_s=r["median_step_s"], typical_step_s=harness.typical_step_s(r),
                first_step_s=r["first_step_s"], compile_s=r.get("compile_s"),
                state_mb=r["state_bytes"] / 2**20, peak_rss_mb=r["peak_rss_mb"])
           for r in sorted(best.values(), key=lambda r: r[metric][-1])]
  summary: dict[str, Any] = dict(
      metric=metric, best={g: r["name"] for g, r in best.items()}, marks=marks, table=table,
      failed={r["name"]: r["error"] for r in records if "error" in r},
      diverged={r["name"]: r["diverged_at"] for r in records if "diverged_at" in r})
  if "adamw" in best:
    adam = best["adamw"]
    summary["step_time_vs_adamw"] = {r["name"]: harness.typical_step_s(r)
                                     / harness.typical_step_s(adam) for r in best.values()}
    summary["first_step_vs_adamw"] = {r["name"]: r["first_step_s"] / adam["first_step_s"]
                                      for r in best.values()}
  summary["verdict"] = harness.verdict(best, metric, describe)
  return summary


def print_summary(summary: dict[str, Any], label: str) -> None:
  """The table, the failed runs and the verdict, as text."""
  marks = summary["marks"]
  print("\n  optimizer               " + "".join(f"{label + '@' + str(s):>11}" for s in marks)
        + "  step (s)  vs adamw  first step (s)  state (MB)")
  for row in summary["table"]:
    ratio = summary.get("step_time_vs_adamw", {}).get(row["optimizer"], float("nan"))
    values = "".join(f"{row[f'at_{s}']:>11.4g}" if row[f"at_{s}"] is not None
                     else f"{'-':>11}" for s in marks)
    print(f"  {row['optimizer']:<24}{values}{row['typical_step_s']:>10.3f}{ratio:>10.2f}"
          f"{row['first_step_s']:>16.1f}{row['state_mb']:>12.1f}")
  for name, error in summary["failed"].items():
    print(f"  {name}: failed: {error}")
  for name, step in summary["diverged"].items():
    print(f"  {name}: diverged at step {step}")
  print("\nVerdict:")
  for line in summary["verdict"]["lines"]:
    print("  " + "\n    ".join(textwrap.wrap(line, 104)))


def run_benchmark(script: str, argv: list[str], args: argparse.Namespace, name: str,
                  header: str, metric: tuple[str, str, str], title: str) -> None:
  """Runs every planned run in its own process; writes the JSON and the PNG; prints.

  Args:
    script: the benchmark's file (run again with `--worker` for each run).
    argv: its command line.
    args: the parsed command line.
    name: the benchmark's name (`<name>[_quick]` is the default output stem).
    header: the first line printed.
    metric: `(key, label in the table, description)` of the metric runs are judged by.
    title: the plot's title.
  """
  kfac_jax_ok, note = harness.kfac_jax_status()
  runs = planned_runs(args, kfac_jax_ok)
  print(f"{header}; {len(runs)} runs: {', '.join(r['name'] for r in runs)}", flush=True)
  if not kfac_jax_ok:
    print(f"kfac-jax not run (it is optional: {harness.KFAC_JAX_INSTALL}): {note}", flush=True)
  stem = harness.output_stem(args.out, name + ("_quick" if args.quick else ""))
  json_path, png_path = harness.with_suffix(stem, ".json"), harness.with_suffix(stem, ".png")
  print(f"results will be written to {json_path} and {png_path}", flush=True)
  records = harness.run_all(script, runs, argv)
  key, label, describe = metric
  summary = summarise(records, args, key, describe)
  result = dict(benchmark=name, args=vars(args), machine=harness.machine({"kfac_jax": note}),
                runs=records, summary=summary)
  json_path.write_text(json.dumps(result, indent=1))
  best = [r for r in records if r.get("name") in summary["best"].values()]
  harness.plot(best, [(key, describe, False)], png_path, title)
  print_summary(summary, label)
  print(f"\nwrote {json_path} and {png_path}")
