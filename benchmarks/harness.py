# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""What every benchmark shares: one process per run, the training loop's
records, the best of a learning-rate grid, the verdict, where results are
written, the command-line help, and the plots.

A benchmark script describes its runs as dicts (`name`, `kind`, an optional
`group` for a grid, and the optimizer's settings) and gives `train_loop` a
jitted step and an evaluation function. `run_in_subprocess` re-runs the
script with `--worker` so that each run's peak memory is its own.

Results go to `benchmarks/results/local/` (git-ignored) unless a script is
given `--out PATH_STEM`; the committed results in `benchmarks/results/` are
written only that way (`--out benchmarks/results/<name>`).
"""

from __future__ import annotations

import argparse
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
import traceback
from typing import Any, Callable, Iterable, Optional

import numpy as np

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
#: Where results go without `--out`: git-ignored, so no run overwrites a committed file.
LOCAL_RESULTS = RESULTS / "local"


#: What `--data-dir` does when it is not given (benchmarks/datasets.py's `find_data_dir`).
DATA_DIR_DEFAULT = ("default: $JKFAC_DATA_DIR, then ../shared/data beside the repository; "
                    "see benchmarks/datasets.py")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """`--help`: the script's docstring as written, and each option's default.

  The default is appended as "(default: X)" unless the help already says
  what it is (options whose default depends on others, such as `--steps`
  with `--quick`, say so in their help) or the option is a flag.
  """

  def _get_help_string(self, action: argparse.Action) -> str:
    text = action.help or ""
    if (not action.option_strings or action.nargs == 0 or "default" in text
        or action.default in (None, argparse.SUPPRESS)):
      return text
    return text + " (default: %(default)s)"


def add_out_argument(parser: argparse.ArgumentParser, default_name: str,
                     plot: bool = True) -> None:
  """The `--out PATH_STEM` option every benchmark has.

  Args:
    parser: the script's parser.
    default_name: the file stem used without `--out` (in `LOCAL_RESULTS`);
      may mention the options it depends on.
    plot: whether the script writes a `.png` beside its `.json`.
  """
  parser.add_argument(
      "--out", default=None, metavar="PATH_STEM",
      help=f"write the results to PATH_STEM.json{' and PATH_STEM.png' if plot else ''}, a "
           "path relative to the current folder; the committed results are made with --out "
           f"benchmarks/results/<name> (default: {_relative(LOCAL_RESULTS)}/{default_name}, "
           "git-ignored)")


def _relative(path: pathlib.Path) -> str:
  """`path` relative to the current folder when it is inside it, else absolute."""
  try:
    return str(path.resolve().relative_to(pathlib.Path.cwd().resolve()))
  except ValueError:
    return str(path)


def output_stem(out: Optional[str], default_name: str) -> pathlib.Path:
  """Where a benchmark writes its results, without the suffix; its folder is created.

  Args:
    out: the `--out` value (a path stem, relative to the current folder; a
      trailing `.json` or `.png` is dropped), or None.
    default_name: the stem in `LOCAL_RESULTS` when `out` is None.

  Returns:
    The path stem: the caller writes `<stem>.json` and `<stem>.png`.
  """
  if out:
    stem = pathlib.Path(out).expanduser()
    if stem.suffix in (".json", ".png"):
      stem = stem.with_suffix("")
  else:
    stem = LOCAL_RESULTS / default_name
  stem.parent.mkdir(parents=True, exist_ok=True)
  return stem


def with_suffix(stem: pathlib.Path, suffix: str) -> pathlib.Path:
  """`stem` + `suffix` (`.json`, `.png`), whatever dots the stem's name has."""
  return stem.parent / (stem.name + suffix)


def run_in_subprocess(script: str, run: dict[str, Any], argv: list[str]) -> dict[str, Any]:
  """Runs `script argv --worker <run>` and returns the record it writes."""
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "record.json"
    spec = json.dumps(dict(run=run, out=str(out)))
    proc = subprocess.run([sys.executable, script, *argv, "--worker", spec], check=False)
    if proc.returncode != 0 or not out.exists():
      return dict(run, error=f"worker exited with status {proc.returncode}")
    return json.loads(out.read_text())


#: How to add kfac-jax to a comparison (kfac-jax 0.0.8 runs on JAX 0.8.3, not on newer JAX).
KFAC_JAX_INSTALL = ('pip install "jax==0.8.3" "jaxlib==0.8.3" "kfac-jax==0.0.8" to compare '
                    "with it")


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
  try:
    record = train(spec["run"])
  except Exception as e:  # pylint: disable=broad-except
    # The reason goes into the results (kfac-jax failing on a model, say), the traceback to stderr.
    traceback.print_exc()
    record = dict(spec["run"], error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
  pathlib.Path(spec["out"]).write_text(json.dumps(record))


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
               eval_every: int, seed: int,
               evaluated: Optional[Callable[[Any, Any], Any]] = None) -> dict[str, Any]:
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
    evaluated: `(params, state) -> the parameters to evaluate` (e.g. a
      Polyak average kept in the state); None: the parameters.

  Returns:
    The record: the run's fields, `steps`, `seconds` (training time only,
    compile included), one list per metric, `step_times`, `first_step_s`
    (compile included), `compile_s` (tracing and XLA compilation alone, or
    None when the step compiles inside itself, as kfac-jax's does),
    `median_step_s`, `state_bytes`, `peak_rss_mb`, and `diverged_at` if the
    loss stopped being finite.
  """
  import jax
  from tqdm import tqdm

  record = dict(run, steps=[], seconds=[], step_times=[])
  elapsed = 0.0
  key = jax.random.PRNGKey(seed)
  name = run["name"]
  bar = None
  for k in range(total):
    batch = batches(k)
    key, sub = jax.random.split(key)
    start = time.perf_counter()
    if k == 0:
      record["compile_s"] = _compile(name, step, (params, state, batch, sub))
    params, state, loss = step(params, state, batch, sub)
    loss = float(jax.block_until_ready(loss))
    took = time.perf_counter() - start
    elapsed += took
    record["step_times"].append(took)
    if bar is None:
      print(f"{name}: first step done in {took:.1f} s (compilation included); training "
            f"{total} steps", file=sys.stderr, flush=True)
      bar = tqdm(total=total, initial=1, desc=f"{name:>24}", leave=True, ncols=100,
                 file=sys.stderr, mininterval=1.0)
    else:
      bar.update(1)
    if k == 0 or (k + 1) % eval_every == 0 or k == total - 1:
      metrics = evaluate(params if evaluated is None else evaluated(params, state))
      record["steps"].append(k + 1)
      record["seconds"].append(elapsed)
      for metric, value in metrics.items():
        record.setdefault(metric, []).append(float(value))
      first = next(iter(metrics))
      bar.set_postfix({first: f"{float(metrics[first]):.4g}"})
    if not math.isfinite(loss):
      record["diverged_at"] = k
      break
  if bar is not None:
    bar.close()
  times = record["step_times"]
  record.update(
      first_step_s=times[0],
      median_step_s=float(np.median(times[1:])) if len(times) > 1 else float("nan"),
      state_bytes=state_bytes(state),
      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
  return record


def burning_in_first(step: Callable, stats_of: Callable, passes: int) -> Callable:
  """`step`, whose first call burns the factors in on its batch first (`jkfac.burn_in`).

  One estimator pass per slice of the batch (`passes` of them, the batch
  rolled by a slice each time along its first axis: with statistics on
  `1/passes` of a batch, the passes cover it once). The burn-in compiles and
  runs inside the first call, so the first step's time includes it as
  kfac-jax's includes its burn-in.

  Args:
    step: `(params, state, batch, key) -> (params, state, loss)`, jitted;
      `state` holds the K-FAC state anywhere in its tree.
    stats_of: `(params, batch, key) -> the batch's jkfac Statistics`.
    passes: the estimator passes.

  Returns:
    The step; its `lower` is `step`'s, for the ahead-of-time compilation.
  """
  import jax
  import jax.numpy as jnp
  import jkfac

  @jax.jit
  def burned_in(params, state, batch, key):
    def one(i, state):
      rolled = jax.tree.map(lambda x: jnp.roll(x, -i * (x.shape[0] // passes), axis=0), batch)
      return jkfac.burn_in(state, stats_of(params, rolled, jax.random.fold_in(key, i + 1)))
    return jax.lax.fori_loop(0, passes, one, state)

  pending = [True]

  def first_burning_in(params, state, batch, key):
    if pending:
      state = burned_in(params, state, batch, key)
      pending.clear()
    return step(params, state, batch, key)

  first_burning_in.lower = step.lower
  return first_burning_in


def _compile(name: str, step: Callable, args: tuple) -> Optional[float]:
  """Traces and compiles a jitted step ahead of its first call, saying so.

  `jax.jit` keeps what `lower(...).compile()` made, so the first call that
  follows does not compile again. A step that is not a `jax.jit` function
  (kfac-jax's, which compiles inside) is left to compile in its first call.

  Args:
    name: the run's name, for the messages.
    step: the step function.
    args: its first arguments.

  Returns:
    The seconds tracing and compiling took, or None when not done here.
  """
  if not hasattr(step, "lower"):
    print(f"{name}: first step (it compiles inside: tracing, XLA compilation) ...",
          file=sys.stderr, flush=True)
    return None
  print(f"{name}: compiling the step (trace + XLA compile) ...", file=sys.stderr, flush=True)
  start = time.perf_counter()
  step.lower(*args).compile()
  took = time.perf_counter() - start
  print(f"{name}: compiled in {took:.1f} s", file=sys.stderr, flush=True)
  return took


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
  """Training seconds until `metric` first reached `target` (lower is better).

  Wall-clock, compilation included: on a busy machine a few slow steps move
  it. `time_to` (steps times `typical_step_s`) is the robust figure.
  """
  for value, seconds in zip(record[metric], record["seconds"]):
    if value <= target:
      return seconds
  return None


def steps_to(record: dict[str, Any], metric: str, target: float) -> Optional[int]:
  """The first evaluated step at which `metric` was at or below `target`, or None."""
  for value, step in zip(record[metric], record["steps"]):
    if value <= target:
      return step
  return None


#: Steps per window of `typical_step_s`: a multiple of jkfac's (20) and kfac-jax's (5)
#: inverse refresh periods, so that every window holds its share of refreshes.
WINDOW = 20


def typical_step_s(record: dict[str, Any]) -> float:
  """A run's step time, robust to a busy machine: the median over 20-step windows of their mean.

  The first step (compilation) is left out. Every window holds the same
  share of the periodic slow steps (inverse refreshes), which a plain median
  of the steps would ignore; a few steps slowed down by other processes
  move only their windows, which the median ignores.

  Args:
    record: a run's record (its `step_times`).

  Returns:
    Seconds per step (the plain mean when fewer than 20 steps followed the first).
  """
  times = record["step_times"][1:]
  if not times:
    return float("nan")
  if len(times) < WINDOW:
    return float(np.mean(times))
  means = [np.mean(times[i:i + WINDOW]) for i in range(0, len(times) - WINDOW + 1, WINDOW)]
  return float(np.median(means))


def time_to(record: dict[str, Any], metric: str, target: float) -> Optional[dict[str, float]]:
  """Steps to `target` and their time, as that many steps at the typical step time.

  Args:
    record: a run's record.
    metric: the metric (lower is better).
    target: the value to reach.

  Returns:
    `{"steps": k, "step_s": typical_step_s(record), "seconds": k * step_s}`,
    or None when the run never reached `target`. Compilation is not counted.
  """
  steps = steps_to(record, metric, target)
  if steps is None:
    return None
  step_s = typical_step_s(record)
  return dict(steps=steps, step_s=step_s, seconds=steps * step_s)


KFAC_KINDS = ("jkfac", "kfac_jax")


def _times(ratio: float, fewer: str, more: str, same: str) -> str:
  """`ratio` (Adam's figure over the run's) in words: "3.2x fewer steps than", "1.5x more time"."""
  if 0.95 <= ratio <= 1.05:
    return same
  return f"{ratio:.1f}x {fewer}" if ratio > 1 else f"{1 / ratio:.1f}x {more}"


def verdict(best: dict[str, dict[str, Any]], metric: str = "loss",
            describe: str = "loss") -> dict[str, Any]:
  """The benchmark's answer in words: who got lowest, and how fast K-FAC reached Adam.

  Args:
    best: the best run of each group (`best_of_groups`).
    metric: the metric runs are judged by (lower is better).
    describe: how to call it in the sentences.

  Returns:
    `lines` (the sentences to print) and the figures behind them: `lowest`
    (run name), `target` (the best Adam's final value, when Adam ran),
    `adam_time` (`time_to` of that Adam run) and, per K-FAC run (jkfac's and
    kfac-jax's), `reached`: its `time_to` (steps, typical step time, their
    product) with `fewer_steps` and `less_time` (Adam's figure over the
    run's), or None if it never reached the target.
  """
  if not best:
    return dict(lines=["No run finished: no verdict."])
  runs = sorted(best.values(), key=lambda r: r[metric][-1])
  lowest = runs[0]
  others = "; ".join(f"{r['name']} {r[metric][-1]:.4g}" for r in runs[1:])
  lines = [f"Lowest final {describe}: {lowest['name']}, {lowest[metric][-1]:.4g} after "
           f"{lowest['steps'][-1]} steps" + (f" ({others})." if others else ".")]
  out: dict[str, Any] = dict(lowest=lowest["name"], reached={})
  adams = [r for r in runs if r.get("kind") == "adam"]
  if not adams:
    lines.append("No Adam run to compare with.")
    out["lines"] = lines
    return out
  adam = adams[0]
  target = adam[metric][-1]
  adam_time = time_to(adam, metric, target)
  out.update(target=target, adam=adam["name"], adam_time=adam_time)
  lines.append(f"The best Adam ({adam['name']}) ended at {describe} {target:.4g}; it first "
               f"got there at step {adam_time['steps']} ({adam_time['steps']} x "
               f"{adam_time['step_s']:.3f} s = {adam_time['seconds']:.1f} s).")
  every = sorted({b - a for r in runs for a, b in zip(r["steps"][1:], r["steps"][2:])})
  for r in runs:
    if r.get("kind") not in KFAC_KINDS:
      continue
    reached = time_to(r, metric, target)
    if reached is None:
      out["reached"][r["name"]] = None
      lines.append(f"{r['name']} did not reach {target:.4g} in {r['steps'][-1]} steps "
                   f"(its lowest: {min(r[metric]):.4g}).")
      continue
    fewer = adam_time["steps"] / reached["steps"]
    less = adam_time["seconds"] / reached["seconds"]
    out["reached"][r["name"]] = dict(reached, fewer_steps=fewer, less_time=less)
    lines.append(f"{r['name']} reached it at step {reached['steps']}: "
                 f"{_times(fewer, 'fewer steps than', 'more steps than', 'as many steps as')} "
                 "Adam and "
                 f"{_times(less, 'less time', 'more time', 'about the same time')} "
                 f"({reached['steps']} x {reached['step_s']:.3f} s = {reached['seconds']:.1f} s).")
  lines.append(f"Time to a {describe} = the steps to reach it x the run's typical step time "
               f"(the median over {WINDOW}-step windows of their mean step time: inverse "
               "refreshes count, a few steps slowed by a busy machine do not, compilation is "
               "not counted)" + (f"; steps are counted where the {describe} is evaluated "
                                 f"(every {every[-1]} steps)." if every else "."))
  out["lines"] = lines
  return out


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
