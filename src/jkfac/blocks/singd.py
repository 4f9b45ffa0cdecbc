# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Inverse-free Kronecker factors (SINGD / IKFAC, Lin et al. 2024), by `overrides={...: "singd"}`.

K-FAC inverts its factors every few updates: a Cholesky or eigen
decomposition, cubic in the layer's width, numerically delicate in low
precision, and a spike of work at each refresh. SINGD never inverts. It
keeps `K` and `C` with `K K^T ≈ (A + ...)^{-1}` and `C C^T ≈ (G + ...)^{-1}`
and moves them at every update by a multiplicative, matrix-multiplication
only step on the positive-definite manifold (the IKFAC update of Lin et al.,
"Can we remove the square-root in adaptive gradient methods?", 2024; SINGD,
Lin et al., ICML 2024, with dense factors):

    H_K = K^T Ã K,  H_C = C^T G̃ C
    m_K ← α m_K + (1 - α)/2 (tr(H_C)/d_C H_K - I)
    m_C ← α m_C + (1 - α)/2 (tr(H_K)/d_K H_C - I)
    K ← K (I - β_K m_K),  C ← C (I - β_C m_C),  β_X = β / max(1, ‖m_X‖_F)

with `Ã = A + π√λ I` and `G̃ = G + √λ/π I` this batch's factors damped by
factored Tikhonov (λ the damping of the update), `β = 1 - decay` (the
transform's moving-average decay sets how fast the curvature estimate
follows the batches, as for K-FAC's averages) and `α = 0.5`. The
preconditioned gradient is `K K^T [∇W; ∇b] C C^T`. At a fixed point
(`m = 0`), `K K^T ⊗ C C^T = Ã^{-1} ⊗ G̃^{-1}`: K-FAC's damped block, reached
without an inverse. (The paper damps with `λ tr(C^T C)/d_C K^T K` inside
`m_K`, whose fixed point is `A + λ'`-damped with a λ' far smaller than
K-FAC's `π√λ` for the same λ: with jkfac's adaptive λ and an input factor
as singular as MNIST's, whose border pixels are always 0, `K` grew without
bound and overflowed.) The state starts at `K = C = I` (the plain gradient) and is stored
as `K - I` and `C - I`, so that an all-zero state is that start. For dense
layers and convolutions (per group); no refresh (`inverse_every` does not
apply to it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import jax.numpy as jnp
from typing_extensions import override

from jkfac.blocks import conv, dense
from jkfac.blocks.base import Block, Captures
from jkfac.damping import Damping

if TYPE_CHECKING:  # jkfac.layers imports the blocks, through losses and tags
  from jkfac.layers import Layer

Array = jax.Array
_KFAC = {"dense": dense.BLOCK, "conv": conv.BLOCK}
MOMENTUM = 0.5
"""α, the momentum of the factors' steps `m_K` and `m_C`."""


def _kind(layer: Layer) -> Any:
  return dense if layer.kind == "dense" else conv


def factor_step(k: Array, c: Array, m_k: Array, m_c: Array, a: Array, g: Array,
                rate: float) -> tuple[Array, Array, Array, Array]:
  """One SINGD step of the factors `K`, `C` and their momenta (one group).

  Args:
    k: `K`, `(d_K, d_K)`.
    c: `C`, `(d_C, d_C)`.
    m_k: `K`'s momentum.
    m_c: `C`'s momentum.
    a: this batch's damped input-side factor `Ã`.
    g: this batch's damped output-side factor `G̃`.
    rate: β, the factors' step size.

  Returns:
    The new `(K, C, m_K, m_C)`.
  """
  d_k, d_c = k.shape[0], c.shape[0]
  h_k, h_c = k.T @ a @ k, c.T @ g @ c
  half = 0.5 * (1.0 - MOMENTUM)
  m_k = MOMENTUM * m_k + half * (jnp.trace(h_c) / d_c * h_k - jnp.eye(d_k, dtype=k.dtype))
  m_c = MOMENTUM * m_c + half * (jnp.trace(h_k) / d_k * h_c - jnp.eye(d_c, dtype=c.dtype))
  # Normalised by the Frobenius norm, a bound on the spectral norm: K changes by
  # at most a factor 1 ± β per step (the largest entry, the paper's, lets a wide
  # layer's K grow by β·d per step and overflow).
  k = k - rate / jnp.maximum(1.0, jnp.linalg.norm(m_k)) * (k @ m_k)
  c = c - rate / jnp.maximum(1.0, jnp.linalg.norm(m_c)) * (c @ m_c)
  return k, c, m_k, m_c


def _identity_like(x: Array) -> Array:
  return jnp.broadcast_to(jnp.eye(x.shape[-1], dtype=x.dtype), x.shape)


class SINGDBlock(Block):
  """Inverse-free Kronecker-factored block of a dense layer or convolution."""

  roles = ("kernel", "bias")
  needs = "activations"
  kinds = ("dense", "conv")
  accumulates = True
  refreshes = False

  def statistics(self, layer: Layer, captures: Captures) -> dict[str, Array]:
    """Returns this batch's `A` and `G`, as K-FAC's block of the layer.

    Args:
      layer: the dense layer or convolution (`tracing.Layer`).
      captures: its inputs and output derivatives, one entry per use.

    Returns:
      `{"A", "G"}` (per group for a convolution).
    """
    return _KFAC[layer.kind].statistics(layer, captures)

  @override
  def init(self, layer: Layer, statistics: dict[str, Any]) -> dict[str, Any]:
    return {}  # the batch's factors move K and C; none is averaged

  def refresh(self, layer: Layer, factors: dict[str, Array], damping: Damping,
              method: str = "cholesky") -> dict[str, Array]:
    """Returns the state's start, `K = C = I` (never called at a refresh).

    Args:
      layer: the layer (`tracing.Layer`).
      factors: unused (none is kept).
      damping: λ: its dtype is the state's.
      method: unused.

    Returns:
      `{"K": K - I, "C": C - I, "m_K", "m_C"}`, all zero (per group for a
      convolution).
    """
    del factors, method
    shapes = [jax.ShapeDtypeStruct(p.shape, damping.value.dtype) for p in layer.params]
    v = jax.eval_shape(lambda g: _kind(layer).gradient_matrix(layer, g, g[0].dtype), shapes)
    lead, (d_k, d_c) = v.shape[:-2], v.shape[-2:]
    zeros = lambda d: jnp.zeros(lead + (d, d), v.dtype)
    return {"K": zeros(d_k), "C": zeros(d_c), "m_K": zeros(d_k), "m_C": zeros(d_c)}

  @override
  def accumulate(self, layer: Layer, inverses: dict[str, Array], batch: dict[str, Array],
                 decay: float, damping: Damping, device_mean: Callable[[Array], Array]
                 ) -> dict[str, Array]:
    k, c = inverses["K"], inverses["C"]

    def step(k, c, m_k, m_c, a, g):
      shift_a, shift_g, _ = damping.kronecker(a, g)  # factored Tikhonov
      return factor_step(k, c, m_k, m_c, a + shift_a * jnp.eye(a.shape[0], dtype=a.dtype),
                         g + shift_g * jnp.eye(g.shape[0], dtype=g.dtype), 1.0 - decay)

    if layer.kind == "conv":
      step = jax.vmap(step)
    k, c, m_k, m_c = step(k + _identity_like(k), c + _identity_like(c), inverses["m_K"],
                          inverses["m_C"], device_mean(batch["A"]), device_mean(batch["G"]))
    return {"K": k - _identity_like(k), "C": c - _identity_like(c), "m_K": m_k, "m_C": m_c}

  def precondition(self, layer: Layer, inverse: dict[str, Array],
                   grads: Sequence[Array]) -> tuple[Array, ...]:
    """Returns `K K^T [∇W; ∇b] C C^T`, split back into kernel and bias.

    Args:
      layer: the layer (`tracing.Layer`).
      inverse: `K - I` and `C - I` (`accumulate`).
      grads: the kernel's gradient, and the bias's when the layer has one.

    Returns:
      The preconditioned gradients, shaped and typed as `grads`.
    """
    k = inverse["K"] + _identity_like(inverse["K"])
    c = inverse["C"] + _identity_like(inverse["C"])
    t = lambda x: jnp.swapaxes(x, -1, -2)
    kind = _kind(layer)
    v = kind.gradient_matrix(layer, grads, k.dtype)
    return kind.split_matrix(layer, k @ (t(k) @ v @ c) @ t(c), grads)

  @override
  def describe(self, layer: Layer) -> str:
    return f"SINGD (inverse-free): {_KFAC[layer.kind].describe(layer)}"

  @override
  def diagnostics(self, layer: Layer, inverse: dict[str, Array]) -> dict[str, Array]:
    return {"factor_step_K": jnp.max(jnp.abs(inverse["m_K"])),
            "factor_step_C": jnp.max(jnp.abs(inverse["m_C"]))}


BLOCK = SINGDBlock()
