# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""What every benchmark shares: one process per run, the training loop's
records, the best of a learning-rate grid, and the plots.

A benchmark script describes its runs as dicts (`name`, `kind`, an optional
`group` for a grid, and the optimizer's settings) and gives `train_loop` a
jitted step and an evaluation function. `run_in_subprocess` re-runs the
script with `--worker` so that each run's peak memory is its own.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import platform
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Optional

import numpy as np


def run_in_subprocess(script: str, run: dict[str, Any], argv: list[str]) -> dict[str, Any]:
  """Runs `script argv --worker <run>` and returns the record it writes."""
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "record.json"
    spec = json.dumps(dict(run=run, out=str(out)))
    proc = subprocess.run([sys.executable, script, *argv, "--worker", spec], check=False)
    if proc.returncode != 0 or not out.exists():
      return dict(run, error=f"worker exited with status {proc.returncode}")
    return json.loads(out.read_text())


def kfac_jax_status() -> tuple[bool, str]:
  """(True, version) when kfac-jax imports and works here, else (False, why)."""
  try:
    import kfac_jax_runner
    return kfac_jax_runner.available()
  except ImportError as e:
    return False, str(e)


def run_all(script: str, runs: list[dict[str, Any]], argv: list[str]) -> list[dict[str, Any]]:
  """Runs every run in its own process, one after the other; reports failures."""
  records = [run_in_subprocess(script, run, argv) for run in runs]
  for r in records:
    if "error" in r:
      print(f"  {r['name']}: FAILED ({r['error']})")
  return records


def worker(spec_json: str, train: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
  """The `--worker` side of `run_in_subprocess`."""
  spec = json.loads(spec_json)
  pathlib.Path(spec["out"]).write_text(json.dumps(train(spec["run"])))


def machine(extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
  """The machine and library versions, for the results file."""
  import jax
  info = dict(platform=platform.platform(), python=platform.python_version(),
              cpus=os.cpu_count(), jax=jax.__version__,
              devices=[str(d) for d in jax.devices()])
  info.update(extra or {})
  return info


def state_bytes(state: Any) -> int:
  """Bytes of the array leaves of an optimizer state."""
  import jax
  return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(state) if hasattr(x, "nbytes")))


def train_loop(run: dict[str, Any], total: int, step: Callable, params: Any, state: Any,
               batches: Callable[[int], Any], evaluate: Callable[[Any], dict[str, float]],
               eval_every: int, seed: int) -> dict[str, Any]:
  """Trains for `total` steps, timing each and evaluating every `eval_every`.

  Args:
    run: the run's description (copied into the record).
    total: steps.
    step: `(params, state, batch, key) -> (params, state, loss)`, jitted.
    params: the initial parameters.
    state: the initial optimizer state.
    batches: `k -> batch` for step k.
    evaluate: `params -> {metric: value}`; the first metric is the one a
      run is judged by (lower is better).
    eval_every: evaluation period, in steps.
    seed: seeds the keys given to `step`.

  Returns:
    The record: the run's fields, `steps`, `seconds` (training time only,
    compile included), one list per metric, `step_times`, `first_step_s`,
    `median_step_s`, `state_bytes`, `peak_rss_mb`, and `diverged_at` if the
    loss stopped being finite.
  """
  import jax
  from tqdm import tqdm

  record = dict(run, steps=[], seconds=[], step_times=[])
  elapsed = 0.0
  key = jax.random.PRNGKey(seed)
  bar = tqdm(range(total), desc=f"{run['name']:>24}", leave=True, ncols=100,
             file=sys.stderr, mininterval=1.0)
  for k in bar:
    batch = batches(k)
    key, sub = jax.random.split(key)
    start = time.perf_counter()
    params, state, loss = step(params, state, batch, sub)
    loss = float(jax.block_until_ready(loss))
    took = time.perf_counter() - start
    elapsed += took
    record["step_times"].append(took)
    if k == 0 or (k + 1) % eval_every == 0 or k == total - 1:
      metrics = evaluate(params)
      record["steps"].append(k + 1)
      record["seconds"].append(elapsed)
      for name, value in metrics.items():
        record.setdefault(name, []).append(float(value))
      first = next(iter(metrics))
      bar.set_postfix({first: f"{float(metrics[first]):.4g}"})
    if not math.isfinite(loss):
      record["diverged_at"] = k
      break
  times = record["step_times"]
  record.update(
      first_step_s=times[0],
      median_step_s=float(np.median(times[1:])) if len(times) > 1 else float("nan"),
      state_bytes=state_bytes(state),
      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
  return record


def best_of_groups(records: Iterable[dict[str, Any]], metric: str) -> dict[str, dict[str, Any]]:
  """The run with the lowest final `metric` in each group (a grid), by group name."""
  best: dict[str, dict[str, Any]] = {}
  for r in records:
    if "error" in r or "diverged_at" in r:
      continue
    group = r.get("group", r["name"])
    if group not in best or r[metric][-1] < best[group][metric][-1]:
      best[group] = r
  return best


def value_at(record: dict[str, Any], metric: str, step: int) -> Optional[float]:
  """The metric recorded at `step`, if it was evaluated there."""
  for s, value in zip(record["steps"], record[metric]):
    if s == step:
      return value
  return None


def seconds_to(record: dict[str, Any], metric: str, target: float) -> Optional[float]:
  """Training seconds until `metric` first reached `target` (lower is better)."""
  for value, seconds in zip(record[metric], record["seconds"]):
    if value <= target:
      return seconds
  return None


def plot(records: Iterable[dict[str, Any]], metrics: list[tuple[str, str, bool]],
         path: pathlib.Path, title: str) -> None:
  """One row per metric, against steps and against seconds.

  Args:
    records: the runs to draw.
    metrics: `(key, axis label, log scale)` per row.
    path: the PNG file.
    title: the figure's title.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  records = list(records)
  fig, axes = plt.subplots(len(metrics), 2, figsize=(12, 4.2 * len(metrics)), squeeze=False)
  for row, (key, label, log) in zip(axes, metrics):
    for r in records:
      style = r.get("plot_style", {})  # optional matplotlib options of a run's line
      row[0].plot(r["steps"], r[key], label=r["name"], **style)
      row[1].plot(r["seconds"], r[key], label=r["name"], **style)
    for ax, xlabel in zip(row, ("step", "seconds (training steps only, compile included)")):
      ax.set_xlabel(xlabel)
      ax.set_ylabel(label)
      if log:
        ax.set_yscale("log")
      ax.grid(True, which="both", alpha=0.3)
      ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
