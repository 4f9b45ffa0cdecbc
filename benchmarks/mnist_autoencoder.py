# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The K-FAC paper's MNIST autoencoder: jkfac against optax and kfac-jax.

Every optimizer starts from the same initialisation and sees the same
batches. Each runs in its own process (so that its peak memory is its own),
one after the other on the same machine. For each it records the training
objective on a fixed subset of the training set against steps and against
seconds, the median step time, the first step's time (tracing and
compiling), the optimizer state's size and the process's peak memory. Adam
and SGD with Nesterov momentum run over a small learning-rate grid and the
best of each grid is reported. kfac-jax runs when it is importable (it needs
JAX 0.8.3).

    python benchmarks/mnist_autoencoder.py --quick     # about 4 minutes on 2 CPU cores
    python benchmarks/mnist_autoencoder.py             # the full comparison
    python benchmarks/mnist_autoencoder.py --optimizers jkfac,adam \
        --param-dtype float32,bfloat16 --steps 500     # precision, side by side
    python benchmarks/mnist_autoencoder.py --optimizers jkfac_tridiagonal,sgd
                                                       # runs outside the default set
    python benchmarks/mnist_autoencoder.py --optimizers jkfac --growing-batch \
        --steps 600                                    # the paper's growing batch, ~1 hour

The full comparison runs jkfac and kfac-jax's adaptive optimizer each from
damping 1 (jkfac's) and from 150 (kfac-jax's example's), so that neither is
handicapped, and says how many of kfac-jax's steps and how much of its time
jkfac needed to reach kfac-jax's loss at step 100 from the same damping.

It prints, for each run, when it compiles and its progress; then a table
(final loss, loss midway, step times, memory) and a verdict in words: which
optimizer reached the lowest loss, and how many times fewer steps and how
much less time jkfac (and kfac-jax) needed to reach the best Adam's final
loss. Time there is steps x the run's typical step time (the median over
20-step windows of their mean step time), so that a few steps slowed down
by other processes on a busy machine do not change the verdict.

Results: `benchmarks/results/local/mnist_autoencoder[_quick].json` and
`.png` (git-ignored; `mnist_autoencoder_precision` when several parameter
dtypes are compared, `mnist_autoencoder_<dtype>` for one other than
float32), or `--out PATH_STEM`. The committed results were written with
`--out benchmarks/results/<name>`.

