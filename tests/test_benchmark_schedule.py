"""The autoencoder benchmark's batch schedules (the paper's growing batch)."""

import importlib.util
import math
import pathlib

_DIR = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
_SPEC = importlib.util.spec_from_file_location("jkfac_bench_autoencoder", _DIR / "mnist_autoencoder.py")
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_fixed_batches_share_one_order_and_cover_each_epoch():
  args = bench.parse_args(["--steps", "130", "--batch-size", "1000"])
  batches = bench.batch_indices(args, 60000)
  assert all(len(b) == 1000 for b in batches)
  first_epoch = sorted(i for b in batches[:60] for i in b)
  assert first_epoch == list(range(60000))
  again = bench.batch_indices(args, 60000)
  assert all((a == b).all() for a, b in zip(batches, again))


def test_growing_batch_is_full_by_step_500_and_never_above_the_paper_schedule():
  args = bench.parse_args(["--steps", "600", "--growing-batch"])
  sizes = bench.batch_sizes(args, 60000)
  assert sizes[0] == 1000 and sizes[499] == 60000 and sizes[-1] == 60000
  rate = 499 / math.log(60)
  for k, size in enumerate(sizes, start=1):
    assert size <= min(1000 * math.exp((k - 1) / rate), 60000) + 1e-6
  assert sizes == sorted(sizes) and len(set(sizes)) <= 8
