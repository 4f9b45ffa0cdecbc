"""The paper's exponentially growing batch size."""

import math

import pytest

from jkfac.schedules import growing_batch_size, growing_batch_sizes


def _paper(k, initial, total, full_at):
  """m_k = min(m_1 exp((k - 1) / b), N), b = (full_at - 1) / log(N / m_1)."""
  if initial == total:
    return total
  rate = (full_at - 1) / math.log(total / initial)
  return min(initial * math.exp((k - 1) / rate), total)


@pytest.mark.parametrize("k", [1, 2, 10, 100, 250, 400, 499])
def test_values_are_the_formula_rounded_down(k):
  size = growing_batch_size(1000, 60000)
  assert size(k) == math.floor(_paper(k, 1000, 60000, 500) + 1e-9)


def test_chosen_steps():
  size = growing_batch_size(1000, 60000)
  assert size(1) == 1000
  # b = 499 / log(60): at step k the batch is 1000 * 60^((k - 1) / 499).
  assert size(250) == math.floor(1000 * 60 ** (249 / 499))
  assert size(2) == math.floor(1000 * 60 ** (1 / 499)) == 1008
  assert size(500) == size(501) == size(10 ** 6) == 60000
  assert size(499) < 60000


def test_monotone_bounded_and_full_from_full_at():
  for initial, total, full_at, round_to in [(1000, 60000, 500, None), (1000, 60000, 500, 256),
                                            (7, 1000, 37, 10), (3, 5, 100, None),
                                            (50, 50, 10, None), (10, 100, 1, None)]:
    size = growing_batch_size(initial, total, full_at, round_to)
    sizes = [size(k) for k in range(1, full_at + 20)]
    assert sizes == sorted(sizes)
    assert all(isinstance(s, int) for s in sizes)
    assert sizes[0] == (total if full_at == 1 else initial)
    assert all(initial <= s <= total for s in sizes)
    assert all(s == total for s in sizes[full_at - 1:])
    for k, s in enumerate(sizes[:full_at - 1], start=1):
      assert s <= _paper(k, initial, total, full_at) + 1e-6
      if round_to is not None:
        assert s == initial or s % round_to == 0


def test_round_to_rounds_down_but_not_below_initial():
  size = growing_batch_size(1000, 60000, round_to=512)
  assert size(1) == 1000  # 1000 // 512 * 512 = 512 < initial.
  k = 300
  assert size(k) == math.floor(_paper(k, 1000, 60000, 500)) // 512 * 512


def test_sizes_match_the_benchmark_properties():
  sizes = growing_batch_sizes(1000, 60000, 600)
  assert len(sizes) == 600
  assert sizes[0] == 1000 and sizes[499] == 60000 and sizes[-1] == 60000
  assert sizes[498] < 60000
  for k, s in enumerate(sizes, start=1):
    assert s <= _paper(k, 1000, 60000, 500) + 1e-6
  assert sizes == sorted(sizes) and len(set(sizes)) <= 8


@pytest.mark.parametrize("distinct", [2, 3, 5, 8, 20])
def test_sizes_are_geometric_levels(distinct):
  sizes = growing_batch_sizes(1000, 60000, 550, distinct=distinct)
  levels = sorted(set(sizes))
  assert len(levels) <= distinct and levels[0] == 1000 and levels[-1] == 60000
  want = sorted({math.floor(1000 * 60 ** (i / (distinct - 1)) + 1e-9)
                 for i in range(distinct - 1)} | {60000})
  assert set(levels) <= set(want)
  exact = growing_batch_size(1000, 60000)
  for k, s in enumerate(sizes, start=1):  # The largest level not above the schedule.
    assert s == max(level for level in want if level <= exact(k))


def test_sizes_edge_cases():
  assert growing_batch_sizes(1000, 60000, 0) == []
  assert growing_batch_sizes(64, 64, 5) == [64] * 5
  assert growing_batch_sizes(10, 1000, 3, full_at=2) == [10, 1000, 1000]


@pytest.mark.parametrize("args, match", [
    ((0, 100), "initial must be >= 1"),
    ((-5, 100), "initial must be >= 1"),
    ((200, 100), r"total \(100\) must be >= initial \(200\)"),
    ((10, 100, 0), "full_at must be >= 1"),
    ((10, 100, 50, 0), "round_to must be >= 1"),
])
def test_size_errors(args, match):
  with pytest.raises(ValueError, match=match):
    growing_batch_size(*args)


def test_step_is_one_based():
  with pytest.raises(ValueError, match="1-based"):
    growing_batch_size(10, 100)(0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(initial=0, total=10, steps=5), "initial must be >= 1"),
    (dict(initial=10, total=5, steps=5), "must be >= initial"),
    (dict(initial=1, total=10, steps=5, full_at=0), "full_at must be >= 1"),
    (dict(initial=1, total=10, steps=-1), "steps must be >= 0"),
    (dict(initial=1, total=10, steps=5, distinct=1), "distinct must be >= 2"),
])
def test_sizes_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    growing_batch_sizes(**kwargs)