`--param-dtype` sets the dtype of the parameters and of the input images
(the forward and backward passes run in it; jkfac's factors stay float32;
Adam's moments take the parameters' dtype, optax's default). Every run is
evaluated in float32, on the float32 images, with its parameters upcast, so
that the curves of different dtypes measure the same objective.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import sys
import textwrap
from typing import Any, Optional

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # pylint: disable=g-import-not-at-top

# jkfac: learning rate and momentum from the quadratic model, Levenberg-
# Marquardt damping (K-FAC sections 6-7), statistics on 1/8 of each batch,
# the quadratic model's curvature products on the whole batch (the paper's
# and jkfac's default; on 1/4 the loss levels off near 57 after 300 steps),
# inverses every 5 steps as kfac-jax's example ("jkfac_quarter_curvature":
# the cheaper step, products on 1/4 and inverses every 20), and the factors
# burned in on the first batch before the first update as kfac-jax's are
# (`jkfac.burn_in`, one estimator pass per eighth of the batch: the whole
# batch's statistics, counted as one update; inside the first step, whose
# time includes it as kfac-jax's does).
JKFAC = dict(learning_rate=None, momentum=None, damping=1.0, inverse_every=5,
             stats_fraction=0.125, curvature_fraction=1.0, burn_in=8)
# Fixed learning rate, momentum and damping, inverses every 20 steps: the
# settings at which jkfac's and kfac-jax's step times are compared.
FIXED = dict(learning_rate=0.1, momentum=0.9, damping=10.0, inverse_every=20)
ADAM_GRID = (3e-4, 1e-3, 3e-3)
SGD_GRID = (0.01, 0.03, 0.1)
QUICK_ADAM_GRID = (1e-3,)
QUICK_SGD_GRID = (0.01,)
ALL = ("jkfac", "jkfac_fixed", "jkfac_fixed_eighth", "adam", "sgd",
       "kfac_jax", "kfac_jax_fixed", "jkfac_full_stats", "jkfac_quarter_curvature",
       "jkfac_full_curvature", "jkfac_tridiagonal", "jkfac_gamma", "jkfac_damping150",
       "jkfac_ekfac", "jkfac_singd")
# Not in the default set of the full run (`--optimizers` asks for them).
OPTIONAL = ("jkfac_fixed_eighth", "sgd", "jkfac_full_stats", "jkfac_full_curvature",
            "jkfac_tridiagonal", "jkfac_gamma", "jkfac_ekfac", "jkfac_singd")
QUICK = ("jkfac", "adam", "sgd", "kfac_jax")
# kfac-jax's autoencoder example's initial damping (its adaptive damping starts
# there); the full run also starts it at jkfac's, so that neither is handicapped.
KFAC_JAX_DAMPING = 150.0
KFAC_JAX_DAMPINGS = (KFAC_JAX_DAMPING, JKFAC["damping"])
# The equal-damping comparison: the step count of kfac-jax's loss that jkfac is to reach.
EQUAL_DAMPING_STEP = 100
# The step at which the table shows the loss midway, when every run evaluated there.
MIDWAY_STEP = 200
DTYPES = ("float32", "bfloat16", "float16")
LINE_STYLES = ("solid", "dashed", "dotted")  # of the runs in each --param-dtype, in order


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=harness.HelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="150 steps, one learning rate for Adam and SGD, evaluation every 10 "
                           "steps on 5,000 images: about 4 minutes on 2 CPU cores")
  parser.add_argument("--steps", type=int, default=None,
                      help="training steps per optimizer (default: 150 with --quick, else 1000)")
  parser.add_argument("--batch-size", type=int, default=1000, help="examples per step")
  parser.add_argument("--growing-batch", action="store_true",
                      help="the paper's schedule m_k = min(m_1 exp((k-1)/b), N), full by step "
                           "500, rounded down to a ladder of sizes to bound recompilation")
  parser.add_argument("--eval-size", type=int, default=10000,
                      help="training examples in the fixed evaluation subset (at most 5000 "
                           "with --quick)")
  parser.add_argument("--eval-every", type=int, default=None,
                      help="steps between evaluations of the training objective (default: 10 "
                           "with --quick, else 20)")
  parser.add_argument("--activation", choices=("tanh", "sigmoid"), default="tanh",
                      help="hidden units")
  parser.add_argument("--fixed-steps", type=int, default=200,
                      help="steps of the fixed-settings runs (they are there for step times)")
  parser.add_argument("--optimizers", default=None,
                      help="comma-separated subset of: " + ",".join(ALL) + " (default: "
                           + ",".join(QUICK) + " with --quick, else all but "
                           + ",".join(OPTIONAL) + "; kfac_jax runs only where kfac-jax "
                           "is installed and works)")
  parser.add_argument("--kfac-jax-damping", default=None,
                      help="comma-separated initial dampings of the kfac_jax runs, one run "
                           "each (its adaptive damping starts there; 150 is kfac-jax's "
                           "example's, 1 is jkfac's; default: "
                           f"{KFAC_JAX_DAMPING:g} with --quick, else "
                           f"{','.join(f'{d:g}' for d in KFAC_JAX_DAMPINGS)})")
  parser.add_argument("--param-dtype", default="float32",
                      help="comma-separated parameter (and input) dtypes, each of "
                           f"{', '.join(DTYPES)}; every optimizer runs in each (kfac-jax "
                           "only in float32)")
  parser.add_argument("--adam-grid", default=None,
                      help="comma-separated Adam learning rates (default: "
                           f"{','.join(f'{lr:g}' for lr in QUICK_ADAM_GRID)} with --quick, else "
                           f"{','.join(f'{lr:g}' for lr in ADAM_GRID)})")
  parser.add_argument("--seed", type=int, default=0,
                      help="seeds the initialisation, the data order and the keys")
  parser.add_argument("--data-dir", default=None,
                      help="folder with the MNIST IDX files, or with an mnist/ subfolder holding "
                           "them (" + harness.DATA_DIR_DEFAULT + ")")
  harness.add_out_argument(parser, "mnist_autoencoder_quick with --quick, "
                                   "mnist_autoencoder_growing with --growing-batch, else "
                                   "mnist_autoencoder")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.steps is None:
    args.steps = 150 if args.quick else 1000
  if args.eval_every is None:
    args.eval_every = 10 if args.quick else 20
  args.kfac_jax_dampings = ((KFAC_JAX_DAMPING,) if args.quick else KFAC_JAX_DAMPINGS) if (
      args.kfac_jax_damping is None) else tuple(float(d) for d in args.kfac_jax_damping.split(","))
  if args.quick:
    args.eval_size = min(args.eval_size, 5000)
  args.param_dtypes = list(dict.fromkeys(args.param_dtype.split(",")))
  unknown = set(args.param_dtypes) - set(DTYPES)
  if unknown:
    parser.error(f"unknown --param-dtype {sorted(unknown)}; choose from {', '.join(DTYPES)}")
  return args


