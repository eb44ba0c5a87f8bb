r"""Runs one `lm` job as several local processes, as a multi-host cluster would.

  python -m lm.launch_local --num_processes=2 --devices_per_process=4 -- \
      --config experiments/shakespeare_char.py --workdir runs/two_hosts

starts `python -m lm.main <arguments after -->` N times on this machine. Each
process gets `JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT`, `JAX_NUM_PROCESSES` and
`JAX_PROCESS_ID` (read by `lm.distributed`), and D simulated CPU devices
(`--xla_force_host_platform_device_count=D`); cross-process collectives go
through gloo. Output is streamed line by line with a `[pN]` prefix. If any
process fails, the others are stopped and the launcher exits with that
process's code, naming it: at once after a crash or a signal, after up to 10 s
when it exited with lm's user-error code 2 (the others are then usually about
to print the same `error:` line). SIGINT/SIGTERM are passed on to every process, so
a training run saves its checkpoint before stopping; a signal to one process
alone stops them all too (they agree on the step: lm.train.loop.StopSignal), and
after SIGINT (exit code 130) the launcher waits for every process's save.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Sequence

# Seconds the others get to exit after SIGTERM before they are killed. Short:
# without the failed process their collectives (a checkpoint save included)
# cannot finish, so waiting longer only delays the report.
_GRACE_S = 3.0
# Seconds the others get to end by themselves when a process exits with lm's
# user-error code (2): every process checks the same config and data, so the
# others are usually a moment from printing the same `error:` line, and a
# SIGTERM at that moment would cut it off.
_USER_ERROR_WAIT_S = 10.0
_USER_ERROR_CODE = 2
# A process that exits 130 was stopped by SIGINT: every process agreed on that stop (lm.train.loop.StopSignal)
# and is saving the same step, which may take a while for a large model; they are not cut short.
_INTERRUPTED_CODE = 130
_INTERRUPTED_WAIT_S = 300.0


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def process_env(base: dict[str, str], *, process_id: int, num_processes: int, devices_per_process: int,
                port: int) -> dict[str, str]:
  """The environment of process `process_id`: coordinator, rank and simulated CPU devices."""
  env = dict(base)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
  env.update({
      "XLA_FLAGS": " ".join(flags),
      "JAX_PLATFORMS": "cpu",
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
      "JAX_NUM_PROCESSES": str(num_processes),
      "JAX_PROCESS_ID": str(process_id),
      "PYTHONUNBUFFERED": "1",  # lines reach the launcher as they are written
  })
  return env


def _stream(pipe: IO[str], prefix: str, out: IO[str], lock: threading.Lock) -> None:
  for line in iter(pipe.readline, ""):
    with lock:
      out.write(f"{prefix}{line}" if line.endswith("\n") else f"{prefix}{line}\n")
      out.flush()
  pipe.close()


def _signal_name(code: int) -> str:
  try:
    return signal.Signals(-code).name
  except ValueError:
    return f"signal {-code}"


def launch(lm_args: Sequence[str], *, num_processes: int, devices_per_process: int, port: int | None = None,
           program: Sequence[str] | None = None, out: IO[str] | None = None) -> int:
  """Starts the processes, streams their output, and returns the job's exit code.

  `program` is the command each process runs (default `python -m lm.main`),
  followed by `lm_args`.
  """
  out = out or sys.stdout
  port = port or free_port()
  program = list(program or [sys.executable, "-m", "lm.main"])
  lock = threading.Lock()
  processes: list[subprocess.Popen] = []
  threads = []
  for process_id in range(num_processes):
    env = process_env(dict(os.environ), process_id=process_id, num_processes=num_processes,
                      devices_per_process=devices_per_process, port=port)
    proc = subprocess.Popen(program + list(lm_args), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    processes.append(proc)
    thread = threading.Thread(target=_stream, args=(proc.stdout, f"[p{process_id}] ", out, lock), daemon=True)
    thread.start()
    threads.append(thread)
  with lock:
    out.write(f"[launch_local] started {num_processes} processes x {devices_per_process} devices, coordinator "
              f"127.0.0.1:{port}, pids {[p.pid for p in processes]}\n")
    out.flush()

  def forward(signum, frame):  # pylint: disable=unused-argument
    for proc in processes:
      if proc.poll() is None:
        proc.send_signal(signum)

  previous = {}
  if threading.current_thread() is threading.main_thread():
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
  failed: tuple[int, int] | None = None
  try:
    while True:
      codes = [proc.poll() for proc in processes]
      failed = next(((i, c) for i, c in enumerate(codes) if c not in (None, 0)), None)
      if failed or all(c == 0 for c in codes):
        break
      time.sleep(0.1)
    if failed:
      if failed[1] in (_USER_ERROR_CODE, _INTERRUPTED_CODE):
        _wait_for_all(processes, _USER_ERROR_WAIT_S if failed[1] == _USER_ERROR_CODE else _INTERRUPTED_WAIT_S)
      if failed[1] == _INTERRUPTED_CODE and all(proc.poll() == _INTERRUPTED_CODE for proc in processes):
        with lock:
          out.write(f"[launch_local] every process was interrupted (SIGINT), saved the same step and stopped "
                    f"(exit code {_INTERRUPTED_CODE}).\n")
          out.flush()
        return _INTERRUPTED_CODE
      _stop(processes)
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
    for thread in threads:
      thread.join(timeout=5)
  if failed:
    process_id, code = failed
    how = f"was killed by {_signal_name(code)}" if code < 0 else f"exited with code {code}"
    with lock:
      out.write(f"[launch_local] process {process_id} (pid {processes[process_id].pid}) {how}; stopped the "
                f"other {num_processes - 1}. See the [p{process_id}] lines above for its error.\n")
      out.flush()
    return code if code > 0 else 128 - code
  return 0


def _wait_for_all(processes: Sequence[subprocess.Popen], seconds: float) -> None:
  """Waits up to `seconds` for every process to end by itself."""
  deadline = time.monotonic() + seconds
  while any(proc.poll() is None for proc in processes) and time.monotonic() < deadline:
    time.sleep(0.1)


def _stop(processes: Sequence[subprocess.Popen]) -> None:
  """SIGTERM to every live process, SIGKILL to any still alive after the grace period."""
  for proc in processes:
    if proc.poll() is None:
      proc.terminate()
  deadline = time.monotonic() + _GRACE_S
  for proc in processes:
    try:
      proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  argv = list(argv)
  if "--" in argv:
    split = argv.index("--")
    own, lm_args = argv[:split], argv[split + 1:]
  else:
    own, lm_args = argv, []
  parser = argparse.ArgumentParser(
      prog="python -m lm.launch_local",
      description="Run `python -m lm.main ARGS` as N local processes with D simulated CPU devices each.",
      epilog="Example: python -m lm.launch_local --num_processes=2 --devices_per_process=4 -- "
             "--config experiments/shakespeare_char.py --workdir runs/two_hosts")
  parser.add_argument("--num_processes", type=int, required=True, help="processes to start (simulated hosts)")
  parser.add_argument("--devices_per_process", type=int, default=1, help="simulated CPU devices in each process")
  parser.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (default: a free one)")
  args = parser.parse_args(own)
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error("--num_processes and --devices_per_process must be >= 1.")
  if not lm_args:
    parser.error("give the lm.main arguments after `--`, e.g. -- --config experiments/shakespeare_char.py "
                 "--workdir runs/x")
  return args, lm_args


def main(argv: Sequence[str] | None = None) -> int:
  args, lm_args = parse_args(sys.argv[1:] if argv is None else argv)
  return launch(lm_args, num_processes=args.num_processes, devices_per_process=args.devices_per_process,
                port=args.port or None)


if __name__ == "__main__":
  sys.exit(main())
