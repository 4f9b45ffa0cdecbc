"""What the benchmark scripts share: where results go, the verdict, the table, `--help`."""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = REPO_ROOT / "benchmarks"
SCRIPTS = sorted(path for path in BENCHMARKS.glob("*.py")
                 if 'if __name__ == "__main__"' in path.read_text(encoding="utf-8"))


def _load(name):
  """benchmarks/<name>.py as a module (benchmarks is not a package)."""
  if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
  spec = importlib.util.spec_from_file_location(f"jkfac_bench_{name}", BENCHMARKS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


harness = _load("harness")


def _record(name, kind, losses, every=10, step_s=0.1, group=None):
  steps = [1] + [every * (i + 1) for i in range(len(losses) - 1)]
  record = dict(name=name, kind=kind, steps=steps, loss=list(losses),
                step_times=[5.0] + [step_s] * (steps[-1] - 1), median_step_s=step_s,
                first_step_s=5.0, final_loss=losses[-1], state_bytes=2**20, peak_rss_mb=100.0,
                seconds=[5.0 + step_s * (step - 1) for step in steps])
  if group:
    record["group"] = group
  return record


def test_results_go_to_a_git_ignored_folder_unless_asked(tmp_path):
  assert harness.output_stem(None, "name") == harness.LOCAL_RESULTS / "name"
  assert harness.LOCAL_RESULTS.relative_to(BENCHMARKS / "results") == pathlib.Path("local")
  ignored = (REPO_ROOT / ".gitignore").read_text(encoding="utf-8").split()
  assert "benchmarks/results/local/" in ignored
  stem = harness.output_stem(str(tmp_path / "sub" / "run.v2.json"), "name")
  assert stem == tmp_path / "sub" / "run.v2" and stem.parent.is_dir()
  assert harness.with_suffix(stem, ".png") == tmp_path / "sub" / "run.v2.png"


def test_typical_step_time_counts_periodic_slow_steps_not_a_few_stragglers():
  times = [9.0] + ([0.1] * 19 + [2.1]) * 6  # a 2 s refresh every 20 steps
  record = dict(step_times=times)
  assert harness.typical_step_s(record) == pytest.approx(0.2)
  times[5] = times[30] = 50.0  # two steps slowed by another process
  assert harness.typical_step_s(record) == pytest.approx(0.2)


def test_verdict_says_who_won_and_how_much_faster_kfac_reached_adam():
  best = {
      "jkfac": _record("jkfac", "jkfac", [500, 150, 100, 90], step_s=0.4),
      "adam": _record("adam lr=0.001", "adam", [500, 300, 200, 160], step_s=0.1, group="adam"),
      "kfac-jax adaptive": _record("kfac-jax adaptive", "kfac_jax", [500, 400, 300, 200]),
  }
  verdict = harness.verdict(best)
  text = "\n".join(verdict["lines"])
  assert verdict["lowest"] == "jkfac" and text.startswith("Lowest final loss: jkfac, 90")
  assert verdict["target"] == 160
  reached = verdict["reached"]["jkfac"]
  assert reached["steps"] == 10 and reached["fewer_steps"] == pytest.approx(3.0)
  assert reached["less_time"] == pytest.approx(30 * 0.1 / (10 * 0.4))
  assert "jkfac reached it at step 10: 3.0x fewer steps than Adam and 1.3x more time" in text
  assert verdict["reached"]["kfac-jax adaptive"] is None
  assert "kfac-jax adaptive did not reach 160 in 30 steps (its lowest: 200)" in text
  assert "median" in text and "busy machine" in text
  assert harness.verdict({"jkfac": best["jkfac"]})["lines"][-1] == "No Adam run to compare with."


def test_the_table_has_no_empty_column():
  mnist = _load("mnist_autoencoder")
  quick = [_record(n, k, [500] + [100] * 15) for n, k in (("jkfac", "jkfac"), ("adam", "adam"))]
  assert mnist.midway_step(quick) == 70  # 150 steps: 200 does not exist
  full = [_record(n, k, [500] + [100] * 50, every=20) for n, k in (("a", "jkfac"), ("b", "adam"))]
  assert mnist.midway_step(full) == 200
  short = [_record("a", "jkfac", [500, 100])]
  assert mnist.midway_step(short) is None  # no step before the end: the column is left out
  summary = mnist.summarise(quick)
  assert all(row["loss_at_midway"] is not None for row in summary["table"])


def test_equal_damping_compares_jkfac_with_kfac_jax_from_the_same_damping():
  mnist = _load("mnist_autoencoder")
  losses = [500, 300, 200, 150, 120, 100, 90, 85, 80, 75, 70]  # steps 1, 10, ..., 100
  best = {
      "jkfac": dict(_record("jkfac", "jkfac", [500, 200, 120, 90, 70, 65, 60, 58, 56, 54, 52],
                            step_s=0.2), damping=1.0),
      "jkfac from damping 150": dict(_record("jkfac from damping 150", "jkfac",
                                             [500] * 11, step_s=0.2), damping=150.0),
      "kfac-jax adaptive": dict(_record("kfac-jax adaptive", "kfac_jax", losses, step_s=0.4),
                                adaptive=True, initial_damping=150.0),
      "kfac-jax adaptive from damping 1": dict(
          _record("kfac-jax adaptive from damping 1", "kfac_jax", losses, step_s=0.4),
          adaptive=True, initial_damping=1.0),
  }
  rows = {row["initial_damping"]: row for row in mnist.equal_damping(best)}
  assert rows[1.0]["jkfac"] == "jkfac" and rows[1.0]["target_loss"] == 70
  assert rows[1.0]["steps"] == {"kfac-jax adaptive from damping 1": 100, "jkfac": 40}
  assert rows[1.0]["step_fraction"] == pytest.approx(0.4)
  assert rows[1.0]["time_fraction"] == pytest.approx(40 * 0.2 / (100 * 0.4))
  assert rows[150.0]["jkfac"] == "jkfac from damping 150"
  assert rows[150.0]["step_fraction"] is None and rows[150.0]["time_fraction"] is None


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_help_explains_every_option_and_runs_nothing(script, tmp_path):
  # The committed results (`local/` is other tests' scratch, made by `output_stem`).
  committed = lambda: sorted((p, p.stat().st_mtime_ns) for p in
                             (BENCHMARKS / "results").iterdir() if p.name != "local")
  results = committed()
  proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                        cwd=tmp_path, timeout=300, env=dict(os.environ, COLUMNS="1000"),
                        check=False)
  assert proc.returncode == 0, proc.stderr
  options = proc.stdout.split("\noptions:\n", 1)[1]
  entries = re.findall(r"^  (-[^\n]*(?:\n {6,}[^\n]*)*)", options, flags=re.M)
  assert any(entry.startswith("--out PATH_STEM") for entry in entries), options
  for entry in entries:
    flag, _, text = entry.partition("  ")
    if flag.startswith("-h,") or " " not in flag.strip():  # --help, and flags (no value)
      assert text.strip(), entry
    else:
      assert "default" in text, entry
  assert committed() == results
  assert not list(tmp_path.iterdir())