# --- the runs --------------------------------------------------------------

def planned_runs(args: argparse.Namespace, kfac_jax_ok: bool) -> list[dict[str, Any]]:
  """Every run, in each of `--param-dtype`'s dtypes (named with it unless float32 alone)."""
  dtypes = args.param_dtypes
  runs, groups = [], []
  for index, dtype in enumerate(dtypes):
    for run in _runs_in_float32(args, kfac_jax_ok and dtype == "float32"):
      if dtypes != ["float32"]:  # one colour per optimizer, one line style per dtype
        group = run.get("group", run["name"])
        groups += [] if group in groups else [group]
        run.update(name=f"{run['name']} ({dtype})", group=f"{group} ({dtype})",
                   plot_style=dict(color=f"C{groups.index(group) % 10}",
                                   linestyle=LINE_STYLES[index]))
      runs.append(dict(run, param_dtype=dtype))
  return runs


def _runs_in_float32(args: argparse.Namespace, kfac_jax_ok: bool) -> list[dict[str, Any]]:
  wanted = set(args.optimizers.split(",")) if args.optimizers else set(
      QUICK if args.quick else set(ALL) - set(OPTIONAL))
  unknown = wanted - set(ALL)
  if unknown:
    raise SystemExit(f"unknown optimizers {sorted(unknown)}; choose from {', '.join(ALL)}")
  fixed = dict(steps=args.fixed_steps, **FIXED)
  runs = []
  if "jkfac" in wanted:
    runs.append(dict(name="jkfac", kind="jkfac", **JKFAC))
  if "jkfac_damping150" in wanted:  # side by side with kfac-jax's example, which starts at 150
    runs.append(dict(name="jkfac from damping 150", kind="jkfac", **dict(JKFAC, damping=150.0)))
  # The earlier default runs' settings (inverses every 20), so that the commands of
  # the README's earlier tables still run what they ran.
  earlier = dict(JKFAC, inverse_every=20, burn_in=0)
  quarter = dict(earlier, curvature_fraction=0.25)
  if "jkfac_full_curvature" in wanted:
    runs.append(dict(name="jkfac full-batch curvature", kind="jkfac", **earlier))
  if "jkfac_quarter_curvature" in wanted:
    runs.append(dict(name="jkfac, curvature on 1/4, inverses every 20", kind="jkfac", **quarter))
  # Section 4.3 (the 8 dense layers are one chain) and section 6.6 (γ re-chosen
  # every T2 = 20 steps), both with the curvature products on the whole batch.
  if "jkfac_tridiagonal" in wanted:
    runs.append(dict(name="jkfac tridiagonal", kind="jkfac", **dict(
        earlier, structure="block_tridiagonal")))
  if "jkfac_gamma" in wanted:
    runs.append(dict(name="jkfac gamma T2=20", kind="jkfac", **dict(
        earlier, gamma_interval=20)))
  # Other blocks for every layer, jkfac's defaults otherwise: EK-FAC (George et
  # al. 2018) and the inverse-free SINGD factors (Lin et al. 2024).
  for block in ("ekfac", "singd"):
    if f"jkfac_{block}" in wanted:
      runs.append(dict(name=f"jkfac {block}", kind="jkfac",
                       **dict(quarter, overrides={"*": block})))
  if "jkfac_full_stats" in wanted:
    runs.append(dict(name="jkfac full-batch stats", kind="jkfac",
                     **dict(earlier, stats_fraction=1.0)))
  if "jkfac_fixed" in wanted:
    runs.append(dict(name="jkfac fixed", kind="jkfac", stats_fraction=1.0, **fixed))
  if "jkfac_fixed_eighth" in wanted:
    runs.append(dict(name="jkfac fixed, stats 1/8", kind="jkfac", stats_fraction=0.125, **fixed))
  if "adam" in wanted:
    grid = QUICK_ADAM_GRID if args.quick else ADAM_GRID
    if args.adam_grid:
      grid = tuple(float(lr) for lr in args.adam_grid.split(","))
    runs += [dict(name=f"adam lr={lr:g}", kind="adam", group="adam", learning_rate=lr)
             for lr in grid]
  if "sgd" in wanted:
    runs += [dict(name=f"sgd-nesterov lr={lr:g}", kind="sgd", group="sgd", learning_rate=lr,
                  momentum=0.9) for lr in (QUICK_SGD_GRID if args.quick else SGD_GRID)]
  if kfac_jax_ok and "kfac_jax" in wanted:
    for damping in args.kfac_jax_dampings:
      name = "kfac-jax adaptive" + ("" if damping == KFAC_JAX_DAMPING else
                                    f" from damping {damping:g}")
      runs.append(dict(name=name, kind="kfac_jax", adaptive=True, inverse_every=5,
                       initial_damping=damping))
  if kfac_jax_ok and "kfac_jax_fixed" in wanted:
    runs.append(dict(name="kfac-jax fixed", kind="kfac_jax", adaptive=False, **fixed))
  return runs


