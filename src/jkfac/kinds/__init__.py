# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The layer kinds the trace finds, one module each, registered here by name.

A kind (`Kind`) is what `jkfac.tracing` needs to find its layers and what
they carry: its matcher, called on every equation of the primitives it
handles (`primitives`), its tag (`jkfac.tags.register_*`), its default block
(`jkfac.blocks.REGISTRY`), the blocks `overrides=` may give it instead
(`allowed_blocks`: those whose `Block.kinds` name it) and its layers' options. The walker dispatches on
the primitive's name (`BY_PRIMITIVE`) and, once a jaxpr is walked, calls the
kinds' `finish` in registry order (the products' biases before the
scale-and-shift layers, which skip them).

A matcher is `match(walker, eqn, ins, frame) -> bool`: `walker` the walk's
state (`views.WalkState`), `eqn` the equation, `ins` the views its operands
hold, `frame` the jaxpr's walk (`views.Frame`). It returns True when the
equation is the kind's alone (the walker neither propagates views through it
nor follows a stack's axis), False when the walker also treats it as any
other operation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from jkfac import blocks
from jkfac.kinds import conv, dense, embedding, scale_and_shift, views

Matcher = Callable[[views.WalkState, Any, list[Any], views.Frame], bool]
Finisher = Callable[[views.WalkState, views.Frame], None]


@dataclasses.dataclass(frozen=True)
class Kind:
  """A layer kind: how the trace finds its layers, and what they carry.

  Attributes:
    name: its name (`"dense"`), the `kind` of its matches.
    tag: the kind string of its layer tag (`jkfac.tags.register_dense`
      tags `"dense"`), or None when it has no tag.
    primitives: the names of the jaxpr primitives its matcher handles.
    match: the matcher (see the module's docstring).
    default_block: the name of its layers' block in `jkfac.blocks.REGISTRY`.
    options: a NamedTuple documenting the options its layers carry
      (`Layer.option`), with their types.
    finish: called once a jaxpr is walked, `finish(walker, frame)`, to
      complete what the matcher found (biases, chains); None for none.
  """
  name: str
  tag: Optional[str]
  primitives: tuple[str, ...]
  match: Matcher
  default_block: str
  options: type
  finish: Optional[Finisher] = None


KINDS: dict[str, Kind] = {kind.name: kind for kind in (
    Kind(dense.NAME, "dense", ("dot_general",), dense.match, "dense", dense.Options,
         finish=dense.finish),
    Kind(conv.NAME, "conv", ("conv_general_dilated",), conv.match, "conv", conv.Options),
    Kind(embedding.NAME, None, ("gather",), embedding.match, "embedding", embedding.Options),
    Kind(scale_and_shift.NAME, "scale_and_shift", ("mul", "add"), scale_and_shift.match,
         "scale_and_shift", scale_and_shift.Options, finish=scale_and_shift.finish),
)}

# Each primitive's kind: one matcher per primitive.
BY_PRIMITIVE: dict[str, Kind] = {primitive: kind for kind in KINDS.values()
                                 for primitive in kind.primitives}

# Each tag's kind.
BY_TAG: dict[str, Kind] = {kind.tag: kind for kind in KINDS.values() if kind.tag is not None}


def default_block(kind: str) -> str:
  """The name of a layer kind's default block in `jkfac.blocks.REGISTRY`.

  Args:
    kind: a `Layer.kind`: a kind of `KINDS`, or a block's name for the
      layers handed to one (`"diagonal"`, `"full"`, `"none"`).

  Returns:
    `KINDS[kind].default_block`, or `kind` itself.
  """
  return KINDS[kind].default_block if kind in KINDS else kind


def allowed_blocks(kind: str) -> tuple[str, ...]:
  """The blocks a layer of this kind may have: its default, then the `overrides=` choices.

  Args:
    kind: a `Layer.kind` (of `KINDS`, or a block's name, `default_block`).

  Returns:
    The names in `jkfac.blocks.REGISTRY` of its default block and of every
    block whose `kinds` include it (or that apply to any layer).
  """
  own = default_block(kind)
  return (own,) + tuple(name for name, block in blocks.REGISTRY.items()
                        if name != own and (block.kinds is None or kind in block.kinds))
