"""`--mode serve`: the workdir's model behind an OpenAI-compatible API that hot-swaps and learns from feedback.

    python -m lm.main --config experiments/shakespeare_char.py --workdir runs/shakespeare_char --mode serve

serves the workdir's current model (an online run's promoted one, a train run's
latest checkpoint, or `init_from=hf:DIR`'s weights) on serve.host:serve.port
(lm.serve.api: completions, feedback, models, status, health, metrics, and a
playground page at /). It watches the workdir and swaps to each newer model
between decode steps (lm.serve.versions, lm.serve.engine); feedback is stored
in WORKDIR/serve/feedback.sqlite and written as chunks into the online loop's
watched folder (lm.serve.feedback), so a second process,

    python -m lm.main --config experiments/online_shakespeare.py --workdir RUN --mode online \\
        --config.online.stream=dir:RUN/serve/chunks

keeps training on what users liked, gates, promotes, and the server answers
with the new version. docs/serving.md is the page.

From a notebook: `server = start_server(config, workdir)` returns at once with
the server running on a thread (`server.url`, `server.stop()`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from lm.core.errors import CheckpointError, ConfigError
from lm.experiment import load_trained
from lm.experiment.config import validate
from lm.models import quantize as quantize_lib
from lm.serve import api as api_lib
from lm.serve import engine as engine_lib
from lm.serve import metrics as metrics_lib
from lm.serve import versions
from lm.serve.feedback import FeedbackStore
from lm.train import checkpoint as checkpoint_lib

_log = logging.getLogger(__name__)
HEATMAP_FILE = "continual_R.png"


@dataclasses.dataclass
class RunningServer:
  """A server started by `start_server`: its address and parts; `stop()` ends it (requests in flight end)."""

  url: str
  service: api_lib.Service
  engine: engine_lib.Engine
  watcher: versions.ModelWatcher
  exporter: Any
  uvicorn_server: Any
  thread: threading.Thread | None = None
  interrupted: bool = False  # stopped by SIGINT (the CLI exits 130, as for Ctrl-C)

  def stop(self) -> None:
    self.uvicorn_server.should_exit = True
    if self.thread is not None:
      self.thread.join(timeout=30)
    self.close()

  def close(self) -> None:
    self.watcher.stop()
    self.exporter.stop()
    self.engine.stop()
    self.service.store.close()


def feedback_folder(config: ml_collections.ConfigDict, workdir: str) -> Path:
  """Where feedback chunks go: serve.feedback_dir, else the online loop's watched folder (online.stream
  "dir:PATH"), else WORKDIR/serve/chunks."""
  if config.serve.feedback_dir:
    return Path(config.serve.feedback_dir)
  if str(config.online.stream).startswith("dir:"):
    return Path(str(config.online.stream)[len("dir:"):])
  return Path(workdir) / "serve" / "chunks"


def _check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  if not os.path.isdir(workdir) and not str(config.init_from).startswith("hf:"):
    raise CheckpointError(f"--workdir {workdir!r} does not exist. Fix: point --workdir at a trained run (make "
                          "train), or an online run's workdir.")


def _listening_socket(host: str, port: int) -> socket.socket:
  """The bound, listening socket (port 0: one the OS picks); an error line if the address is taken."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError as error:
    sock.close()
    if error.errno == errno.EADDRINUSE:
      raise ConfigError(f"Port {port} on {host} is already in use (another server?). Fix: stop it, or pick "
                        "another with --config.serve.port=PORT (0: any free port).") from None
    raise ConfigError(f"Cannot listen on {host}:{port} ({error.strerror or error}). Fix: set "
                      "--config.serve.host to an address of this machine, e.g. 127.0.0.1.") from None
  sock.listen(2048)
  sock.setblocking(False)
  return sock


class _Exporter:
  """Writes finished feedback chunks every few seconds (and once more at the end)."""

  def __init__(self, store: FeedbackStore, folder: Path, chunk_size: int, interval: float):
    self.store, self.folder, self.chunk_size, self.interval = store, folder, chunk_size, interval
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="lm-serve-feedback", daemon=True)

  def start(self) -> None:
    self._thread.start()

  def export(self) -> list[Path]:
    try:
      written = self.store.export(self.folder, chunk_size=self.chunk_size, interval_s=self.interval)
    except Exception as error:  # pylint: disable=broad-except  (a full disk must not stop serving)
      _log.warning("Could not write feedback chunks into %s (%s); the records stay in SQLite and are written "
                   "later.", self.folder, error)
      return []
    for path in written:
      _log.info("Feedback chunk %s written.", path)
    return written

  def _run(self) -> None:
    self.export()  # at once: records left pending by the previous server (a restart, a kill) go out first
    while not self._stop.wait(min(5.0, self.interval)):
      self.export()

  def stop(self) -> None:
    self._stop.set()
    if self._thread.is_alive():
      self._thread.join(timeout=30)


def _status(workdir: str) -> dict[str, Any]:
  """The online run's recent gate decisions (newest last) and whether its R heatmap is drawn."""
  gate: list[dict[str, Any]] = []
  with contextlib.suppress(Exception):  # a train run (no online item), or a checkpoint mid-rotation
    step = checkpoint_lib.latest_step(workdir)
    root = Path(checkpoint_lib.resolve_checkpoint_root(workdir))
    online = json.loads((root / str(step) / "online" / "metadata").read_text())
    gate = [{key: record.get(key) for key in ("chunk", "step", "promoted", "reasons", "time")}
            for record in online.get("gate", [])[-20:]]
  return {"gate": gate, "heatmap": (Path(workdir) / HEATMAP_FILE).is_file()}