def batch_sizes(args: argparse.Namespace, n_train: int) -> list[int]:
  """The batch size of every step."""
  if not args.growing_batch:
    return [args.batch_size] * args.steps
  import jkfac
  return jkfac.growing_batch_sizes(args.batch_size, n_train, args.steps, full_at=500)


def batch_indices(args: argparse.Namespace, n_train: int) -> list[np.ndarray]:
  """One shared data order: reshuffled every epoch from the seed."""
  rng = np.random.RandomState(args.seed)
  order, position, batches = rng.permutation(n_train), 0, []
  for size in batch_sizes(args, n_train):
    if position + size > n_train:
      order, position = rng.permutation(n_train), 0
    batches.append(order[position:position + size])
    position += size
  return batches


def make_step(run: dict[str, Any], params, example_batch, activation: str):
  """Returns (init, step) for one run's optimizer."""
  import jax
  import optax
  import autoencoder

  objective = functools.partial(autoencoder.objective, activation=activation)
  if run["kind"] == "kfac_jax":
    import kfac_jax_runner
    runner = kfac_jax_runner.make_optimizer(
        params, example_batch, activation=activation, adaptive=run["adaptive"],
        learning_rate=run.get("learning_rate"), momentum=run.get("momentum"),
        damping=run.get("damping"), inverse_every=run["inverse_every"],
        initial_damping=run.get("initial_damping"))
    return runner.init, runner.step

  if run["kind"] == "jkfac":
    import jkfac
    passes = run.get("burn_in", 0)
    est = jkfac.estimator(functools.partial(autoencoder.jkfac_objective, activation=activation),
                          params, example_batch, stats_fraction=run["stats_fraction"],
                          curvature_fraction=run.get("curvature_fraction", 1.0),
                          overrides=run.get("overrides"))
    options = dict(learning_rate=run["learning_rate"], momentum=run["momentum"],
                   damping=run["damping"], l2_reg=autoencoder.L2,
                   inverse_every=run["inverse_every"],
                   structure=run.get("structure", "block_diagonal"),
                   gamma_interval=run.get("gamma_interval"))
    tx = jkfac.kfac(est, **options)
    run["optimizer_args"] = (
        "jkfac.kfac(est, " + ", ".join(f"{k}={v}" for k, v in options.items()) + "); estimator "
        f"stats_fraction={run['stats_fraction']}, "
        f"curvature_fraction={run.get('curvature_fraction', 1.0)}"
        + (f", overrides={run['overrides']}" if run.get("overrides") else "")
        + (f"; burn-in: jkfac.burn_in on {passes} slices of the first batch" if passes else ""))

    @jax.jit
    def step(params, state, batch, key):
      loss, grads, stats = est(params, batch, rng=key)
      updates, state = tx.update(grads, state, params, stats=stats)
      return optax.apply_updates(params, updates), state, loss

    if passes:
      step = harness.burning_in_first(step, lambda p, b, k: est(p, b, rng=k)[2], passes)
  else:
    if run["kind"] == "adam":
      tx = optax.adam(run["learning_rate"])
    else:
      tx = optax.sgd(run["learning_rate"], momentum=run["momentum"], nesterov=True)

    @jax.jit
    def step(params, state, batch, key):
      del key
      loss, grads = jax.value_and_grad(objective)(params, batch)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, loss

  return (lambda params, batch: tx.init(params)), step


