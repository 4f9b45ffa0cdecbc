# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Eigenvalue-corrected K-FAC (George et al. 2018), chosen by `overrides={...: "ekfac"}`.

K-FAC's block `A ⊗ G` has the eigenbasis `U_A ⊗ U_G` (the Kronecker-factored
eigenbasis) and the eigenvalues `λ_A λ_G^T`. EK-FAC keeps the basis and
re-estimates the eigenvalues: `S`, the diagonal of the Fisher in that
basis, the second moment of the per-example gradients projected on it,
`S_ij = E[(U_A^T ∇W U_G)_ij²]`. Among the matrices with this eigenbasis,
`(U_A ⊗ U_G) diag(S) (U_A ⊗ U_G)^T` is the closest to the Fisher block in
Frobenius norm (George et al., section 3.2), so at least as close as K-FAC.

The gradient of one row (a token for K-FAC-expand, an example for
K-FAC-reduce, a location of a convolution) is `ā g^T`, so its projection is
`(U_A^T ā)(U_G^T g)^T` and, summed over the curvature passes' `g`s,
`S = Σ_rows (U_A^T ā)² (Σ_k (U_G^T g_k)²)^T` (per group for a grouped
convolution), scaled as the factors: it equals `λ_A λ_G^T` where K-FAC is
exact.

Over training:

- `statistics`: K-FAC's `A` and `G`, and the rows (a dense layer's `ā` and
  `g`, a convolution's inputs and output derivatives), from which the
  transform measures `S` in the current basis;
- every refresh: the eigendecompositions of the averaged `A` and `G`; `S`
  restarts at `λ_A λ_G^T` (K-FAC's eigenvalues, the best guess before a batch
  is measured in the new basis);
- every update after it (`accumulate`): this batch's `S` averaged in,
  `S ← ε S + (1 - ε) S_batch` with `ε = decay`: K-FAC's eigenvalues are the
  average's start, whose weight decays as batches are measured (a batch's
  `S` has an entry per weight, from a few hundred rows: replacing the start
  by the first batch alone made steps along badly measured directions far
  too long);
- `precondition`: `U_A [(U_A^T V U_G) / (S + D)] U_G^T`, `D` the damping of
  the last refresh added to the corrected eigenvalues.

