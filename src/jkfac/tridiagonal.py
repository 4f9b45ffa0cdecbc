# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""The block-tridiagonal inverse of K-FAC (Martens & Grosse 2015, section 4.3).

Over a chain of dense layers `1..l`, the inverse Fisher is modelled as a
Gaussian graphical model in which each layer's gradient depends on the next
one's only: `vec(DW_i) ~ N(Ψ_i vec(DW_{i+1}), Σ_{i|i+1})`, `vec(DW_l) ~ N(0, Σ_l)`,
so that `F̂^{-1} = Ξ^T Λ Ξ` with `Ξ` the identity with `-Ψ_i` on its first
upper block diagonal and `Λ = diag(Σ_{1|2}^{-1}, ..., Σ_l^{-1})`. In this
library's layout (a dense layer's gradient as the matrix `V_i = [∇W; ∇b]`
of shape `(in+1, out)`, `(A ⊗ G) vec(V) = vec(A V G^T)`):

- `Ψ_i = Ψ^A_i ⊗ Ψ^G_i`, `Ψ^A_i = A_{i,i+1} A_{i+1}^{-1}`, `Ψ^G_i = G_{i,i+1} G_{i+1}^{-1}`,
  where `A_{i,i+1} = mean(ā_i ā_{i+1}^T)` and `G_{i,i+1} = mean(g_i g_{i+1}^T)` are
  the cross moments of consecutive layers' inputs and output derivatives;
- `Σ_{i|i+1} = A_i ⊗ G_i - B^A_i ⊗ B^G_i` with `B^A_i = Ψ^A_i A_{i+1} Ψ^A_i^T`, inverted
  by the generalised eigendecompositions of appendix B: with `K^A^T A_i K^A = I`
  and `K^A^T B^A_i K^A = diag(d^A)` (and the same for G),
  `Σ^{-1} vec(V) = vec(K^A [(K^A^T V K^G) / (1 - d^A d^G^T)] K^G^T)`;
- `Σ_l = A_l ⊗ G_l`.

The diagonal blocks `A_i`, `G_i` are damped as in the block-diagonal case
(factored Tikhonov, `A + π√λ I`, `G + √λ/π I`); the cross moments are not.
Applying `Ξ^T Λ Ξ` takes three sweeps over the chain (`precondition`).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from jkfac import linalg
from jkfac.blocks import dense
from jkfac.blocks.base import row_weights
from jkfac.blocks.group import GroupBlock
from jkfac.damping import Damping
from jkfac.sharding import row_products

Array = jax.Array


def eligible(layer: Any, uses: Sequence[Any]) -> bool:
  """Whether a layer can join a chain: a dense layer applied once to `(batch, features)`.

  Args:
    layer: the layer (`tracing.Layer`).
    uses: its uses (`tracing.Use`).

  Returns:
    True for a dense layer with its Kronecker block and one use whose input
    and output are 2-D and whose input's feature axis is the last.
  """
  if layer.kind != "dense" or layer.block or len(uses) != 1:
    return False
  use = uses[0]
  return len(use.x_shape) == 2 and len(use.out_shape) == 2 and use.x_axes == (1,)


def find_chains(layers: Sequence[Any], uses: Sequence[Sequence[Any]]) -> tuple[tuple[int, ...], ...]:
  """The chains: runs of eligible dense layers, consecutive in graph order.

  Layers of other kinds in between (a normalisation, say) do not break a
  chain and keep their own blocks; a dense layer that cannot join (applied
  over a sequence or in several places) breaks it, as does a change of
  batch size.

  Args:
    layers: the layer table.
    uses: each layer's uses.

  Returns:
    Chains of at least two layer indices; layers in none stay block-diagonal.
  """
  chains, run = [], []
  for index, (layer, layer_uses) in enumerate(zip(layers, uses)):
    if layer.kind != "dense":
      continue
    if not eligible(layer, layer_uses):
      chains.append(tuple(run))
      run = []
    elif run and layer_uses[0].x_shape[0] != uses[run[-1]][0].x_shape[0]:
      chains.append(tuple(run))
      run = [index]
    else:
      run.append(index)
  chains.append(tuple(run))
  return tuple(c for c in chains if len(c) > 1)


