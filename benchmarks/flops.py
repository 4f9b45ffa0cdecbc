# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Floating-point operation counts of a K-FAC step on a stack of dense layers.

A multiply-add counts as 2 operations. `layers` is a list of `(fan_in,
fan_out)`; `rows` the number of examples (times positions) per step.
Symmetric eigendecompositions with eigenvectors are counted as `9 n^3`
(tridiagonal reduction `4/3 n^3`, divide and conquer, back-transformation:
the usual estimate for LAPACK's syevd), and forming `Q diag Q^T` as `2 n^3`.
"""

from __future__ import annotations

from typing import Sequence

Layers = Sequence[tuple[int, int]]


def forward(layers: Layers, rows: int) -> int:
  """The layer products of one forward pass."""
  return sum(2 * rows * i * o for i, o in layers)


def backward(layers: Layers, rows: int) -> int:
  """Weight gradients of every layer and input gradients of all but the first."""
  weight = sum(2 * rows * i * o for i, o in layers)
  inputs = sum(2 * rows * i * o for i, o in layers[1:])
  return weight + inputs


def curvature_backward(layers: Layers, rows: int) -> int:
  """The sampled-target pass: input gradients only (no weight gradients)."""
  return sum(2 * rows * i * o for i, o in layers[1:])


def factors(layers: Layers, rows: int, bias: bool = True) -> int:
  """`A = ā^T ā` and `G = g^T g` for every layer."""
  extra = 1 if bias else 0
  return sum(2 * rows * ((i + extra) ** 2 + o ** 2) for i, o in layers)


def moving_averages(layers: Layers, bias: bool = True) -> int:
  """`ε X + (1 - ε) X_batch`: three operations per factor entry."""
  extra = 1 if bias else 0
  return sum(3 * ((i + extra) ** 2 + o ** 2) for i, o in layers)


def inverses(layers: Layers, bias: bool = True, method: str = "cholesky") -> int:
  """Damped inverses of every factor.

  `"cholesky"`: the factorisation (n³/3) and two triangular solves against
  the identity (n³ each); `"eigh"`: the eigendecomposition (about 9 n³) and
  `Q diag Q^T` (2 n³).
  """
  extra = 1 if bias else 0
  per_cube = {"cholesky": 7 / 3, "eigh": 11}[method]
  return int(sum(per_cube * ((i + extra) ** 3 + o ** 3) for i, o in layers))


def precondition(layers: Layers, bias: bool = True) -> int:
  """`A^{-1} V G^{-1}` for every layer."""
  extra = 1 if bias else 0
  return sum(2 * (i + extra) * o * ((i + extra) + o) for i, o in layers)


def adam_update(layers: Layers, bias: bool = True) -> int:
  """About ten elementwise operations per parameter."""
  return sum(10 * (i * o + (o if bias else 0)) for i, o in layers)


def kfac_step(layers: Layers, rows: int, stats_rows: int | None = None,
              inverse_every: int = 20, bias: bool = True) -> dict[str, int]:
  """The parts of one K-FAC step, with the inverse refresh amortised.

  Args:
    layers: `(fan_in, fan_out)` of each dense layer.
    rows: examples per step.
    stats_rows: examples used for the statistics (default: all).
    inverse_every: refresh period.
    bias: whether the layers have biases.

  Returns:
    Operation counts by part.
  """
  stats_rows = rows if stats_rows is None else stats_rows
  extra_forward = forward(layers, stats_rows) if stats_rows != rows else 0
  return {
      "forward": forward(layers, rows),
      "backward": backward(layers, rows),
      "estimator_extra": (curvature_backward(layers, stats_rows)
                          + factors(layers, stats_rows, bias) + extra_forward),
      "moving_averages": moving_averages(layers, bias),
      "inverses_amortised": inverses(layers, bias) // inverse_every,
      "precondition": precondition(layers, bias),
  }
