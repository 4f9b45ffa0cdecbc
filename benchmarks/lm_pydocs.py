# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""A byte-level transformer language model on English text: jkfac against AdamW and kfac-jax.

The model is a decoder-only transformer as flax users write it, used
unmodified (jkfac finds every layer itself): byte and position embeddings,
pre-LayerNorm blocks of causal multi-head attention and a GELU MLP, stacked
with `nn.scan` as large-model code does, a final LayerNorm and a dense layer
to the 256 byte values. It is trained on the train split of `pydocs` (the
Python documentation's sources, 10.6 MB) and judged by its loss on the
valid split, in bits per byte.

Every optimizer starts from the same initialisation and sees the same
batches (random windows of the train text, drawn with a fixed seed), each in
its own process (`transformer.py` has the runs):

- AdamW with linear warmup, cosine decay to a tenth of the peak, gradient
  clipping at norm 1 and weight decay 0.1 on the matrices: the best peak
  learning rate of a grid (the standard baseline);
- jkfac adaptive (learning rate, momentum and damping from its quadratic
  model), statistics and curvature products on an eighth of the batch;
- jkfac with a fixed schedule: AdamW's warmup and cosine decay, momentum
  0.9, a fixed damping;
- kfac-jax with the fixed run's settings, where it is installed; it finds
  no layer inside `nn.scan`, so it gets the same model with its blocks in a
  Python loop (the same parameter values).

    python benchmarks/lm_pydocs.py --quick     # 200 steps, one AdamW rate
    python benchmarks/lm_pydocs.py             # 2,000 steps, AdamW's grid

It ends with a table (validation bits per byte at given steps, typical step
time and its ratio to AdamW's, first step, state size) and a verdict in
words: when each K-FAC run reached the best AdamW's final validation loss,
in steps and in steps x typical step time.

Results: `benchmarks/results/local/lm_pydocs[_quick].json` and `.png`
(git-ignored), or `--out PATH_STEM`; the committed results were written with
`--out benchmarks/results/lm_pydocs`.
"""

from __future__ import annotations

import argparse
import functools
import math
import pathlib
import sys
from typing import Any

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # pylint: disable=g-import-not-at-top
import transformer

VOCAB = 256  # bytes
ADAMW_GRID = (1e-3, 2e-3, 4e-3, 8e-3)
ADAMW_QUICK = 4e-3
#: The adaptive jkfac run's statistics and curvature products: 4 of the 32 sequences
#: (256 tokens). At 2,000 steps the run ends at 2.055 bits per byte; on a quarter of the
#: batch at 2.067 (a longer step), on a sixteenth at 2.097.
KFAC_FRACTION = 0.125
#: Its factors burned in on the first batch before the first update (`jkfac.burn_in`, one
#: pass per eighth: the whole batch): 2.261 bits per byte at 1,000 steps against 2.304
#: without, 2.078 at 2,000 against 2.055 (one run each).
BURN_IN = 8


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=harness.HelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help=f"200 steps, AdamW at one learning rate ({ADAMW_QUICK:g})")
  parser.add_argument("--steps", type=int, default=None,
                      help="training steps per optimizer (default: 200 with --quick, else 2000)")
  parser.add_argument("--batch-size", type=int, default=32, help="sequences per step")
  parser.add_argument("--sequence", type=int, default=64, help="bytes per sequence")
  parser.add_argument("--eval-sequences", type=int, default=256,
                      help="windows of the valid split the validation loss is measured on")
  parser.add_argument("--eval-every", type=int, default=None,
                      help="steps between evaluations (default: 20 with --quick, else 50)")
  parser.add_argument("--data-dir", default=None,
                      help="folder with train.txt.gz and valid.txt.gz, or with a pydocs/ "
                           "subfolder holding them (" + harness.DATA_DIR_DEFAULT + ")")
  transformer.add_arguments(parser, ADAMW_GRID, ADAMW_QUICK, KFAC_FRACTION, BURN_IN)
  harness.add_out_argument(parser, "lm_pydocs_quick with --quick, else lm_pydocs")
  args = parser.parse_args(argv)
  transformer.finish_arguments(args, ADAMW_GRID, ADAMW_QUICK, steps=(200, 2000),
                               eval_every=(20, 50))
  return args


def make_model(args: argparse.Namespace, scanned: bool = True):
  """The decoder-only byte transformer (a flax linen module), its blocks scanned or looped."""
  import flax.linen as nn
  import jax.numpy as jnp

  class ByteLM(nn.Module):
    """Byte and position embeddings, the causal blocks, a final LayerNorm, byte logits."""

    @nn.compact
    def __call__(self, tokens):
      positions = jnp.arange(tokens.shape[1])
      x = nn.Embed(VOCAB, args.width)(tokens) + nn.Embed(args.sequence, args.width)(positions)
      x = transformer.blocks(args.width, args.depth, args.heads, causal=True,
                             scanned=scanned)(x)
      return nn.Dense(VOCAB)(nn.LayerNorm()(x))

  return ByteLM()


def batches(args: argparse.Namespace, text: np.ndarray):
  """`k -> (tokens, targets)`: step k's random windows of the text, the same in every run."""
  rng = np.random.RandomState(args.seed)
  starts = rng.randint(0, len(text) - args.sequence - 1, size=(args.steps, args.batch_size))
  offsets = np.arange(args.sequence + 1)

  def batch_at(k: int):
    window = text[starts[k][:, None] + offsets].astype(np.int32)
    return window[:, :-1], window[:, 1:]
  return batch_at


def validation_windows(args: argparse.Namespace, text: np.ndarray):
  """`eval_sequences` windows spread evenly over the valid split: (tokens, targets)."""
  starts = np.linspace(0, len(text) - args.sequence - 2, args.eval_sequences).astype(np.int64)
  window = text[starts[:, None] + np.arange(args.sequence + 1)].astype(np.int32)
  return window[:, :-1], window[:, 1:]


def train(run: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
  """Trains one optimizer; returns its record."""
  import datasets
  import jax
  import jax.numpy as jnp

  model = make_model(args)
  batch_at = batches(args, datasets.load_pydocs("train", data_dir=args.data_dir))
  tokens, targets = (jnp.asarray(a) for a in validation_windows(
      args, datasets.load_pydocs("valid", data_dir=args.data_dir)))
  params = model.init(jax.random.PRNGKey(args.seed), tokens[:2])["params"]
  if run["kind"] == "kfac_jax":  # the same model and values, its blocks in a Python loop
    model = make_model(args, scanned=False)
    params = transformer.unstack(params, args.depth, ("Stack_0",))
  apply = lambda p, x: model.apply({"params": p}, x)
  device_batch = lambda k: tuple(jnp.asarray(a) for a in batch_at(k))
  init, step = transformer.make_step(run, args, apply, params, device_batch(0))

  @jax.jit
  def evaluate(p):
    return dict(valid_bpb=transformer.cross_entropy(apply(p, tokens), targets) / math.log(2))

  record = harness.train_loop(run, args.steps, step, params, init(params), device_batch,
                              evaluate, args.eval_every, args.seed + 1,
                              transformer.evaluated(run))
  record["parameters"] = int(sum(x.size for x in jax.tree.leaves(params)))
  return record


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.worker:
    harness.worker(args.worker, functools.partial(train, args=args))
    return
  transformer.run_benchmark(
      __file__, argv, args, "lm_pydocs",
      f"pydocs byte LM {'(quick) ' if args.quick else ''}{args.steps} steps, batch "
      f"{args.batch_size} x {args.sequence} bytes, width {args.width}, depth {args.depth}",
      ("valid_bpb", "bpb", "validation loss (bits per byte)"),
      f"pydocs byte LM: width {args.width}, depth {args.depth}, batch {args.batch_size} x "
      f"{args.sequence}")


if __name__ == "__main__":
  main()
