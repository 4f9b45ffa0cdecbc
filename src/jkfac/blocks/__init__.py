# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Curvature blocks, one file each, registered here by name.

A block is an instance of a subclass of the protocol `jkfac.blocks.base.Block`,
which documents its life cycle in full: `statistics` (in the estimator),
`init`, `accumulate`, `refresh` (given a `jkfac.damping.Damping`),
`precondition`, `describe` and `diagnostics`. `REGISTRY` maps a name to its
block: each layer kind's default block is registered under the kind's name
(`"dense"`, `"conv"`, ...), and the blocks `overrides=` may choose under the
choice's name (`"diagonal"`, `"full"`, `"none"`, ...; a block's `kinds` says
which layers it may be chosen for). A new block is one file and one line
here.

A stack of layers (`Layer.stack`) gets its block once per slice, batched
(`jkfac.blocks.stacked`): use `for_layer(layer)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jkfac.blocks import (conv, dense, diagonal, ekfac, embedding, full, none, scale_and_shift,
                          singd, stacked)
from jkfac.blocks.base import Block, Captures
from jkfac.blocks.group import GroupBlock, OneLayer

if TYPE_CHECKING:  # jkfac.layers imports the blocks, through losses and tags
  from jkfac.layers import Layer

REGISTRY: dict[str, Block] = {
    "conv": conv.BLOCK,
    "dense": dense.BLOCK,
    "diagonal": diagonal.BLOCK,
    "ekfac": ekfac.BLOCK,
    "embedding": embedding.BLOCK,
    "full": full.BLOCK,
    "none": none.BLOCK,
    "scale_and_shift": scale_and_shift.BLOCK,
    "singd": singd.BLOCK,
}


def get(name: str) -> Block:
  """The block registered under a name.

  Args:
    name: a key of `REGISTRY`: a layer kind (`"dense"`, `"conv"`, ...: its
      default block) or an `overrides=` choice (`"diagonal"`, ...).

  Returns:
    `REGISTRY[name]`.
  """
  return REGISTRY[name]


def for_layer(layer: Layer) -> Block:
  """The block of a layer: its kind's, batched over a stack's slices.

  Args:
    layer: a `tracing.Layer`.

  Returns:
    The `Block`: the one `overrides=` chose (`Layer.block`), else its kind's.
  """
  block = REGISTRY[layer.block or layer.kind]
  if layer.stack and block.needs != "nothing":
    return stacked.Stacked(block, layer.stack)
  return block