def test_train_loop_evaluates_what_evaluated_picks_from_the_state():
  # The Polyak-averaged runs: training goes on from the iterate, the metric is
  # read at the average kept in the state.
  import jax.numpy as jnp
  step = lambda p, s, batch, key: (p + 1.0, s + 10.0, p)  # parameters 1, 2, ...; state 10, 20, ...
  evaluate = lambda p: dict(loss=p)
  plain = harness.train_loop(dict(name="plain"), 4, step, jnp.zeros([]), jnp.zeros([]),
                             lambda k: None, evaluate, 2, 0)
  picked = harness.train_loop(dict(name="picked"), 4, step, jnp.zeros([]), jnp.zeros([]),
                              lambda k: None, evaluate, 2, 0, lambda p, s: s)
  assert plain["steps"] == picked["steps"] == [1, 2, 4]
  assert plain["loss"] == [1.0, 2.0, 4.0]
  assert picked["loss"] == [10.0, 20.0, 40.0]


def test_the_benchmarks_burn_in_on_the_whole_first_batch_once():
  """`burning_in_first` (the autoencoder's jkfac) burns the factors in on the
  first batch's slices (with statistics on a quarter, four passes: the whole
  batch) before its first step only: after it, a dense layer's input factor
  `A` is the mean of the whole batch's and the first quarter's (the burn-in
  counting as one update)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import jkfac

  x = jax.random.uniform(jax.random.PRNGKey(0), (8, 3), jnp.float32)
  params = {"w": jnp.zeros((3, 3), jnp.float32), "b": jnp.zeros((3,), jnp.float32)}
  est = jkfac.estimator(lambda p, x: jkfac.sigmoid_cross_entropy(x @ p["w"] + p["b"], x),
                        params, x, stats_fraction=0.25)
  tx = jkfac.kfac(est)

  @jax.jit
  def step(params, state, batch, key):
    loss, grads, stats = est(params, batch, rng=key)
    updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state, loss

  wrapped = harness.burning_in_first(step, lambda p, b, k: est(p, b, rng=k)[2], 4)
  assert wrapped.lower == step.lower
  _, state, _ = wrapped(params, tx.init(params), x, jax.random.PRNGKey(1))
  homogeneous = lambda rows: jnp.concatenate([rows, jnp.ones((rows.shape[0], 1))], axis=1)
  a = lambda rows: homogeneous(rows).T @ homogeneous(rows) / rows.shape[0]
  (name,) = state.preconditioner.factors
  np.testing.assert_allclose(state.preconditioner.factors[name]["A"], (a(x) + a(x[:2])) / 2,
                             rtol=1e-5)
  assert int(state.preconditioner.burned_in) == 4
  _, state, _ = wrapped(params, state, x, jax.random.PRNGKey(2))
  assert int(state.preconditioner.burned_in) == 4 and int(state.preconditioner.count) == 2
