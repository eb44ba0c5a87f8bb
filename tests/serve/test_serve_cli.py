"""--mode serve as users start it: start-up errors, feedback that survives SIGKILL, and the whole loop
(serve + online in two processes: requests -> feedback -> chunk -> train -> gate -> promote -> hot swap)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lm.config import load_config
from tests.helpers import ROOT, tiny_overrides
from tests.serve.conftest import CONFIG, serve_overrides

ONLINE_CONFIG = str(ROOT / "experiments" / "online_shakespeare.py")


def _command(config: str, workdir: Path, mode: str, overrides: dict) -> list[str]:
  return [sys.executable, "-m", "lm.main", "--config", config, "--workdir", str(workdir), "--mode", mode,
          *[f"--config.{key}={value}" for key, value in overrides.items()]]


def _start_server(config: str, workdir: Path, overrides: dict) -> tuple[subprocess.Popen, str]:
  """A `--mode serve` process and its URL (from the line it prints once it listens)."""
  process = subprocess.Popen(_command(config, workdir, "serve", overrides), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT)
  for line in process.stdout:
    found = re.search(r" on (http://127\.0\.0\.1:\d+) ", line)
    if found:
      return process, found.group(1)
  raise AssertionError(f"the server did not start: {process.wait()} {process.stderr.read()[-3000:]}")


def test_start_up_errors_are_one_line_and_exit_2(trained_run, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  taken = socket.socket()
  taken.bind(("127.0.0.1", 0))
  port = taken.getsockname()[1]
  cases = [  # all four start at once: each is a Python start-up, and they fail before loading a model
      (tmp_path / "missing", {}, "does not exist"),
      (empty, {}, "needs a checkpoint"),
      (trained_run, {"serve.port": port}, f"Port {port} on 127.0.0.1 is already in use"),
      (trained_run, {"serve.host": "0.0.0.0"}, "serve.api_key"),
  ]
  processes = [subprocess.Popen(_command(CONFIG, workdir, "serve", tiny_overrides(**extra)), cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for workdir, extra, _ in cases]
  try:
    for process, (_, _, words) in zip(processes, cases):
      _, stderr = process.communicate(timeout=300)
      errors = [line for line in stderr.splitlines() if line.startswith("error:")]
      assert process.returncode == 2 and len(errors) == 1 and words in errors[0], stderr[-2000:]
  finally:
    taken.close()
  assert not (tmp_path / "missing").exists() and list(empty.iterdir()) == []  # nothing created


def test_acknowledged_feedback_survives_sigkill_and_lands_in_exactly_one_chunk(trained_run, tmp_path):
  workdir = tmp_path / "shakespeare"
  shutil.copytree(trained_run, workdir)  # the server writes WORKDIR/serve/: not into the shared run
  chunks = tmp_path / "chunks"
  overrides = serve_overrides(**{"serve.warmup": False, "serve.feedback_dir": str(chunks),
                                 "serve.feedback_chunk_size": 1, "serve.feedback_interval": 3600.0})
  process, url = _start_server(CONFIG, workdir, {**overrides, "serve.feedback_chunk_size": 1000})
  try:
    done = httpx.post(url + "/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 5}, timeout=60).json()
    response = httpx.post(url + "/v1/feedback", json={"id": done["id"], "rating": 1}, timeout=60)
    assert response.status_code == 200
  finally:
    process.send_signal(signal.SIGKILL)
    process.wait()
  with sqlite3.connect(workdir / "serve" / "feedback.sqlite") as db:
    assert db.execute("SELECT rating, chunk FROM feedback").fetchall() == [(1, None)]
  assert not chunks.exists() or not list(chunks.iterdir())
  process, url = _start_server(CONFIG, workdir, overrides)  # chunks of 1: the pending record goes out
  try:
    for _ in range(200):
      written = sorted(chunks.glob("*.jsonl")) if chunks.exists() else []
      if written:
        break
      time.sleep(0.05)
    time.sleep(0.5)  # a second chunk, if one were (wrongly) written, would be there by now
  finally:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0  # a clean stop on SIGTERM
  assert len(written) == 1
  assert [json.loads(line)["text"] for line in written[0].read_text().splitlines()] == [
      "ROMEO:" + done["choices"][0]["text"]]


@pytest.mark.slow
def test_the_loop_feedback_trains_the_online_run_whose_promotion_the_server_swaps_to(tmp_path):
  from lm.app.train import train  # pylint: disable=g-import-not-at-top
  pretrained = tmp_path / "pretrained"
  train(load_config(str(ROOT / "experiments" / "shakespeare_byte.py"),
                    tiny_overrides(steps=30, eval_every=30, checkpoint_every=30)), str(pretrained))
  workdir, watched = tmp_path / "online", tmp_path / "online" / "serve" / "chunks"
  watched.mkdir(parents=True)
  shared = tiny_overrides(**{
      "online.init_from": str(pretrained), "online.stream": f"dir:{watched}", "online.max_chunks": 1,
      "online.steps_per_chunk": 4, "online.checkpoint_every": 4, "online.heldout_fraction": 0.3,
      "online.heldout_max_windows": 8, "online.gate.bootstrap_samples": 100, "online.gate.max_regression": 10.0,
      "online.settle_seconds": 0.0, "online.poll_interval": 0.05, "optim.warmup_steps": 2})
  online = subprocess.Popen(_command(ONLINE_CONFIG, workdir, "online", shared), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  server = None
  try:
    for _ in range(1200):  # the online run's first checkpoint: the model it starts from, served first
      if list((workdir / "checkpoints").glob("[0-9]*")):
        break
      assert online.poll() is None, online.stderr.read()[-3000:]
      time.sleep(0.1)
    server, url = _start_server(ONLINE_CONFIG, workdir, {
        **shared, "serve.port": 0, "serve.warmup": False, "serve.watch_interval": 0.2,
        "serve.feedback_chunk_size": 8, "serve.feedback_interval": 1.0})
    first = httpx.get(url + "/v1/models", timeout=60).json()["data"][0]["version"]
    assert (first["kind"], first["chunk"]) == ("online", None)
    done = httpx.post(url + "/v1/completions", json={
        "prompt": "the film was", "max_tokens": 16, "n": 8, "temperature": 1.0, "seed": 3}, timeout=60).json()
    for choice in range(8):
      assert httpx.post(url + "/v1/feedback", json={"id": done["id"], "choice": choice, "rating": 1},
                        timeout=60).status_code == 200
    assert online.wait(timeout=600) == 0, online.stderr.read()[-3000:]  # one chunk: trained, gated, promoted
    gate = json.loads(next(iter(sorted((workdir / "checkpoints").glob("[0-9]*"), key=lambda p: int(p.name))[-1:]))
                      .joinpath("online", "metadata").read_text())["gate"]
    assert gate[-1]["promoted"] and gate[-1]["chunk"].startswith("feedback-")
    for _ in range(300):
      version = httpx.get(url + "/v1/models", timeout=60).json()["data"][0]["version"]
      if version["chunk"]:
        break
      time.sleep(0.1)
    assert version["chunk"] == gate[-1]["chunk"] and version["step"] == gate[-1]["step"]
    answer = httpx.post(url + "/v1/completions", json={"prompt": "the film was", "max_tokens": 4},
                        timeout=60).json()
    assert answer["lm_version"]["chunk"] == gate[-1]["chunk"] and answer["system_fingerprint"] == version["id"]
  finally:
    for process in (server, online):
      if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