def train(run: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
  """Trains one optimizer; returns its record."""
  import jax
  import jax.numpy as jnp
  import autoencoder
  import datasets

  images, _ = datasets.load_mnist("train", data_dir=args.data_dir)
  eval_images = jnp.asarray(images[:args.eval_size], jnp.float32)
  batches = batch_indices(args, images.shape[0])
  dtype = jnp.dtype(run.get("param_dtype", "float32"))
  # The same initial values in every dtype: drawn in float32, then rounded.
  params = jax.tree_util.tree_map(lambda a: a.astype(dtype),
                                  autoencoder.init_params(jax.random.PRNGKey(args.seed)))
  first = jnp.asarray(images[batches[0]], dtype)
  init, step = make_step(run, params, first, args.activation)
  upcast = lambda p: jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), p)
  objective = jax.jit(lambda p: autoencoder.objective(upcast(p), eval_images, args.activation))
  total = min(run.get("steps", args.steps), args.steps)
  record = harness.train_loop(run, total, step, params, init(params, first),
                              lambda k: jnp.asarray(images[batches[k]], dtype),
                              lambda p: {"loss": objective(p)}, args.eval_every, args.seed + 1)
  record.update(final_loss=record["loss"][-1],
                batch_sizes=sorted(set(int(len(b)) for b in batches[:total])))
  return record


# --- orchestration -------------------------------------------------------------