def _homogeneous(layer: Any, x: Array, dtype: Any) -> Array:
  x = x.astype(dtype)
  if layer.option("bias"):
    x = jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), dtype)], axis=-1)
  return x


def cross_moments(first: Any, second: Any, inputs: Sequence[Array],
                  output_grads: Sequence[Array], dtype: Any,
                  weights: Optional[Array] = None) -> dict[str, Array]:
  """`A_{i,i+1}` and `G_{i,i+1}` of two consecutive chain layers, this batch.

  Args:
    first: layer i.
    second: layer i + 1.
    inputs: the two layers' inputs, `(batch, features)` each.
    output_grads: their output derivatives, `(K, batch, out)` each, scaled as
      for the `G` factors (a sum over passes and rows is the mean).
    dtype: the factor dtype.
    weights: a masked loss's term weights (`blocks.Captures.weights`), or None.

  Returns:
    `{"A_next": (in_i[+1], in_{i+1}[+1]), "G_next": (out_i, out_{i+1})}`.
  """
  a_i, a_j = _homogeneous(first, inputs[0], dtype), _homogeneous(second, inputs[1], dtype)
  rows = row_weights(weights, a_i.shape[:1], dtype)
  weighted = a_i if rows is None else a_i * rows[:, None]
  g_i, g_j = (g.astype(dtype).reshape(-1, g.shape[-1]) for g in output_grads)
  return {"A_next": row_products(weighted, a_j) / a_i.shape[0],
          "G_next": row_products(g_i, g_j)}


def _generalised_eigen(matrix: Array, other: Array) -> tuple[Array, Array]:
  """`K`, `d` with `K^T matrix K = I`, `K^T other K = diag(d)` (appendix B).

  By the Cholesky factor `L` of `matrix`: `L^{-1} other L^{-T} = U diag(d) U^T`
  and `K = L^{-T} U`. `d` is clipped to `[0, 1)` (the chain's conditional
  covariances are positive definite; round-off may say otherwise).
  """
  lower = jnp.linalg.cholesky(matrix)
  solve = lambda b: jax.scipy.linalg.solve_triangular(lower, b, lower=True)
  whitened = solve(solve(other).T)
  d, u = jnp.linalg.eigh(0.5 * (whitened + whitened.T))
  k = jax.scipy.linalg.solve_triangular(lower.T, u, lower=False)
  return k, jnp.clip(d, 0.0, 1.0 - 8 * jnp.finfo(d.dtype).eps)


def inverses(factors: Sequence[dict[str, Array]], damping: Array,
             method: str = "cholesky") -> list[dict[str, Array]]:
  """What the three sweeps need, for one chain.

  Args:
    factors: per chain layer, `{"A", "G"}` and, for all but the last,
      `{"A_next", "G_next"}` (moving averages).
    damping: λ.
    method: how the damped diagonal blocks are inverted.

  Returns:
    Per layer: the damped inverses `A_inv`, `G_inv` and π for the last;
    `psi_A`, `psi_G`, `K_A`, `K_G` and `scale = 1 / (1 - d^A d^G^T)` for the others.
  """
  damped, inverted = [], []
  for f in factors:
    shift_a, shift_g, pi = Damping(damping).kronecker(f["A"], f["G"])
    pair = []
    for matrix, shift in ((f["A"], shift_a), (f["G"], shift_g)):
      shift = linalg.floored_shift(matrix, shift)
      pair.append((matrix + shift * jnp.eye(matrix.shape[0], dtype=matrix.dtype),
                   linalg.damped_inverse(matrix, shift, method)))
    damped.append((pair[0][0], pair[1][0], pi))
    inverted.append((pair[0][1], pair[1][1]))
  out = []
  for i, f in enumerate(factors[:-1]):
    a_next_inv, g_next_inv = inverted[i + 1]
    psi_a, psi_g = f["A_next"] @ a_next_inv, f["G_next"] @ g_next_inv
    k_a, d_a = _generalised_eigen(damped[i][0], psi_a @ f["A_next"].T)
    k_g, d_g = _generalised_eigen(damped[i][1], psi_g @ f["G_next"].T)
    out.append({"psi_A": psi_a, "psi_G": psi_g, "K_A": k_a, "K_G": k_g,
                "scale": 1.0 / (1.0 - d_a[:, None] * d_g[None, :])})
  out.append({"A_inv": inverted[-1][0], "G_inv": inverted[-1][1], "pi": damped[-1][2]})
  return out