The damping `D` is the one K-FAC's factored Tikhonov adds to each of its
eigenvalues: `(λ_A + π√λ)(λ_G + √λ/π) = λ_A λ_G + D` with
`D = π√λ λ_G + λ_A √λ/π + λ`, so that EK-FAC replaces K-FAC's undamped
eigenvalues by the measured ones and keeps its damping (with `S = λ_A λ_G`
its update is K-FAC's). Adding a plain λ instead leaves the directions
whose measured `S` is near zero but whose `λ_A` or `λ_G` is large almost
undamped: with the adaptive λ, the autoencoder benchmark's loss ran away.

It costs an eigendecomposition of each factor per refresh (`inverse_method`
does not apply) and two projections of the batch's rows per update. Its
statistics are measured in the optimizer's basis, so they do not average
over micro-batches (`jkfac.MultiSteps` refuses it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import jax.numpy as jnp
from typing_extensions import override

from jkfac.blocks import conv, dense
from jkfac.blocks.base import Block, Captures
from jkfac.damping import Damping
from jkfac.sharding import einsum, row_products

if TYPE_CHECKING:  # jkfac.layers imports the blocks, through losses and tags
  from jkfac.layers import Layer

Array = jax.Array
_KFAC = {"dense": dense.BLOCK, "conv": conv.BLOCK}


def _eigh(matrix: Array) -> tuple[Array, Array]:
  """Eigenvalues (negative round-off clipped to 0) and eigenvectors of a factor."""
  eigenvalues, eigenvectors = jnp.linalg.eigh(matrix)
  return jnp.maximum(eigenvalues, 0.0), eigenvectors


def _dense_moment(inverse: dict[str, Array], batch: dict[str, Array]) -> Array:
  """`Σ_rows (U_A^T ā)² (Σ_k (U_G^T g_k)²)^T` of a dense layer, `(in[+1], out)`."""
  a = batch["rows_A"] @ inverse["U_A"]
  h = jnp.sum(jnp.square(batch["rows_G"] @ inverse["U_G"]), axis=0)
  return row_products(jnp.square(a), h)


def _conv_moment(layer: Layer, inverse: dict[str, Array], batch: dict[str, Array]) -> Array:
  """The same per group of a convolution, over its uses: `(groups, d[+1], out/groups)`."""
  moment = 0.0
  uses = sum(1 for key in batch if key.startswith("input_"))
  for i in range(uses):
    p = conv.patch_rows(layer, batch[f"input_{i}"], inverse["U_A"].dtype)
    g = conv.output_rows(layer, batch[f"output_grads_{i}"], inverse["U_G"].dtype)
    a = jnp.einsum("rgi,gij->rgj", p, inverse["U_A"])
    h = jnp.sum(jnp.square(jnp.einsum("krgi,gij->krgj", g, inverse["U_G"])), axis=0)
    moment = moment + einsum("rgi,rgj->gij", jnp.square(a), h)
  return moment


class EKFACBlock(Block):
  """Eigenvalue-corrected Kronecker-factored block of a dense layer or convolution."""

  roles = ("kernel", "bias")
  needs = "activations"
  kinds = ("dense", "conv")
  accumulates = True
  summable = False

  def statistics(self, layer: Layer, captures: Captures) -> dict[str, Array]:
    """Returns K-FAC's factors of this batch and the rows `S` is measured from.

    Args:
      layer: the dense layer or convolution (`tracing.Layer`).
      captures: its inputs and output derivatives, one entry per use.

    Returns:
      `{"A", "G"}` as K-FAC's block returns them, and for a dense layer
      `rows_A` `(R, in[+1])` and `rows_G` `(K, R, out)` (`dense.rows`), for
      a convolution each use's `input_i` and `output_grads_i` (its patches
      are taken when `S` is measured).
    """
    out = dict(_KFAC[layer.kind].statistics(layer, captures))
    if layer.kind == "dense":
      out["rows_A"], out["rows_G"] = dense.rows(layer, captures)
    else:
      for i, (x, g) in enumerate(zip(captures.inputs, captures.output_grads)):
        out[f"input_{i}"] = x.astype(captures.dtype)
        out[f"output_grads_{i}"] = g.astype(captures.dtype)
    return out

  @override
  def init(self, layer: Layer, statistics: dict[str, Any]) -> dict[str, Any]:
    return {"A": statistics["A"], "G": statistics["G"]}

  def refresh(self, layer: Layer, factors: dict[str, Array], damping: Damping,
              method: str = "cholesky") -> dict[str, Array]:
    """Returns the eigenbases of `A` and `G`, `S` restarted at K-FAC's eigenvalues.

    Args:
      layer: the layer (`tracing.Layer`).
      factors: `A` and `G` (per group for a convolution), averaged over batches.
      damping: λ: the corrected eigenvalues are damped as K-FAC's factored
        Tikhonov damps its eigenvalue products (`D`, above).
      method: unused (eigendecompositions).

    Returns:
      `{"U_A", "U_G", "S": λ_A λ_G^T, "count": 0, "damping": D}`.
    """
    del method

    def one(a: Array, g: Array) -> tuple[Array, ...]:
      (lam_a, u_a), (lam_g, u_g) = _eigh(a), _eigh(g)
      shift_a, shift_g, _ = damping.kronecker(a, g)
      shift = shift_a * lam_g[None, :] + lam_a[:, None] * shift_g + shift_a * shift_g
      return u_a, u_g, jnp.outer(lam_a, lam_g), shift

    split = one if layer.kind == "dense" else jax.vmap(one)
    u_a, u_g, s, shift = split(factors["A"], factors["G"])
    return {"U_A": u_a, "U_G": u_g, "S": s, "count": jnp.zeros([], s.dtype), "damping": shift}

  @override
  def accumulate(self, layer: Layer, inverses: dict[str, Array], batch: dict[str, Array],
                 decay: float, damping: Damping, device_mean: Callable[[Array], Array]
                 ) -> dict[str, Array]:
    moment = (_dense_moment(inverses, batch) if layer.kind == "dense"
              else _conv_moment(layer, inverses, batch))
    s = decay * inverses["S"] + (1.0 - decay) * device_mean(moment)
    return {**inverses, "S": s, "count": inverses["count"] + 1.0}

  def precondition(self, layer: Layer, inverse: dict[str, Array],
                   grads: Sequence[Array]) -> tuple[Array, ...]:
    """Returns `U_A [(U_A^T V U_G) / (S + D)] U_G^T`, split back into kernel and bias.

    Args:
      layer: the layer (`tracing.Layer`).
      inverse: `U_A`, `U_G`, `S` and the damping `D` (`refresh`, `accumulate`).
      grads: the kernel's gradient, and the bias's when the layer has one.

    Returns:
      The preconditioned gradients, shaped and typed as `grads`.
    """
    u_a, u_g = inverse["U_A"], inverse["U_G"]
    scale = 1.0 / (jnp.maximum(inverse["S"], 0.0) + inverse["damping"])  # S + D
    kind = dense if layer.kind == "dense" else conv
    v = kind.gradient_matrix(layer, grads, u_a.dtype)
    projected = jnp.swapaxes(u_a, -1, -2) @ v @ u_g
    return kind.split_matrix(layer, u_a @ (projected * scale) @ jnp.swapaxes(u_g, -1, -2),
                             grads)

  @override
  def describe(self, layer: Layer) -> str:
    return f"EK-FAC: {_KFAC[layer.kind].describe(layer)}, S as the kernel"

  @override
  def diagnostics(self, layer: Layer, inverse: dict[str, Array]) -> dict[str, Array]:
    damped = jnp.maximum(inverse["S"], 0.0) + inverse["damping"]
    return {"steps_since_basis": inverse["count"],
            "damped_condition_S": jnp.max(damped) / jnp.min(damped)}


BLOCK = EKFACBlock()
