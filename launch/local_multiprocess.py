#!/usr/bin/env python3
"""Runs N cooperating processes of ``python -m mdm_jax.main`` on this machine.

Each process gets JAX_COORDINATOR_ADDRESS=localhost:PORT, JAX_NUM_PROCESSES=N
and JAX_PROCESS_ID=i (read by ``mdm_jax/core/distributed.py``, which then calls
``jax.distributed.initialize`` and, on CPU, switches on gloo collectives), so
together they form one JAX job exactly as the hosts of a TPU pod or a SLURM
allocation do.  Everything after ``--`` is passed to ``mdm_jax.main``.

  python launch/local_multiprocess.py --num_processes=2 --devices_per_process=2 -- \\
      --config=shakespeare_prime:tiny --workdir=runs/mp2

* ``--devices_per_process`` (CPU): simulated CPU devices per process, via
  ``XLA_FLAGS=--xla_force_host_platform_device_count``; the job then has
  N x that many devices in one global mesh.
* A free TCP port on localhost is picked unless ``--port`` is given.
* Each process writes stdout+stderr to ``LOG_DIR/process_<i>.log``
  (default ``<workdir>/logs``); process 0's output is also echoed here.
* Each process's PID is written to ``LOG_DIR/process_<i>.pid`` (to signal one
  process, e.g. ``kill -TERM $(cat runs/x/logs/process_1.pid)``).
* The launcher waits for all processes.  If one fails, the others are
  terminated and the launcher exits with the failing process's status
  (or 1 if it died of a signal); Ctrl-C terminates all of them.
* Status 75 (``mdm_jax.main`` was preempted: SIGTERM, the step saved) is not a
  failure of one process: every process saves the same step and exits 75 on its
  own, so the launcher waits up to ``--preemption_grace`` seconds for the others
  before it stops them, and exits with 75.
* ``--timeout``: past it, every process is first sent SIGUSR1 (``mdm_jax.main``
  then writes all its threads' Python stacks to its log), then all are stopped,
  the last lines of each log are printed, and the launcher exits with 124.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREEMPTED_EXIT_CODE = 75      # mdm_jax.trainers.preemption: saved the step, run again


def free_port(host: str = "localhost") -> int:
  """A TCP port that was free a moment ago (bind to port 0 and read it back)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, 0))
    return int(s.getsockname()[1])


def _workdir_from(args: List[str]) -> Optional[str]:
  for i, a in enumerate(args):
    if a.startswith("--workdir="):
      return a.split("=", 1)[1]
    if a == "--workdir" and i + 1 < len(args):
      return args[i + 1]
  return None


def _xla_flags(existing: str, devices: int) -> str:
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", existing or "").split()
  if devices > 0:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  return " ".join(flags)


def process_env(base: dict, *, port: int, num_processes: int, process_id: int,
                devices_per_process: int, platform: str) -> dict:
  env = dict(base)
  env["JAX_COORDINATOR_ADDRESS"] = f"localhost:{port}"
  env["JAX_NUM_PROCESSES"] = str(num_processes)
  env["JAX_PROCESS_ID"] = str(process_id)
  if platform:
    env["JAX_PLATFORMS"] = platform
  if platform == "cpu":
    env.setdefault("JAX_CPU_COLLECTIVES_IMPLEMENTATION", "gloo")
    env["XLA_FLAGS"] = _xla_flags(env.get("XLA_FLAGS", ""), devices_per_process)
    env.pop("JAX_NUM_CPU_DEVICES", None)
  # The package must be importable from any working directory.
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
  env.setdefault("PYTHONUNBUFFERED", "1")
  return env


def _pump(stream, log_file, echo):
  """Copies a child's output to its log file (and to our stdout for process 0)."""
  for line in iter(stream.readline, b""):
    log_file.write(line)
    log_file.flush()
    if echo:
      sys.stdout.buffer.write(line)
      sys.stdout.buffer.flush()
  stream.close()


def _terminate(procs, grace: float = 10.0):
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGTERM)
      except (ProcessLookupError, PermissionError):
        pass
  deadline = time.time() + grace
  for p in procs:
    while p.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    if p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass
      p.wait()


def _dump_stacks(procs, wait: float = 3.0):
  """SIGUSR1 to the running children: ``mdm_jax.main`` answers with every thread's Python stack
  (``faulthandler``) in its log, which shows where a hung job waits."""
  alive = [p for p in procs if p.poll() is None]
  for p in alive:
    try:
      os.kill(p.pid, signal.SIGUSR1)
    except (ProcessLookupError, PermissionError):
      pass
  if alive:
    time.sleep(wait)