def midway_step(records: list[dict[str, Any]]) -> Optional[int]:
  """The step at which the table shows every run's loss before its end.

  Args:
    records: the runs of the table.

  Returns:
    `MIDWAY_STEP` (200) when every run was evaluated there and at least one
    ran beyond it (as in the full runs: the README's tables quote it); else
    the last step every run was evaluated at that is at most half of the
    shortest run; None when there is none (the column is then left out).
  """
  if not records:
    return None
  common = set.intersection(*(set(r["steps"]) for r in records))
  if MIDWAY_STEP in common and any(r["steps"][-1] > MIDWAY_STEP for r in records):
    return MIDWAY_STEP
  half = min(r["steps"][-1] for r in records) // 2
  early = [s for s in common if 1 < s <= half]
  return max(early) if early else None


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
  """The best of each grid, the verdict, and the figures the targets are stated in."""
  best = harness.best_of_groups(records, "loss")
  midway = midway_step(list(best.values()))
  summary: dict[str, Any] = {"best": {g: r["name"] for g, r in best.items()}, "table": [],
                             "midway_step": midway}
  for r in best.values():
    summary["table"].append(dict(optimizer=r["name"], param_dtype=r.get("param_dtype", "float32"),
                                 steps=r["steps"][-1], final_loss=r["final_loss"],
                                 loss_at_midway=None if midway is None else
                                 harness.value_at(r, "loss", midway),
                                 median_step_s=r["median_step_s"],
                                 typical_step_s=harness.typical_step_s(r),
                                 first_step_s=r["first_step_s"], compile_s=r.get("compile_s"),
                                 state_mb=r["state_bytes"] / 2**20, peak_rss_mb=r["peak_rss_mb"]))
  ratios = {}

  def ratio(name, a, b, key="median_step_s"):
    if a in best and b in best:
      ratios[name] = best[a][key] / best[b][key]

  # The adaptive kfac-jax run (kfac-jax's 150, else the first initial damping it ran from).
  kfac_jax = "kfac-jax adaptive" if "kfac-jax adaptive" in best else next(
      (g for g, r in best.items() if r.get("kind") == "kfac_jax" and r.get("adaptive")),
      "kfac-jax adaptive")
  ratio("jkfac fixed / kfac-jax fixed, step", "jkfac fixed", "kfac-jax fixed")
  ratio("jkfac fixed stats 1/8 / adam, step", "jkfac fixed, stats 1/8", "adam")
  ratio("jkfac fixed / adam, step", "jkfac fixed", "adam")
  ratio("jkfac / kfac-jax adaptive, step", "jkfac", kfac_jax)
  ratio("jkfac curvature 1/4 / kfac-jax adaptive, step",
        "jkfac, curvature on 1/4, inverses every 20", kfac_jax)
  ratio("jkfac tridiagonal / kfac-jax adaptive, step", "jkfac tridiagonal", kfac_jax)
  ratio("jkfac gamma T2=20 / kfac-jax adaptive, step", "jkfac gamma T2=20", kfac_jax)
  ratio("jkfac from damping 150 / kfac-jax adaptive, step", "jkfac from damping 150", kfac_jax)
  ratio("jkfac / adam, step", "jkfac", "adam")
  ratio("jkfac ekfac / jkfac, step", "jkfac ekfac", "jkfac")
  ratio("jkfac singd / jkfac, step", "jkfac singd", "jkfac")
  ratio("jkfac / adam, first step", "jkfac", "adam", "first_step_s")
  ratio("jkfac / kfac-jax adaptive, state bytes", "jkfac", kfac_jax, "state_bytes")
  summary["ratios"] = ratios
  summary["equal_damping"] = equal_damping(best)
  if len({r.get("param_dtype", "float32") for r in records}) > 1:
    summary["precision"] = precision_summary(records)
  summary["verdict"] = harness.verdict(best, "loss")
  adams = [r for r in best.values() if r.get("kind") == "adam"]
  if adams:
    target = min(r["final_loss"] for r in adams)
    summary["adam_final_loss"] = target
    summary["steps_to_adam_final_loss"] = {r["name"]: harness.steps_to(r, "loss", target)
                                           for r in best.values()}
    summary["time_to_adam_final_loss"] = {r["name"]: harness.time_to(r, "loss", target)
                                          for r in best.values()}
    # Wall-clock, compilation included (what the README's older tables quote).
    summary["seconds_to_adam_final_loss"] = {r["name"]: harness.seconds_to(r, "loss", target)
                                             for r in best.values()}
  return summary


