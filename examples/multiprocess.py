# Copyright 2026 The jkfac Authors. Licensed under the Apache License 2.0.
"""Multi-process data-parallel K-FAC with `jax.distributed` (several hosts, or
several processes on one machine).

Launch it once per process, each with its own `--process-id`, the same
coordinator address and process count; on one machine this script can
launch all of them itself:

    python examples/multiprocess.py --launch 2 --local-devices 4     # 2 x 4 CPU devices
    # on host k of n:
    python examples/multiprocess.py --process-id k --processes n \\
        --coordinator host0:12355

Every process feeds its own part of each global batch
(`jax.make_array_from_process_local_data`); one `jax.jit` step over a mesh
of all the processes' devices trains the model (jkfac needs no `axis_name`
there: the statistics are the whole batch's), and `mesh=` spreads the
inverse work over every device; `--axes explicit` makes the mesh's axes
Explicit (sharding in types, `jax.make_mesh`'s default since JAX 0.9) and runs
the step under `jax.set_mesh`; `--shard-state` splits the optimizer's factors
and inverses over all the processes' devices. Each process prints the largest difference
between its parameters and those of one device training on the whole batch
(it recomputes them locally), which is round-off.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--launch", type=int, default=0,
                      help="start this many processes on this machine and wait for them")
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--processes", type=int, default=1)
  parser.add_argument("--coordinator", default="127.0.0.1:12355")
  parser.add_argument("--local-devices", type=int, default=4,
                      help="CPU devices per process (XLA_FLAGS)")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--axes", choices=("auto", "explicit"), default="auto",
                      help="the mesh's axis type: Auto (Mesh(...)) or Explicit "
                           "(jax.make_mesh's default since JAX 0.9, under jax.set_mesh)")
  parser.add_argument("--shard-state", action="store_true",
                      help="split the optimizer's factors and inverses over all the "
                           "devices (kfac(..., shard_state=True))")
  return parser.parse_args(argv)


def launch(args: argparse.Namespace) -> int:
  """Starts `args.launch` processes of this script; returns the worst exit status."""
  procs = [subprocess.Popen([sys.executable, __file__, "--process-id", str(i), "--processes",
                             str(args.launch), "--coordinator", args.coordinator,
                             "--local-devices", str(args.local_devices),
                             "--steps", str(args.steps), "--axes", args.axes]
                            + (["--shard-state"] if args.shard_state else []))
           for i in range(args.launch)]
  return max(p.wait() for p in procs)


def train(args: argparse.Namespace) -> None:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.local_devices}")
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_x64", True)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(args.coordinator, num_processes=args.processes,
                             process_id=args.process_id)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np
  import optax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  import jkfac

  sizes, examples = (6, 10, 8, 4), 64
  key = jax.random.PRNGKey(0)
  params = {}
  for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, sub = jax.random.split(key)
    params[f"l{i}"] = {"w": jax.random.normal(sub, (fan_in, fan_out)) / np.sqrt(fan_in),
                       "b": jnp.zeros(fan_out)}
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (examples, sizes[0])))
  y = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (examples,), 0, sizes[-1]))

  def forward(p, x):
    for i in range(len(p)):
      x = x @ p[f"l{i}"]["w"] + p[f"l{i}"]["b"]
      x = jnp.tanh(x) if i < len(p) - 1 else x
    return x

  loss_fn = lambda p, x, y: jkfac.softmax_cross_entropy(forward(p, x), y)

  def run(x, y, mesh):
    est = jkfac.estimator(loss_fn, params, x, y, mode="exact")
    tx = jkfac.kfac(est, damping=1e-2, inverse_every=2, mesh=mesh,
                    shard_state=args.shard_state and mesh is not None)

    @jax.jit
    def step(p, state, x, y):
      _, grads, stats = est(p, x, y)
      updates, state = tx.update(grads, state, p, stats=stats)
      return optax.apply_updates(p, updates), state

    p, state = params, tx.init(params)
    for _ in range(args.steps):
      p, state = step(p, state, x, y)
    return p

  if args.axes == "explicit":
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Explicit,))
  else:
    mesh = Mesh(np.array(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  local = slice(args.process_id * examples // args.processes,
                (args.process_id + 1) * examples // args.processes)
  global_x = jax.make_array_from_process_local_data(sharding, x[local], x.shape)
  global_y = jax.make_array_from_process_local_data(sharding, y[local], y.shape)
  with jax.set_mesh(mesh) if args.axes == "explicit" else contextlib.nullcontext():
    many = run(global_x, global_y, mesh)
  many = jax.tree_util.tree_map(
      lambda a: np.asarray(jax.experimental.multihost_utils.process_allgather(a, tiled=True)),
      many)
  one = run(jnp.asarray(x), jnp.asarray(y), None)
  difference = max(float(np.max(np.abs(a - np.asarray(b))))
                   for a, b in zip(jax.tree_util.tree_leaves(many), jax.tree_util.tree_leaves(one)))
  print(f"process {args.process_id}/{args.processes}: {jax.local_device_count()} local devices, "
        f"{jax.device_count()} in all; largest difference from one device on the whole "
        f"batch after {args.steps} steps: {difference:.2e}", flush=True)
  if not difference < 1e-8:
    raise SystemExit(f"process {args.process_id}: parameters differ by {difference}")


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.launch:
    sys.exit(launch(args))
  train(args)


if __name__ == "__main__":
  main()
