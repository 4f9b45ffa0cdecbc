# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Per-layer choice of curvature block, by layer name or parameter path pattern.

`jkfac.estimator(..., overrides={"Dense_3": "diagonal", "*LayerNorm*": "full",
"head/*": "none"})`: each pattern (`fnmatch` style) is matched against every
layer's name and its parameters' paths; the first pattern that matches a
layer decides its block. The choices are `"kronecker"` (the layer's own
Kronecker-factored block, the default for the layers found; an error for
layers that have none) and the blocks of `jkfac.blocks.REGISTRY` that may be
chosen (`Block.kinds`):

- `"diagonal"`: the diagonal Fisher, per parameter; a scale-and-shift layer
  computes it from its captures, any other layer from per-example gradients
  (the `"diagonal"` block, one extra pass over the batch);
- `"full"`: the full Fisher block of all the layer's parameters together:
  a scale-and-shift layer computes it from its captures, any other layer
  (up to `blocks.full.MAX_SIZE` parameter entries) from per-example
  gradients (the `"full"` block, one extra pass over the batch);
- `"none"`: no curvature: the gradient passes unchanged;
- and the blocks for some layer kinds only, such as `"ekfac"`.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Mapping, Optional, Sequence

from jkfac import blocks, kinds


def choices() -> tuple[str, ...]:
  """The block choices `overrides=` accepts.

  Returns:
    `"kronecker"`, then the names of the registered blocks that may be
    chosen for some layer (`Block.kinds` not empty).
  """
  return ("kronecker",) + tuple(name for name, block in blocks.REGISTRY.items()
                                if block.kinds is None or block.kinds)


def _choice(layer: Any, overrides: Mapping[str, str], used: set[str]) -> Optional[str]:
  names = [layer.name] + [p.path for p in layer.params]
  for pattern, choice in overrides.items():
    if any(fnmatch.fnmatchcase(name, pattern) for name in names):
      used.add(pattern)
      return choice
  return None


def _assigned(layer: Any, choice: str) -> Optional[tuple[Any, ...]]:
  """The layers `choice` turns `layer` into, or None when it cannot apply."""
  note = f"override {choice!r}"
  own = blocks.get(kinds.default_block(layer.kind))
  if choice == "kronecker":
    return (layer,) if own.kronecker else None
  chosen = own.choose(layer, choice, note)
  if chosen is not None:
    return (chosen,)
  if choice in kinds.allowed_blocks(layer.kind):
    return blocks.get(choice).assign(layer, choice, note)
  return None


def apply(layers: Sequence[Any], uses: Sequence[tuple[Any, ...]],
          overrides: Optional[Mapping[str, str]]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
  """Applies `overrides` to the layer table.

  Args:
    layers: the layers found (`tracing.Layer`).
    uses: their uses, aligned with `layers`.
    overrides: pattern -> one of `choices()`, or None.

  Returns:
    The new layers and uses (a layer turned diagonal or `none` becomes one
    layer per parameter, with no uses).

  Raises:
    ValueError: an unknown choice, a pattern that matches no layer, or a
      choice the layer does not have.
  """
  if not overrides:
    return tuple(layers), tuple(uses)
  allowed = choices()
  for pattern, choice in overrides.items():
    if choice not in allowed:
      raise ValueError(f"overrides[{pattern!r}] = {choice!r} is not a block choice: use "
                       f"one of {allowed}.")
  used: set[str] = set()
  new_layers, new_uses = [], []
  for layer, layer_uses in zip(layers, uses):
    choice = _choice(layer, overrides, used)
    assigned = (layer,) if choice is None else _assigned(layer, choice)
    if assigned is None:
      kronecker = sorted(name for name, b in blocks.REGISTRY.items() if b.kronecker)
      anywhere = [name for name in allowed[1:] if blocks.get(name).kinds is None]
      some = {name: list(blocks.get(name).kinds) for name in allowed[1:]
              if blocks.get(name).kinds}
      raise ValueError(
          f"overrides: layer {layer.name!r} ({layer.kind}) cannot have a {choice!r} block. "
          f"Kronecker blocks exist for {kronecker} layers; "
          + ", ".join(repr(n) for n in anywhere[:-1]) + f" and {anywhere[-1]!r} apply to "
          "every layer" + "".join(f"; {n!r} to {k} layers" for n, k in some.items()) + ".")
    new_layers.extend(assigned)
    # Layers that keep activations keep their uses; the others are per parameter.
    new_uses.extend([layer_uses if blocks.for_layer(l).needs == "activations" else ()
                     for l in assigned])
  unused = [p for p in overrides if p not in used]
  if unused:
    raise ValueError(
        f"overrides: the patterns {unused} match no layer name or parameter path. The "
        f"layers are {[l.name for l in layers]}, the parameters "
        f"{[p.path for l in layers for p in l.params]}: use fnmatch patterns of these "
        "(e.g. 'Dense_*' or '*/kernel'), as print(est) shows them without overrides.")
  return tuple(new_layers), tuple(new_uses)
