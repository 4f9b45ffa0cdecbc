# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The layer table `print(est)` shows: what every parameter is, and its block."""

from __future__ import annotations

from typing import Sequence

from jkfac import blocks, tracing, tridiagonal


def table(layers: Sequence[tracing.Layer], registered: Sequence[tracing.Loss], mode: str,
        chains: Sequence[tuple[int, ...]] = ()) -> str:
  """The layer table: what every parameter is, and its factor shapes.

  Args:
    layers: the estimator's layers.
    registered: its losses.
    mode: its estimation mode.
    chains: the block-tridiagonal chains, if requested.

  Returns:
    Printable text: one row per layer (index, name, block kind, parameters,
    factors, how it was found), then the losses, the parameters left to
    the diagonal fallback block, and the block-tridiagonal chains if any.
  """
  rows = [("#", "layer", "kind", "parameters", "factors", "how")]
  for i, layer in enumerate(layers):
    params = ", ".join(f"{p.role or 'param'} {p.shape}" for p in layer.params)
    rows.append((str(i), layer.name, layer.kind, params,
                 blocks.for_layer(layer).describe(layer), layer.note))
  widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
  lines = [f"jkfac estimator (mode={mode!r}): {len(layers)} layers, "
           f"{len(registered)} loss(es)"]
  lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()
            for r in rows]
  for loss in registered:
    lines.append(f"  loss: {loss.distribution}, prediction {loss.prediction_shape}, "
                 f"weight {loss.weight:g}"
                 + (f", masked over {loss.term_shape}" if loss.masked else ""))
  fallback = [l for l in layers if l.kind == "diagonal"]
  if fallback:
    lines.append("  parameters left to the diagonal fallback block:")
    lines += [f"    {l.name} {l.params[0].shape}: {l.note}" for l in fallback]
  else:
    lines.append("  no parameter is left to a fallback block.")
  if chains:
    lines.append(tridiagonal.describe(layers, chains))
  return "\n".join(lines)