def build(config: ml_collections.ConfigDict, workdir: str) -> tuple[api_lib.Service, versions.ModelWatcher,
                                                                     _Exporter]:
  """The service (model loaded, engine warmed up), the workdir watcher and the feedback exporter."""
  validate(config, "serve")
  _check_workdir(config, workdir)
  experiment, params, _ = load_trained(config, workdir, "serve")
  task, serve = experiment.task, config.serve
  run_name = serve.model_name or os.path.basename(os.path.normpath(workdir))
  version = versions.probe(workdir, run_name) or versions.Version(run_name, "hf", 0)
  metrics = metrics_lib.ServeMetrics(serve.max_batch)

  def text_of(prompt_ids: np.ndarray, new: np.ndarray) -> str:
    return task.continuation_text(prompt_ids, new)

  def on_step(stats: dict[str, Any]) -> None:
    metrics.occupancy.observe(stats["busy"])
    metrics.queue_depth.set(stats["queue"])

  scheme = serve.quantize

  def served(params: Any) -> Any:
    """The language model's params as served: int8 matmul weights with serve.quantize=int8 (at start-up and
    at every swap, on the watcher's thread), so a swap hands the engine the layout it compiled for."""
    return quantize_lib.quantize_params(task.lm_params(params), scheme, field="serve.quantize")

  lm_params = served(params)
  if scheme != "none":
    weights = quantize_lib.summary(lm_params, scheme)
    _log.info("Serving %s matmul weights: %s parameter bytes (float32: %s, bfloat16: %s).", scheme,
              f"{weights['param_bytes']:,}", f"{weights['param_bytes_float32']:,}",
              f"{weights['param_bytes_bfloat16']:,}")
  eos = task.tokenizer.eos_id
  engine = engine_lib.Engine(task.model, lm_params, version, max_batch=serve.max_batch, max_queue=serve.max_queue,
                             text_of=text_of, token_text=lambda token: task.decode_text(np.asarray([token])),
                             end_ids=() if eos is None else (eos,), context=experiment.steps.context,
                             on_step=on_step, block=serve.decode_block)
  if serve.warmup:
    started = time.perf_counter()
    engine.warm_up()
    _log.info("Compiled %d prefill buckets and the decode step in %.1f s.", len(engine.slots_model.buckets),
              time.perf_counter() - started)
  store = FeedbackStore(Path(workdir) / "serve")
  service = api_lib.Service(engine=engine, encode=lambda text: np.asarray(task.tokenizer.encode(text), np.int32),
                            model_name=run_name, serve_config=serve, store=store, metrics=metrics, workdir=workdir,
                            status=lambda: _status(workdir))
  metrics.serving(version.id, version.step)
  abstract = experiment.abstract_state.params

  def load(found: versions.Version) -> Any:
    item = "current" if found.kind == "online" else "state"
    return served(checkpoint_lib.restore_params(workdir, abstract, step=found.checkpoint, item_name=item)[0])

  def swap(new_params: Any, new_version: versions.Version) -> None:
    engine.swap(new_params, new_version)
    metrics.swaps.inc()
    metrics.serving(new_version.id, new_version.step)

  watcher = versions.ModelWatcher(workdir, run_name, version, load, swap, serve.watch_interval)
  exporter = _Exporter(store, feedback_folder(config, workdir), serve.feedback_chunk_size, serve.feedback_interval)
  return service, watcher, exporter


def start_server(config: ml_collections.ConfigDict, workdir: str, *, block: bool = False,
                 report: Any = print) -> RunningServer:
  """Builds and starts the server; with block=False (notebooks, tests) it runs on a thread and this returns."""
  import uvicorn  # pylint: disable=g-import-not-at-top  (only serving needs it)
  validate(config, "serve")  # a key missing off loopback is named before anything else happens
  _check_workdir(config, workdir)
  sock = _listening_socket(config.serve.host, config.serve.port)  # a taken port fails before the model loads
  try:
    service, watcher, exporter = build(config, workdir)
  except BaseException:
    sock.close()
    raise
  host, port = sock.getsockname()[:2]
  url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
  app = api_lib.create_app(service)
  server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
  running = RunningServer(url, service, service.engine, watcher, exporter, server)
  service.engine.start()
  watcher.start()
  exporter.start()
  weights = "" if config.serve.quantize == "none" else f", {config.serve.quantize} weights"
  report(f"Serving {service.model_name} ({service.version.id}{weights}) on {url} (playground: {url}/); feedback "
         f"chunks go to {exporter.folder}.")
  sys.stdout.flush()  # the address, for whoever started this process with a pipe
  if block:
    # uvicorn drains on SIGINT / SIGTERM, then raises the signal again for the handler it found: this one
    # notes it, so the feedback is exported and the engine stopped before the process exits.
    received: list[int] = []
    main = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
      server.run(sockets=[sock])
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)
      exporter.export()
      running.close()
    running.interrupted = signal.SIGINT in received
    return running
  running.thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="lm-serve-http",
                                    daemon=True)
  running.thread.start()
  deadline = time.monotonic() + 30
  while not server.started and running.thread.is_alive() and time.monotonic() < deadline:
    time.sleep(0.01)
  return running


def run(config: ml_collections.ConfigDict, workdir: str, report: Any = print) -> int:
  """The CLI's --mode serve: serves until SIGINT (exit 130) or SIGTERM (exit 0), finishing what is in flight."""
  return 130 if start_server(config, workdir, block=True, report=report).interrupted else 0