def equal_damping(best: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
  """jkfac against kfac-jax's adaptive run from the same initial damping.

  Args:
    best: the runs by group (`harness.best_of_groups`).

  Returns:
    Per kfac-jax adaptive run with a jkfac run of the same settings from its
    initial damping ("jkfac" from 1, "jkfac from damping 150"): kfac-jax's
    loss at `EQUAL_DAMPING_STEP`, the steps and the time (steps x typical
    step time) each took to reach it, and jkfac's fractions of both.
  """
  jkfac_from = {r.get("damping"): r for g, r in best.items()
                if g in ("jkfac", "jkfac from damping 150")}
  rows = []
  for r in best.values():
    if r.get("kind") != "kfac_jax" or not r.get("adaptive"):
      continue
    mine = jkfac_from.get(r.get("initial_damping"))
    target = harness.value_at(r, "loss", EQUAL_DAMPING_STEP)
    if mine is None or target is None:
      continue
    pair = {r["name"]: r, mine["name"]: mine}
    steps = {name: harness.steps_to(run, "loss", target) for name, run in pair.items()}
    times = {name: harness.time_to(run, "loss", target) for name, run in pair.items()}
    reached = steps[mine["name"]] is not None  # kfac-jax reaches its own loss
    rows.append(dict(initial_damping=r["initial_damping"], kfac_jax=r["name"],
                     jkfac=mine["name"], target_loss=target, steps=steps, seconds=times,
                     step_fraction=steps[mine["name"]] / steps[r["name"]] if reached else None,
                     time_fraction=(times[mine["name"]]["seconds"] / times[r["name"]]["seconds"]
                                    if reached else None)))
  return rows


PRECISION_STEPS = (100, 200, 500, 1000)


def precision_summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Each optimizer's run in a narrower dtype against its float32 run.

  Args:
    records: every run's record; groups are named `"<optimizer> (<dtype>)"`.

  Returns:
    One row per group not in float32 whose float32 counterpart ran (the best
    of a grid; if every run of a group diverged, the one that lasted
    longest): its loss and the float32 loss at `PRECISION_STEPS` (where
    evaluated), the step at which it diverged (None if it did not), and the
    final losses' relative difference `(loss - float32) / float32`.
  """
  chosen = dict(harness.best_of_groups(records, "loss"))
  for r in records:  # groups whose runs all diverged: the longest one
    group = r.get("group", r["name"])
    if "error" not in r and (group not in chosen or (
        "diverged_at" in chosen[group] and r.get("diverged_at", math.inf)
        > chosen[group]["diverged_at"])):
      chosen[group] = r
  rows = []
  for group, record in chosen.items():
    dtype = record.get("param_dtype", "float32")
    reference = chosen.get(group.replace(f"({dtype})", "(float32)"))
    if dtype == "float32" or reference is None:
      continue
    diverged = record.get("diverged_at")
    rows.append(dict(
        optimizer=group.replace(f" ({dtype})", ""), param_dtype=dtype, run=record["name"],
        float32_run=reference["name"], diverged_at=None if diverged is None else diverged + 1,
        loss={str(s): harness.value_at(record, "loss", s) for s in PRECISION_STEPS},
        float32_loss={str(s): harness.value_at(reference, "loss", s) for s in PRECISION_STEPS},
        final_loss=record["final_loss"], float32_final_loss=reference["final_loss"],
        final_relative_difference=None if diverged is not None else
        (record["final_loss"] - reference["final_loss"]) / reference["final_loss"],
        median_step_s=record["median_step_s"], float32_median_step_s=reference["median_step_s"]))
  return rows


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.worker:
    harness.worker(args.worker, functools.partial(train, args=args))
    return
  kfac_jax_ok, kfac_jax_note = harness.kfac_jax_status()
  runs = planned_runs(args, kfac_jax_ok)
  batch = (f"batch growing from {args.batch_size} to the training set at step 500"
           if args.growing_batch else f"batch {args.batch_size}")
  print(f"MNIST autoencoder {'(quick) ' if args.quick else ''}{args.steps} steps, {batch}, "
        f"{args.activation}; {len(runs)} runs: {', '.join(r['name'] for r in runs)}", flush=True)
  if not kfac_jax_ok:
    print(f"kfac-jax not run (it is optional: {harness.KFAC_JAX_INSTALL}): {kfac_jax_note}",
          flush=True)
  stem = harness.output_stem(args.out, (
      "mnist_autoencoder_precision" if len(args.param_dtypes) > 1 else
      f"mnist_autoencoder_{args.param_dtypes[0]}" if args.param_dtypes != ["float32"] else
      "mnist_autoencoder_quick" if args.quick else
      "mnist_autoencoder_growing" if args.growing_batch else "mnist_autoencoder"))
  json_path, png_path = harness.with_suffix(stem, ".json"), harness.with_suffix(stem, ".png")
  print(f"results will be written to {json_path} and {png_path}", flush=True)
  records = harness.run_all(__file__, runs, argv)
  summary = summarise(records)
  result = dict(benchmark="mnist_autoencoder", args=vars(args),
                machine=harness.machine({"kfac_jax": kfac_jax_note}), runs=records,
                summary=summary)
  json_path.write_text(json.dumps(result, indent=1))
  shown = set(summary["best"].values()) | {r["run"] for r in summary.get("precision", [])}
  harness.plot([r for r in records if r.get("name") in shown],
               [("loss", "training objective (fixed subset)", True)], png_path,
               f"MNIST autoencoder, {batch}, {args.activation}"
               + ("" if args.param_dtypes == ["float32"] else
                  f"; parameters in {' / '.join(args.param_dtypes)} "
                  f"({' / '.join(LINE_STYLES[:len(args.param_dtypes)])}), evaluated in float32"))
  print_summary(summary)
  print(f"\nwrote {json_path} and {png_path}")


def print_summary(summary: dict[str, Any]) -> None:
  """The table, the ratios, the precision rows and the verdict."""
  midway = summary.get("midway_step")
  width = max([9] + [len(row["optimizer"]) for row in summary["table"]]) + 2
  head = f"loss@{midway}" if midway else ""
  print(f"\n  {'optimizer':<{width}}steps  final loss{head:>10}  median step (s)  "
        "first step (s)  state (MB)  peak RSS (MB)")
  for row in summary["table"]:
    at = row.get("loss_at_midway")
    at = "" if not midway else "-" if at is None else f"{at:.2f}"
    print(f"  {row['optimizer']:<{width}}{row['steps']:>5}{row['final_loss']:>12.2f}{at:>10}"
          f"{row['median_step_s']:>17.4f}{row['first_step_s']:>16.2f}{row['state_mb']:>12.1f}"
          f"{row['peak_rss_mb']:>15.0f}")
  print("  (first step: tracing, compilation and the step; median step: the steps after it)")
  for name, value in summary["ratios"].items():
    print(f"  {name}: {value:.2f}")
  for row in summary.get("precision", []):
    losses = "  ".join(f"@{s}: {row['loss'][str(s)]:.2f} vs {row['float32_loss'][str(s)]:.2f}"
                       for s in PRECISION_STEPS if row["loss"].get(str(s)) is not None)
    end = (f"diverged at step {row['diverged_at']}" if row["diverged_at"] is not None else
           f"final {100 * row['final_relative_difference']:+.1f}%")
    print(f"  {row['optimizer']} in {row['param_dtype']} vs float32: {losses}; {end}")
  for row in summary.get("equal_damping", []):
    fraction = lambda v: "not reached" if v is None else f"{v:.2f}x"
    print(f"  from damping {row['initial_damping']:g}: {row['kfac_jax']}'s loss at step "
          f"{EQUAL_DAMPING_STEP} ({row['target_loss']:.2f}) reached by {row['jkfac']} in "
          f"{fraction(row['step_fraction'])} its steps and {fraction(row['time_fraction'])} "
          "its time")
  print("\nVerdict:")
  for line in summary["verdict"]["lines"]:
    print("  " + "\n    ".join(textwrap.wrap(line, 104)))


if __name__ == "__main__":
  main()
