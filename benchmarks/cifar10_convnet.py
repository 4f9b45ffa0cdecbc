# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""CIFAR-10 convolutional networks: jkfac (KFC) against optax and kfac-jax.

Two flax linen models, used unmodified (jkfac finds every layer itself):

- `kfc`: the KFC paper's style of network (Grosse & Martens 2016): three 5x5
  convolutions with 32, 32 and 64 channels, each followed by ReLU and 3x3
  pooling with stride 2, then a dense softmax layer;
- `resnet`: a small ResNet (three stages of one basic block, 16-32-64
  channels, GroupNorm), global average pooling, a dense softmax layer.

Every optimizer starts from the same initialisation and sees the same
batches, each in its own process. Recorded: the training loss on a fixed
subset of the training set and the test accuracy, against steps and against
seconds; the median step time; the optimizer state's size; peak memory.
Adam and SGD with momentum run over a small learning-rate grid (the best of
each is reported); kfac-jax runs where it is importable and handles the
layers.

    python benchmarks/cifar10_convnet.py --quick      # about 3 minutes
    python benchmarks/cifar10_convnet.py              # 300 steps, about 12 minutes

It ends with a table and a verdict in words (as the MNIST autoencoder's:
the lowest training loss, and how much faster K-FAC reached the best
Adam's final loss, in steps and in steps x typical step time).

Results: `benchmarks/results/local/cifar10_<model>[_quick].json` and `.png`
(git-ignored), or `--out PATH_STEM`; the committed results were written
with `--out benchmarks/results/cifar10_<model>`.
"""

from __future__ import annotations

import argparse
import json
import functools
import pathlib
import sys
import textwrap
from typing import Any

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # pylint: disable=g-import-not-at-top

# jkfac's loss has the K-FAC paper's L2 term (η = 1e-5, added to the damping as
# the paper does): without it the adaptive damping falls to its floor and the
# quadratic model's momentum runs away along the directions the normalised
# ResNet's loss is flat in (diverged at step 296 of 300; see the README).
JKFAC = dict(learning_rate=None, momentum=None, damping=1e-2, stats_fraction=0.25, l2_reg=1e-5)
JKFAC_FIXED = dict(learning_rate=0.05, momentum=0.9, damping=1e-2, stats_fraction=0.25,
                   l2_reg=1e-5)
ADAM_GRID = (3e-4, 1e-3, 3e-3)
SGD_GRID = (0.01, 0.03, 0.1)
ALL = ("jkfac", "jkfac_fixed", "adam", "sgd", "kfac_jax")
# kfac-jax 0.0.8 handles these convolutions but took about 65 s a step on 2 CPU
# cores (jkfac: 0.4 s): it runs only when asked for (--optimizers ...,kfac_jax).
DEFAULT = ("jkfac", "jkfac_fixed", "adam", "sgd")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=harness.HelpFormatter)
  parser.add_argument("--model", choices=("kfc", "resnet"), default="kfc",
                      help="kfc: the KFC paper's style of network; resnet: a small ResNet")
  parser.add_argument("--quick", action="store_true",
                      help="60 steps, one learning rate for Adam and SGD (the grid's middle)")
  parser.add_argument("--steps", type=int, default=None,
                      help="training steps per optimizer (default: 60 with --quick, else 300)")
  parser.add_argument("--batch-size", type=int, default=128, help="examples per step")
  parser.add_argument("--eval-size", type=int, default=1000,
                      help="training and test images the loss and accuracy are measured on")
  parser.add_argument("--eval-every", type=int, default=None,
                      help="steps between evaluations (default: 10 with --quick, else 25)")
  parser.add_argument("--optimizers", default=None,
                      help=f"comma-separated subset of {','.join(ALL)} (default: "
                           f"{','.join(DEFAULT)}; kfac_jax runs only where kfac-jax is "
                           "installed and works)")
  parser.add_argument("--seed", type=int, default=0,
                      help="seeds the initialisation and the data order")
  parser.add_argument("--data-dir", default=None,
                      help="folder with the CIFAR-10 binary batch files, or with a cifar-10/ "
                           "subfolder holding them (" + harness.DATA_DIR_DEFAULT + ")")
  harness.add_out_argument(parser, "cifar10_<model>_quick with --quick, else cifar10_<model>")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.steps is None:
    args.steps = 60 if args.quick else 300
  if args.eval_every is None:
    args.eval_every = 10 if args.quick else 25
  return args


# --- models ------------------------------------------------------------------

def _flax():
  import flax.linen as nn
  import jax.numpy as jnp

  class KFCNet(nn.Module):
    """Three 5x5 convolutions (32, 32, 64) with pooling, then a softmax layer."""

    @nn.compact
    def __call__(self, x):
      for i, channels in enumerate((32, 32, 64)):
        x = nn.relu(nn.Conv(channels, (5, 5))(x))
        pool = nn.max_pool if i == 0 else nn.avg_pool
        x = pool(x, (3, 3), strides=(2, 2), padding="SAME")
      return nn.Dense(10)(x.reshape(x.shape[0], -1))

  class Block(nn.Module):
    channels: int
    stride: int

    @nn.compact
    def __call__(self, x):
      y = nn.Conv(self.channels, (3, 3), (self.stride, self.stride), use_bias=False)(x)
      y = nn.relu(nn.GroupNorm(num_groups=8)(y))
      y = nn.Conv(self.channels, (3, 3), use_bias=False)(y)
      y = nn.GroupNorm(num_groups=8)(y)
      if x.shape[-1] != self.channels or self.stride != 1:
        x = nn.Conv(self.channels, (1, 1), (self.stride, self.stride), use_bias=False)(x)
      return nn.relu(x + y)

  class ResNet(nn.Module):
    """A small ResNet: three stages of one basic block, 16-32-64 channels."""

    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.GroupNorm(num_groups=8)(nn.Conv(16, (3, 3), use_bias=False)(x)))
      for channels, stride in ((16, 1), (32, 2), (64, 2)):
        x = Block(channels, stride)(x)
      return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))

  return {"kfc": KFCNet, "resnet": ResNet}


# --- the runs ----------------------------------------------------------------

def planned_runs(args: argparse.Namespace, kfac_jax_ok: bool) -> list[dict[str, Any]]:
  wanted = set(args.optimizers.split(",")) if args.optimizers else set(DEFAULT)
  unknown = wanted - set(ALL)
  if unknown:
    raise SystemExit(f"unknown optimizers {sorted(unknown)}; choose from {', '.join(ALL)}")
  runs = []
  if "jkfac" in wanted:
    runs.append(dict(name="jkfac", kind="jkfac", **JKFAC))
  if "jkfac_fixed" in wanted:
    runs.append(dict(name="jkfac fixed", kind="jkfac", **JKFAC_FIXED))
  if "adam" in wanted:
    runs += [dict(name=f"adam lr={lr:g}", kind="adam", group="adam", learning_rate=lr)
             for lr in (ADAM_GRID[1:2] if args.quick else ADAM_GRID)]
  if "sgd" in wanted:
    runs += [dict(name=f"sgd-momentum lr={lr:g}", kind="sgd", group="sgd", learning_rate=lr)
             for lr in (SGD_GRID[1:2] if args.quick else SGD_GRID)]
  if kfac_jax_ok and "kfac_jax" in wanted:
    runs.append(dict(name="kfac-jax", kind="kfac_jax", **JKFAC_FIXED))
  return runs


def _data(args: argparse.Namespace):
  import datasets
  train_x, train_y = datasets.load_cifar10("train", data_dir=args.data_dir)
  test_x, test_y = datasets.load_cifar10("test", data_dir=args.data_dir)
  mean, std = train_x.mean(axis=(0, 1, 2)), train_x.std(axis=(0, 1, 2))
  return (train_x - mean) / std, train_y, (test_x - mean) / std, test_y


def _cross_entropy(logits, labels):
  import jax
  import jax.numpy as jnp
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


def make_step(run: dict[str, Any], model, params, batch):
  """Returns `(init, step)` for one run's optimizer."""
  import jax
  import optax

  def objective(p, images, labels):
    return _cross_entropy(model.apply({"params": p}, images), labels)

  if run["kind"] == "kfac_jax":
    return _kfac_jax_step(run, model, params, batch)
  if run["kind"] == "jkfac":
    import jkfac
    def loss_fn(p, images, labels):
      return (jkfac.softmax_cross_entropy(model.apply({"params": p}, images), labels)
              + 0.5 * run["l2_reg"] * optax.tree_utils.tree_norm(p, squared=True))

    est = jkfac.estimator(loss_fn, params, *batch, stats_fraction=run["stats_fraction"])
    print(est, file=sys.stderr)
    tx = jkfac.kfac(est, learning_rate=run["learning_rate"], momentum=run["momentum"],
                    damping=run["damping"], l2_reg=run["l2_reg"])

    @jax.jit
    def step(p, state, batch, key):
      loss, grads, stats = est(p, *batch, rng=key)
      updates, state = tx.update(grads, state, p, stats=stats)
      return optax.apply_updates(p, updates), state, loss
  else:
    tx = (optax.adam(run["learning_rate"]) if run["kind"] == "adam"
          else optax.sgd(run["learning_rate"], momentum=0.9))

    @jax.jit
    def step(p, state, batch, key):
      del key
      loss, grads = jax.value_and_grad(objective)(p, *batch)
      updates, state = tx.update(grads, state, p)
      return optax.apply_updates(p, updates), state, loss
  return tx.init, step


def _kfac_jax_step(run: dict[str, Any], model, params, batch):
  """kfac-jax with the same fixed learning rate, momentum and damping."""
  import jax
  import kfac_jax
  import kfac_jax_runner

  def loss(p, batch):
    logits = model.apply({"params": p}, batch[0])
    kfac_jax.register_softmax_cross_entropy_loss(logits, batch[1])
    return _cross_entropy(logits, batch[1])

  settings = dict(use_adaptive_learning_rate=False, use_adaptive_momentum=False,
                  use_adaptive_damping=False, inverse_update_period=20, num_burnin_steps=0,
                  curvature_ema=0.95, l2_reg=0.0, value_func_has_aux=False,
                  value_func_has_state=False, value_func_has_rng=False, multi_device=False)
  optimizer = kfac_jax.Optimizer(value_and_grad_func=jax.value_and_grad(loss), **settings)
  runner = kfac_jax_runner.Runner(optimizer, adaptive=False, settings=settings,
                                  learning_rate=run["learning_rate"], momentum=run["momentum"],
                                  damping=run["damping"])
  return (lambda p: runner.init(p, batch)), runner.step


def train(run: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
  """Trains one optimizer; returns its record."""
  import jax
  import jax.numpy as jnp

  train_x, train_y, test_x, test_y = _data(args)
  model = _flax()[args.model]()
  params = model.init(jax.random.PRNGKey(args.seed), jnp.asarray(train_x[:2]))["params"]
  rng = np.random.RandomState(args.seed)
  order = np.concatenate([rng.permutation(len(train_x))
                          for _ in range(args.steps * args.batch_size // len(train_x) + 1)])
  batch_at = lambda k: tuple(jnp.asarray(a[order[k * args.batch_size:(k + 1) * args.batch_size]])
                             for a in (train_x, train_y))
  init, step = make_step(run, model, params, batch_at(0))
  sub = np.arange(args.eval_size)
  eval_train = tuple(jnp.asarray(a[sub]) for a in (train_x, train_y))
  eval_test = tuple(jnp.asarray(a[sub]) for a in (test_x, test_y))

  @jax.jit
  def evaluate(p):
    train_logits = model.apply({"params": p}, eval_train[0])
    test_logits = model.apply({"params": p}, eval_test[0])
    return dict(loss=_cross_entropy(train_logits, eval_train[1]),
                test_accuracy=jnp.mean(jnp.argmax(test_logits, -1) == eval_test[1]))

  record = harness.train_loop(run, args.steps, step, params, init(params), batch_at, evaluate,
                              args.eval_every, args.seed + 1)
  record["final_loss"] = record["loss"][-1]
  return record


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
  best = harness.best_of_groups(records, "loss")
  table = [dict(optimizer=r["name"], final_loss=r["loss"][-1],
                test_accuracy=r["test_accuracy"][-1], median_step_s=r["median_step_s"],
                first_step_s=r["first_step_s"], state_mb=r["state_bytes"] / 2**20,
                peak_rss_mb=r["peak_rss_mb"]) for r in best.values()]
  summary: dict[str, Any] = dict(best={g: r["name"] for g, r in best.items()}, table=table)
  if "adam" in best:
    adam = best["adam"]
    summary["step_time_vs_adam"] = {r["name"]: r["median_step_s"] / adam["median_step_s"]
                                    for r in best.values()}
    # Wall-clock, compilation included (what the README's table quotes).
    summary["seconds_to_adam_final_loss"] = {
        r["name"]: harness.seconds_to(r, "loss", adam["loss"][-1]) for r in best.values()}
    summary["time_to_adam_final_loss"] = {
        r["name"]: harness.time_to(r, "loss", adam["loss"][-1]) for r in best.values()}
  summary["verdict"] = harness.verdict(best, "loss", "training loss")
  return summary


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.worker:
    harness.worker(args.worker, functools.partial(train, args=args))
    return
  kfac_jax_ok, note = harness.kfac_jax_status()
  runs = planned_runs(args, kfac_jax_ok)
  print(f"CIFAR-10 {args.model} {'(quick) ' if args.quick else ''}{args.steps} steps, batch "
        f"{args.batch_size}; {len(runs)} runs: {', '.join(r['name'] for r in runs)}", flush=True)
  if not kfac_jax_ok:
    print(f"kfac-jax not run (it is optional: {harness.KFAC_JAX_INSTALL}): {note}", flush=True)
  stem = harness.output_stem(args.out, f"cifar10_{args.model}{'_quick' if args.quick else ''}")
  json_path, png_path = harness.with_suffix(stem, ".json"), harness.with_suffix(stem, ".png")
  print(f"results will be written to {json_path} and {png_path}", flush=True)
  records = harness.run_all(__file__, runs, argv)
  summary = summarise(records)
  result = dict(benchmark=f"cifar10_{args.model}", args=vars(args),
                machine=harness.machine({"kfac_jax": note}), runs=records, summary=summary)
  json_path.write_text(json.dumps(result, indent=1))
  best = [r for r in records if r.get("name") in summary["best"].values()]
  harness.plot(best, [("loss", "training loss (fixed subset)", True),
                      ("test_accuracy", "test accuracy", False)],
               png_path, f"CIFAR-10 {args.model}, batch {args.batch_size}")
  print("\n  optimizer            final loss  test acc  median step (s)  vs adam  first step (s)"
        "  state (MB)")
  for row in summary["table"]:
    ratio = summary.get("step_time_vs_adam", {}).get(row["optimizer"], float("nan"))
    print(f"  {row['optimizer']:<20}{row['final_loss']:>11.3f}{row['test_accuracy']:>10.3f}"
          f"{row['median_step_s']:>17.4f}{ratio:>9.2f}{row['first_step_s']:>16.2f}"
          f"{row['state_mb']:>12.1f}")
  print("\nVerdict:")
  for line in summary["verdict"]["lines"]:
    print("  " + "\n    ".join(textwrap.wrap(line, 104)))
  print(f"\nwrote {json_path} and {png_path}")


if __name__ == "__main__":
  main()