def precondition(inverse: Sequence[dict[str, Array]], matrices: Sequence[Array]) -> list[Array]:
  """`Ξ^T Λ Ξ` applied to a chain's gradient matrices `V_i` (three sweeps).

  Args:
    inverse: `inverses(...)` of the chain.
    matrices: per layer, `V_i = [∇W; ∇b]`, shape `(in_i[+1], out_i)`.

  Returns:
    The preconditioned matrices, same shapes.
  """
  last = len(matrices) - 1
  first = [v - inv["psi_A"] @ matrices[i + 1] @ inv["psi_G"].T if i < last else v
           for i, (v, inv) in enumerate(zip(matrices, inverse))]
  second = []
  for i, (v, inv) in enumerate(zip(first, inverse)):
    if i == last:
      second.append(inv["A_inv"] @ v @ inv["G_inv"])
    else:
      second.append(inv["K_A"] @ ((inv["K_A"].T @ v @ inv["K_G"]) * inv["scale"])
                    @ inv["K_G"].T)
  return [v if i == 0 else
          v - inverse[i - 1]["psi_A"].T @ second[i - 1] @ inverse[i - 1]["psi_G"]
          for i, v in enumerate(second)]


def precondition_layers(layers: Sequence[Any], inverse: Sequence[dict[str, Array]],
                        grads: Sequence[Sequence[Array]]) -> list[tuple[Array, ...]]:
  """`precondition` on the chain layers' parameter gradients.

  Args:
    layers: the chain's dense layers.
    inverse: `inverses(...)` of the chain.
    grads: per layer, its `(kernel, bias)` gradients (bias optional).

  Returns:
    Per layer, the preconditioned gradients, shaped and typed as `grads`.
  """
  dtype = inverse[-1]["A_inv"].dtype
  matrices = [dense.gradient_matrix(l, g, dtype) for l, g in zip(layers, grads)]
  return [dense.split_matrix(l, u, g)
          for l, u, g in zip(layers, precondition(inverse, matrices), grads)]


class ChainBlock(GroupBlock):
  """The block of a chain of dense layers: `Ξ^T Λ Ξ` (`inverses`, `precondition_layers`)."""

  refreshes = True

  def refresh(self, layers: Sequence[Any], factors: Sequence[dict[str, Array]],
              damping: Damping, method: str) -> list[dict[str, Array]]:
    """Returns `inverses(factors, λ, method)`.

    Args:
      layers: the chain's dense layers.
      factors: per layer, `{"A", "G"}` and, for all but the last, the cross
        moments `{"A_next", "G_next"}`.
      damping: λ.
      method: how the damped diagonal blocks are inverted.

    Returns:
      Per layer, what `precondition` needs.
    """
    return inverses(factors, damping.value, method)

  def precondition(self, layers: Sequence[Any], inverses: Sequence[dict[str, Array]],
                   grads: Sequence[Sequence[Array]]) -> list[tuple[Array, ...]]:
    """Returns `precondition_layers(layers, inverses, grads)`.

    Args:
      layers: the chain's dense layers.
      inverses: per layer, what `refresh` returned.
      grads: per layer, its `(kernel, bias)` gradients.

    Returns:
      Per layer, the preconditioned gradients.
    """
    return precondition_layers(layers, inverses, grads)


CHAIN = ChainBlock()


def describe(layers: Sequence[Any], chains: Sequence[Sequence[int]]) -> str:
  """The chains and the layers outside them, for the layer table.

  Args:
    layers: the layer table.
    chains: the chains, as indices into `layers` (`find_chains`).

  Returns:
    One indented line per chain (its layers' names, in order), and one
    listing the layers in no chain if there are any.
  """
  lines = ["  block-tridiagonal chain: " + " -> ".join(layers[i].name for i in c) for c in chains]
  in_chain = {i for c in chains for i in c}
  others = [l.name for i, l in enumerate(layers) if i not in in_chain]
  if others:
    lines.append("  block-diagonal (in no chain): " + ", ".join(others))
  return "\n".join(lines)
