"""Multi-process start-up through `jax.distributed`, and checks across processes.

`initialize(config.distributed)` runs before anything touches a JAX device.
It starts JAX's distributed runtime when the run is multi-process:

  * explicitly, when a coordinator address is given (config fields
    `distributed.coordinator_address/num_processes/process_id`, or the
    environment variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
    `JAX_PROCESS_ID`; `python -m lm.launch_local` sets the latter);
  * automatically (`distributed.auto`, on by default) on a Cloud TPU VM and
    inside a multi-task SLURM step or Open MPI job, where JAX reads the
    coordinator, process count and rank from the cluster itself;
  * not at all otherwise: a plain single-process run.

JAX aborts the whole process (a C++ fatal error) when the coordinator does not
answer within its deadline, so the deadline is kept here: the coordinator's
port is probed first, and a watchdog stops the process with a message that
names the address, the process and the fix before JAX's own deadline fires.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
import socket
import sys
import threading
import time
from typing import Any, Mapping

import numpy as np

from ml_collections.config_dict import placeholder

from lm.core.configs import ConfigPart, require
from lm.core.errors import DistributedError

# Seconds JAX's own deadline is given beyond ours, so the watchdog's clear
# message always comes first.
_JAX_DEADLINE_MARGIN_S = 30
EXIT_CODE = 2


@dataclasses.dataclass(frozen=True)
class Cluster:
  """How this process joins the run (what `initialize` decided)."""

  how: str  # "single" | "explicit" | "tpu_vm" | "slurm" | "open_mpi"
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
  value = environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError as error:
    raise DistributedError(f"The environment variable {name}={value!r} is not an integer.") from error


def detect_cluster(settings: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Cluster:
  """Decides from the config and the environment how (and whether) to start the distributed runtime."""
  environ = os.environ if environ is None else environ
  address = settings.get("coordinator_address") or environ.get("JAX_COORDINATOR_ADDRESS", "")
  num_processes = settings.get("num_processes")
  process_id = settings.get("process_id")
  if num_processes is None:
    num_processes = _env_int(environ, "JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _env_int(environ, "JAX_PROCESS_ID")
  if address:
    missing = [name for name, value in (("num_processes", num_processes), ("process_id", process_id))
               if value is None]
    if missing:
      raise DistributedError(
          f"A coordinator address ({address}) is set but {' and '.join(missing)} is not: set "
          + " and ".join(f"--config.distributed.{name}" for name in missing)
          + " (or JAX_NUM_PROCESSES / JAX_PROCESS_ID) on every process.")
    if ":" not in address:
      raise DistributedError(f"distributed.coordinator_address={address!r} needs a port: HOST:PORT, "
                             "e.g. 10.0.0.2:1234 (the same on every process).")
    if not 0 <= process_id < num_processes:
      raise DistributedError(f"distributed.process_id={process_id} must be in [0, num_processes={num_processes}).")
    return Cluster("explicit", address, int(num_processes), int(process_id))
  if num_processes is not None and num_processes > 1:
    raise DistributedError(
        f"num_processes={num_processes} but no coordinator address: set --config.distributed.coordinator_address "
        "(HOST:PORT of process 0) or JAX_COORDINATOR_ADDRESS on every process.")
  if not settings.get("auto", True):
    return Cluster("single")
  if _on_tpu_vm(environ):
    return Cluster("tpu_vm")
  if all(name in environ for name in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")) and (
      int(environ.get("SLURM_NTASKS", "1")) > 1):
    return Cluster("slurm", num_processes=int(environ["SLURM_NTASKS"]), process_id=int(environ["SLURM_PROCID"]))
  if "OMPI_MCA_orte_hnp_uri" in environ and int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return Cluster("open_mpi", num_processes=int(environ["OMPI_COMM_WORLD_SIZE"]),
                   process_id=int(environ.get("OMPI_COMM_WORLD_RANK", "0")))
  return Cluster("single")


def _on_tpu_vm(environ: Mapping[str, str]) -> bool:
  # TPU chips show up as /dev/accel* (v2-v4) or VFIO groups (v5+), and JAX
  # needs libtpu to use them. JAX then finds the workers through the TPU
  # metadata server.
  if environ.get("JAX_PLATFORMS", "") not in ("", "tpu"):
    return False
  has_chips = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
  return has_chips and importlib.util.find_spec("libtpu") is not None


def _probe(address: str, deadline: float) -> None:
  """Waits until something listens on the coordinator's port (process 0 may start a little later)."""
  host, _, port = address.rpartition(":")
  host = host.strip("[]")
  last_error: OSError | None = None
  while time.monotonic() < deadline:
    try:
      with socket.create_connection((host, int(port)), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
        return
    except OSError as error:
      last_error = error
      time.sleep(0.2)
  raise DistributedError(
      f"Could not reach the coordinator at {address} ({last_error}). Process 0 must be running and listening "
      "there: check that every process got the same coordinator_address, that process 0 started, and that the "
      "port is open between the hosts; raise distributed.initialization_timeout if process 0 starts slowly.")


def _watchdog(message: str, timeout: float) -> threading.Timer:
  """Stops the process with `message` if start-up is still blocked after `timeout` seconds."""

  def fire() -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(EXIT_CODE)  # pylint: disable=protected-access  # the main thread is stuck inside JAX's C++ client

  timer = threading.Timer(timeout, fire)
  timer.daemon = True
  timer.start()
  return timer


def initialize(settings: Mapping[str, Any]) -> Cluster:
  """Starts `jax.distributed` if this run is multi-process; returns what was decided.

  `settings` is `config.distributed`. Must run before any JAX computation.
  Safe to call twice (the second call is a no-op), e.g. from a notebook.
  """
  import jax  # pylint: disable=g-import-not-at-top

  cluster = detect_cluster(settings)
  if cluster.how == "single":
    return cluster
  if jax.distributed.is_initialized():
    return cluster
  timeout = int(settings.get("initialization_timeout", 300))
  heartbeat = int(settings.get("heartbeat_timeout", 100))
  if timeout <= 0 or heartbeat <= 0:
    raise DistributedError("distributed.initialization_timeout and distributed.heartbeat_timeout must be > 0 seconds.")
  # CPU processes exchange collectives through gloo (the CPU client has none otherwise).
  if jax.config.jax_cpu_collectives_implementation in (None, "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  deadline = time.monotonic() + timeout
  where = f"process {cluster.process_id}" if cluster.process_id is not None else "this process"
  if cluster.how == "explicit" and cluster.process_id != 0:
    _probe(cluster.coordinator_address, deadline)  # type: ignore[arg-type]
  remaining = max(1.0, deadline - time.monotonic())
  if cluster.how == "explicit" and cluster.process_id == 0:
    message = (f"{where} (the coordinator at {cluster.coordinator_address}) waited {timeout} s for all "
               f"{cluster.num_processes} processes to connect. Start every process with num_processes="
               f"{cluster.num_processes} and the same coordinator_address, or raise "
               "distributed.initialization_timeout.")
  else:
    address = cluster.coordinator_address or f"the {cluster.how} cluster's coordinator"
    message = (f"{where} got no answer from {address} within {timeout} s: is it the coordinator of this run "
               "(process 0 of the same job, same num_processes)? Check the address and that process 0 is "
               "healthy, or raise distributed.initialization_timeout.")
  timer = _watchdog(message, remaining)
  try:
    jax.distributed.initialize(
        coordinator_address=cluster.coordinator_address,
        num_processes=cluster.num_processes,
        process_id=cluster.process_id,
        initialization_timeout=int(remaining) + _JAX_DEADLINE_MARGIN_S,
        heartbeat_timeout_seconds=heartbeat,
    )
  except RuntimeError as error:
    raise DistributedError(
        f"jax.distributed.initialize failed: {error}. It must run before any JAX computation: in a notebook, "
        "call lm.distributed.initialize first, or restart the kernel.") from error
  except ValueError as error:
    raise DistributedError(f"JAX could not start the {cluster.how} cluster: {error}") from error
  finally:
    timer.cancel()
  return dataclasses.replace(cluster, num_processes=jax.process_count(), process_id=jax.process_index())


def fingerprint(value: Any) -> str:
  """A short stable hash of a JSON-serializable value."""
  return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_same_on_all_processes(values: Mapping[str, Any]) -> None:
  """Raises DistributedError naming each value that differs between processes.

  Each process hashes its own `values` (e.g. the resolved config); the hashes
  are gathered from all processes and compared. A no-op with one process.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  names = sorted(values)
  digests = np.array([[int(fingerprint(values[name]), 16) & 0x7FFFFFFF for name in names]], np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(digests)).reshape(jax.process_count(), len(names))
  for column, name in enumerate(names):
    differing = [p for p in range(gathered.shape[0]) if gathered[p, column] != gathered[0, column]]
    if differing:
      raise DistributedError(
          f"The {name} differs between processes: process(es) {differing} disagree with process 0. Start "
          "every process with the same command (config file, --config overrides, data and code version).")


# -- the distributed part of the run config ------------------------------------------------------------
# Explicit settings, or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID in the environment
# (lm.launch_local sets them).
CONFIG_FIELDS = {
    "distributed.coordinator_address": "",  # HOST:PORT of process 0; empty: environment or auto
    "distributed.num_processes": placeholder(int),
    "distributed.process_id": placeholder(int),
    "distributed.auto": True,  # detect Cloud TPU VMs, SLURM steps and Open MPI jobs
    "distributed.initialization_timeout": 300,  # seconds for all processes to reach the coordinator
    "distributed.heartbeat_timeout": 100,  # seconds after which a silent process counts as dead
}


def validate_config(config: Any, mode: str) -> None:
  del mode
  settings = config.distributed
  require(settings.initialization_timeout > 0 and settings.heartbeat_timeout > 0,
          "config.distributed.initialization_timeout and heartbeat_timeout must be > 0 seconds.")


CONFIG = ConfigPart("lm.distributed", CONFIG_FIELDS, validate_config)
