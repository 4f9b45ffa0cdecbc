# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The exponentially growing batch size (K-FAC section 13).

The paper grows the mini-batch as

    m_k = min(m_1 exp((k - 1) / b), N),    b = (full_at - 1) / log(N / m_1),

so that it reaches the whole training set `N` at step `full_at` (about 500 on
the autoencoders). These are plain Python functions of the (1-based) step,
evaluated outside `jit`: each batch size is a new shape, so
`growing_batch_sizes` also limits how many different sizes (compilations)
there are.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

# Slack on the float formula, so that a size it reaches exactly (up to
# rounding) is not floored one below.
_SLACK = 1e-9


def _check_sizes(initial: int, total: int, full_at: int) -> None:
  if initial < 1:
    raise ValueError(f"growing batch size: initial must be >= 1, got {initial!r}; "
                     "pass the first step's batch size, e.g. initial=1000.")
  if total < initial:
    raise ValueError(f"growing batch size: total ({total!r}) must be >= initial "
                     f"({initial!r}); pass the training set size as total.")
  if full_at < 1:
    raise ValueError(f"growing batch size: full_at must be >= 1, got {full_at!r}; it is "
                     "the 1-based step from which the batch is the whole set, e.g. 500.")


def growing_batch_size(initial: int, total: int, full_at: int = 500,
                       round_to: Optional[int] = None) -> Callable[[int], int]:
  """The paper's exponentially growing batch size (K-FAC section 13).

  Args:
    initial: `m_1`, the batch size at step 1.
    total: `N`, the training set size, reached at step `full_at`.
    full_at: the 1-based step from which the batch is the whole set.
    round_to: if set, sizes before `full_at` are rounded down to a multiple
      of it, but never below `initial`.

  Returns:
    A function of the 1-based step `k` returning an int batch size: never
    above `m_k` (rounded down), at least `initial`, non-decreasing in `k`,
    and `total` for `k >= full_at`.

  Raises:
    ValueError: for `initial < 1`, `total < initial`, `full_at < 1` or
      `round_to < 1`, and (from the function) for `k < 1`.
  """
  _check_sizes(initial, total, full_at)
  if round_to is not None and round_to < 1:
    raise ValueError(f"growing_batch_size: round_to must be >= 1 or None, got {round_to!r}; "
                     "pass None for no rounding, or e.g. round_to=100.")
  rate = math.log(total / initial) / max(full_at - 1, 1)

  def size(k: int) -> int:
    if k < 1:
      raise ValueError(f"growing_batch_size: steps are 1-based, got k={k!r}; call it with "
                       "k = step + 1 for a 0-based step counter.")
    if k >= full_at:
      return total
    target = math.floor(min(initial * math.exp((k - 1) * rate), total) + _SLACK)
    if round_to is not None:
      target = target // round_to * round_to
    return max(target, initial)

  return size


def growing_batch_sizes(initial: int, total: int, steps: int, full_at: int = 500,
                        distinct: int = 8) -> list[int]:
  """The growing batch sizes of steps 1..steps, with few different values.

  Each size is the largest of `distinct` geometric levels from `initial` to
  `total` (rounded down to integers, the last one `total`) that is not above
  `growing_batch_size(initial, total, full_at)` at that step, so that a
  jitted step compiles at most `distinct` times.

  Args:
    initial: `m_1`, the batch size at step 1.
    total: `N`, the training set size, reached at step `full_at`.
    steps: the number of steps.
    full_at: the 1-based step from which the batch is the whole set.
    distinct: the most different sizes, at least 2.

  Returns:
    A list of `steps` ints: non-decreasing, never above the paper's `m_k`,
    starting at `initial` and `total` from step `full_at` on.

  Raises:
    ValueError: for invalid sizes (as `growing_batch_size`), `steps < 0` or
      `distinct < 2`.
  """
  _check_sizes(initial, total, full_at)
  if steps < 0:
    raise ValueError(f"growing_batch_sizes: steps must be >= 0, got {steps!r}; pass the "
                     "number of training steps to plan for.")
  if distinct < 2:
    raise ValueError(f"growing_batch_sizes: distinct must be >= 2 (the initial and the "
                     f"full batch), got {distinct!r}; e.g. distinct=8 compiles the step "
                     "at most 8 times.")
  ratio = total / initial
  levels = sorted({math.floor(initial * ratio ** (i / (distinct - 1)) + _SLACK)
                   for i in range(distinct - 1)} | {total})
  size = growing_batch_size(initial, total, full_at)
  return [max(level for level in levels if level <= size(k)) for k in range(1, steps + 1)]