def parse_args(argv: List[str]):
  if "--" in argv:
    cut = argv.index("--")
    own, child = argv[:cut], argv[cut + 1:]
  else:
    own, child = argv, []
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--num_processes", "-n", type=int, default=2)
  ap.add_argument("--devices_per_process", type=int, default=1,
                  help="CPU only: simulated devices per process (0 = leave XLA_FLAGS alone).")
  ap.add_argument("--platform", default="cpu",
                  help="JAX_PLATFORMS for the children (cpu, cuda, ...; '' = leave it).")
  ap.add_argument("--port", type=int, default=0, help="Coordinator port (0 = pick a free one).")
  ap.add_argument("--log_dir", default=None,
                  help="Per-process logs (default: <workdir>/logs, else ./multiprocess_logs).")
  ap.add_argument("--module", default="mdm_jax.main", help="Python module to run.")
  ap.add_argument("--python", default=sys.executable, help="Interpreter for the children.")
  ap.add_argument("--timeout", type=float, default=0,
                  help="Kill everything after this many seconds (0 = no limit).")
  ap.add_argument("--quiet", action="store_true", help="Do not echo process 0's output.")
  ap.add_argument("--preemption_grace", type=float, default=180,
                  help="After one process exits 75 (preempted), seconds to wait for the others "
                       "to save the same step and exit by themselves.")
  args = ap.parse_args(own)
  if args.num_processes < 1:
    ap.error("--num_processes must be >= 1")
  return args, child


def main(argv: Optional[List[str]] = None) -> int:
  args, child_args = parse_args(sys.argv[1:] if argv is None else argv)
  workdir = _workdir_from(child_args)
  log_dir = os.path.abspath(args.log_dir or (os.path.join(workdir, "logs") if workdir
                                             else "multiprocess_logs"))
  os.makedirs(log_dir, exist_ok=True)
  port = args.port or free_port()
  cmd = [args.python, "-m", args.module, *child_args]
  print(f"[launcher] {args.num_processes} processes, coordinator localhost:{port}, "
        f"logs in {log_dir}\n[launcher] command: {shlex.join(cmd)}", flush=True)

  procs, pumps, logs = [], [], []
  stop = {"signal": None}

  def on_signal(signum, _frame):
    stop["signal"] = signum

  old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    for i in range(args.num_processes):
      env = process_env(os.environ, port=port, num_processes=args.num_processes, process_id=i,
                        devices_per_process=args.devices_per_process, platform=args.platform)
      log = open(os.path.join(log_dir, f"process_{i}.log"), "wb")
      logs.append(log)
      p = subprocess.Popen(cmd, cwd=os.getcwd(), env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, start_new_session=True)
      procs.append(p)
      with open(os.path.join(log_dir, f"process_{i}.pid"), "w") as f:
        f.write(f"{p.pid}\n")
      t = threading.Thread(target=_pump, args=(p.stdout, log, i == 0 and not args.quiet),
                           daemon=True)
      t.start()
      pumps.append(t)

    start = time.time()
    status = 0
    preempted_at = None
    while True:
      codes = [p.poll() for p in procs]
      if PREEMPTED_EXIT_CODE in codes and all(c in (None, 0, PREEMPTED_EXIT_CODE)
                                              for c in codes):
        if all(c is not None for c in codes):
          print(f"[launcher] preempted: the processes saved their step and exited "
                f"{PREEMPTED_EXIT_CODE}; run the same command again to resume.",
                file=sys.stderr, flush=True)
          status = PREEMPTED_EXIT_CODE
          break
        preempted_at = preempted_at or time.time()
        if time.time() - preempted_at < args.preemption_grace:
          time.sleep(0.1)
          continue
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, c = failed[0]
        print(f"[launcher] process {i} exited with status {c}; stopping the others. "
              f"See {os.path.join(log_dir, f'process_{i}.log')}", file=sys.stderr, flush=True)
        status = c if c > 0 else 1
        break
      if all(c == 0 for c in codes):
        break
      if stop["signal"] is not None:
        print(f"[launcher] signal {stop['signal']}: stopping all processes.", file=sys.stderr,
              flush=True)
        status = 128 + int(stop["signal"])
        break
      if args.timeout and time.time() - start > args.timeout:
        print(f"[launcher] timeout after {args.timeout:.0f} s: stopping all processes "
              "(their Python stacks are dumped to their logs first).", file=sys.stderr,
              flush=True)
        _dump_stacks(procs)
        status = 124
        break
      time.sleep(0.1)
    _terminate(procs)
    for t in pumps:
      t.join(timeout=5)
    if status and status != PREEMPTED_EXIT_CODE:
      for i, p in enumerate(procs):
        if i != 0 or args.quiet:
          # After a timeout every process is of interest (a hang is usually two processes
          # waiting on each other); otherwise only the ones that failed by themselves.
          lines = 60 if status == 124 else 30
          tail = _tail(os.path.join(log_dir, f"process_{i}.log"), lines)
          if tail and (status == 124 or
                       p.returncode not in (0, None, -signal.SIGTERM, -signal.SIGKILL)):
            print(f"[launcher] last lines of process {i}:\n{tail}", file=sys.stderr)
    elif not status:
      print(f"[launcher] all {args.num_processes} processes finished.", flush=True)
    return status
  finally:
    _terminate(procs, grace=2.0)
    for log in logs:
      log.close()
    for s, h in old.items():
      signal.signal(s, h)


def _tail(path: str, n: int = 30) -> str:
  try:
    with open(path, "rb") as f:
      return b"".join(f.readlines()[-n:]).decode("utf-8", "replace")
  except OSError:
    return ""


if __name__ == "__main__":
  sys.exit(main())
