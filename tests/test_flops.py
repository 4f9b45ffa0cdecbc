"""The FLOP counter of the step-cost benchmark, on small shapes."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "flops.py"
_SPEC = importlib.util.spec_from_file_location("jkfac_bench_flops", _PATH)
flops = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(flops)

LAYERS = [(3, 4), (4, 2)]


def _xla_flops(fn, *args):
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, list):
    analysis = analysis[0]
  if not analysis or "flops" not in analysis:
    pytest.skip("this backend gives no cost analysis")
  return analysis["flops"]


def test_hand_counts():
  assert flops.forward(LAYERS, 5) == 2 * 5 * (12 + 8)
  assert flops.backward(LAYERS, 5) == 2 * 5 * (12 + 8) + 2 * 5 * 8
  assert flops.curvature_backward(LAYERS, 5) == 2 * 5 * 8
  assert flops.factors(LAYERS, 5) == 2 * 5 * (16 + 16 + 25 + 4)
  assert flops.factors(LAYERS, 5, bias=False) == 2 * 5 * (9 + 16 + 16 + 4)
  assert flops.precondition(LAYERS) == 2 * 4 * 4 * 8 + 2 * 5 * 2 * 7
  assert flops.inverses(LAYERS, bias=False, method="eigh") == 11 * (27 + 64 + 64 + 8)
  assert flops.inverses(LAYERS, bias=False) == int(7 / 3 * (27 + 64 + 64 + 8))
  parts = flops.kfac_step(LAYERS, 8, stats_rows=2, inverse_every=4)
  assert parts["estimator_extra"] == (flops.curvature_backward(LAYERS, 2)
                                      + flops.factors(LAYERS, 2) + flops.forward(LAYERS, 2))
  assert parts["inverses_amortised"] == flops.inverses(LAYERS) // 4


def test_forward_matches_xla_cost_analysis():
  x = jnp.ones((16, 32))
  ws = [jnp.ones((32, 64)), jnp.ones((64, 8))]
  counted = _xla_flops(lambda x, a, b: (x @ a) @ b, x, *ws)
  assert counted == pytest.approx(flops.forward([(32, 64), (64, 8)], 16), rel=0.05)


def test_factor_products_match_xla_cost_analysis():
  x = jnp.ones((16, 32))
  counted = _xla_flops(lambda x: x.T @ x, x)
  assert counted == pytest.approx(2 * 16 * 32 * 32, rel=0.05)
