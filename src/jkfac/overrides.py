# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Per-layer choice of curvature block, by layer name or parameter path pattern.

`jkfac.estimator(..., overrides={"Dense_3": "diagonal", "*LayerNorm*": "full",
"head/*": "none"})`: each pattern (`fnmatch` style) is matched against every
layer's name and its parameters' paths; the first pattern that matches a
layer decides its block:

- `"kronecker"`: the layer's Kronecker-factored block (the default for the
  layers found); an error for layers that have none;
- `"diagonal"`: the diagonal Fisher, per parameter; a scale-and-shift layer
  computes it from its captures, any other layer from per-example gradients
  (the `"diagonal"` block, one extra pass over the batch);
- `"full"`: the full Fisher block of all the layer's parameters together:
  a scale-and-shift layer computes it from its captures, any other layer
  (up to `blocks.full.MAX_SIZE` parameter entries) from per-example
  gradients (the `"full"` block, one extra pass over the batch);
- `"none"`: no curvature: the gradient passes unchanged.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Mapping, Optional, Sequence

from jkfac.blocks import full, stacked

CHOICES = ("kronecker", "diagonal", "full", "none")
_KRONECKER = frozenset({"dense", "conv", "embedding"})


def _choice(layer: Any, overrides: Mapping[str, str], used: set[str]) -> Optional[str]:
  names = [layer.name] + [p.path for p in layer.params]
  for pattern, choice in overrides.items():
    if any(fnmatch.fnmatchcase(name, pattern) for name in names):
      used.add(pattern)
      return choice
  return None


def apply(layers: Sequence[Any], uses: Sequence[tuple[Any, ...]],
          overrides: Optional[Mapping[str, str]]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
  """Applies `overrides` to the layer table.

  Args:
    layers: the layers found (`tracing.Layer`).
    uses: their uses, aligned with `layers`.
    overrides: pattern -> one of `CHOICES`, or None.

  Returns:
    The new layers and uses (a layer turned diagonal or `none` becomes one
    layer per parameter, with no uses).

  Raises:
    ValueError: an unknown choice, a pattern that matches no layer, or a
      choice the layer does not have.
  """
  if not overrides:
    return tuple(layers), tuple(uses)
  for pattern, choice in overrides.items():
    if choice not in CHOICES:
      raise ValueError(f"overrides[{pattern!r}] = {choice!r} is not a block choice: use "
                       f"one of {CHOICES}.")
  used: set[str] = set()
  new_layers, new_uses = [], []
  for layer, layer_uses in zip(layers, uses):
    choice = _choice(layer, overrides, used)
    note = f"override {choice!r}"
    if choice is None or (choice == "kronecker" and layer.kind in _KRONECKER):
      new_layers.append(layer)
      new_uses.append(layer_uses)
    elif layer.kind == "scale_and_shift" and choice in ("diagonal", "full"):
      options = tuple(o for o in layer.options if o[0] != "full") + (("full", choice == "full"),)
      new_layers.append(dataclasses.replace(layer, options=options, note=note))
      new_uses.append(layer_uses)
    elif choice == "full":  # per layer of a stack
      size = full.size_of(stacked.unstacked(layer) if layer.stack else layer)
      if size > full.MAX_SIZE:
        raise ValueError(
            f"overrides: layer {layer.name!r} has {size} parameter entries, too many for a "
            f"'full' block (at most {full.MAX_SIZE}: its matrix would have {size}^2 "
            "entries). Use 'kronecker' or 'diagonal' for it.")
      new_layers.append(type(layer)(layer.name, "full", layer.params, (), note, layer.stack))
      new_uses.append(())
    elif choice in ("diagonal", "none"):
      kind = "diagonal" if choice == "diagonal" else "none"
      for p in layer.params:
        new_layers.append(type(layer)(p.path, kind, (dataclasses.replace(p, role="param"),),
                                      (), note))
        new_uses.append(())
    else:
      raise ValueError(
          f"overrides: layer {layer.name!r} ({layer.kind}) cannot have a {choice!r} block. "
          f"Kronecker blocks exist for {sorted(_KRONECKER)} layers; 'diagonal', 'full' "
          "and 'none' apply to every layer.")
  unused = [p for p in overrides if p not in used]
  if unused:
    raise ValueError(
        f"overrides: the patterns {unused} match no layer name or parameter path. The "
        f"layers are {[l.name for l in layers]}, the parameters "
        f"{[p.path for l in layers for p in l.params]}: use fnmatch patterns of these "
        "(e.g. 'Dense_*' or '*/kernel'), as print(est) shows them without overrides.")
  return tuple(new_layers), tuple(new_uses)
