"""Multi-process runs through lm.launch_local, restores onto other meshes, and start-up failures."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tests.helpers import ROOT, cli_args, device_env, run_cli, run_launcher, snapshot, train_losses

CONFIG = ("--config", "experiments/shakespeare_char.py")


def test_two_processes_of_four_devices_match_one_process_of_eight(tmp_path):
  args = cli_args(steps=6, log_every=1, checkpoint_every=3, eval_every=3, **{"mesh.preset": "fsdp"})
  run_cli(*CONFIG, "--workdir", str(tmp_path / "one"), *args, env=device_env(8), check=True)
  result = run_launcher(2, 4, *CONFIG, "--workdir", str(tmp_path / "two"), *args)
  assert result.returncode == 0, result.stdout[-4000:]
  one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
  assert sorted(two) == [1, 2, 3, 4, 5, 6]
  for step, loss in one.items():
    assert two[step] == pytest.approx(loss, rel=1e-5), step
  # Process 0 alone writes metrics (one line per step) and prints the summary.
  lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
  assert re.search(r"^\[p0\] \{\"step\": 6", result.stdout, re.M)
  assert not re.search(r"^\[p1\] (\{\"step\"|train:)", result.stdout, re.M)
  metadata = json.loads((tmp_path / "two" / "config.json").read_text())
  assert metadata["mesh"] == {"shape": {"data": 1, "fsdp": 8, "tensor": 1}, "rules": metadata["mesh"]["rules"],
                              "process_count": 2}
  data_state = json.loads((tmp_path / "two" / "checkpoints" / "6" / "data" / "metadata").read_text())
  assert data_state["iterator"]["next_index"] == 6 and data_state["process_count"] == 2


def test_a_checkpoint_restores_onto_other_meshes_device_and_process_counts(tmp_path):
  # 4 heads and a vocabulary padded to a multiple of 4 split evenly over tensor=4.
  args = cli_args(steps=6, log_every=1, checkpoint_every=3, eval_every=6, keep_checkpoints=5,
                  **{"model.num_heads": 4, "model.vocab_multiple": 4})
  origin = tmp_path / "fsdp8"
  run_cli(*CONFIG, "--workdir", str(origin), *args, "--config.mesh.preset=fsdp", env=device_env(8), check=True)
  reference = train_losses(origin)
  targets = {
      "data2_tensor4": (1, 8, ["--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.mesh.tensor=4"]),
      "fsdp4_on_4": (1, 4, ["--config.mesh.preset=fsdp"]),
      "one_device": (1, 1, []),
  }  # onto 2 processes, and 2 processes' checkpoints onto 1: tests/integration/test_faults.py
  for name, (processes, devices, mesh_args) in targets.items():
    workdir = tmp_path / name
    shutil.copytree(origin, workdir)
    shutil.rmtree(workdir / "checkpoints" / "6")  # continue from step 3
    assert processes == 1
    run_cli(*CONFIG, "--workdir", str(workdir), *args, *mesh_args, env=device_env(devices), check=True)
    resumed = train_losses(workdir)
    for step in (4, 5, 6):
      assert resumed[step] == pytest.approx(reference[step], rel=1e-5), (name, step)


def _pids(line: str) -> list[int]:
  return [int(pid) for pid in re.findall(r"\d+", line.split("pids", 1)[1])]


def test_a_dying_process_makes_the_launcher_fail_fast_and_name_it(tmp_path):
  command = [sys.executable, "-m", "lm.launch_local", "--num_processes=2", "--devices_per_process=2", "--", *CONFIG,
             "--workdir", str(tmp_path / "run"), *cli_args(steps=100_000, log_every=1)]
  launcher = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  output, pids, killed_at = [], None, None
  try:
    for line in launcher.stdout:
      output.append(line)
      if pids is None and line.startswith("[launch_local] started"):
        pids = _pids(line)
      if killed_at is None and line.startswith("[p0] train:") and "loss=" in line:
        os.kill(pids[1], signal.SIGKILL)  # as the kernel's OOM killer would
        killed_at = time.monotonic()
    code = launcher.wait(timeout=60)
  finally:
    if launcher.poll() is None:
      launcher.kill()
  text = "".join(output)
  assert killed_at is not None, text[-3000:]
  assert code == 128 + signal.SIGKILL, text[-3000:]
  assert f"process 1 (pid {pids[1]}) was killed by SIGKILL" in text
  assert time.monotonic() - killed_at < 30  # the survivor, stuck in a collective, is stopped, not waited for
  with pytest.raises(ProcessLookupError):
    os.kill(pids[0], 0)


def test_a_config_error_stops_every_process_with_its_message(tmp_path):
  result = run_launcher(2, 4, *CONFIG, "--workdir", str(tmp_path / "run"), *cli_args(batch_size=12),
                        "--config.mesh.preset=fsdp")
  assert result.returncode == 2
  for process in (0, 1):
    assert f"[p{process}] error: config.batch_size=12 is not divisible by the data-parallel size 8" in result.stdout
  assert not (tmp_path / "run").exists()


MISMATCH = textwrap.dedent("""
    import os
    from lm import distributed
    distributed.initialize({})
    distributed.check_same_on_all_processes({"config": {"lr": float(os.environ["JAX_PROCESS_ID"])},
                                             "tokenizer": "char"})
""")


def test_processes_with_different_configs_are_stopped_with_the_difference_named():
  from lm import launch_local  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  out = io.StringIO()
  code = launch_local.launch([], num_processes=2, devices_per_process=1, out=out,
                             program=[sys.executable, "-c", MISMATCH])
  assert code != 0
  assert "DistributedError: The config differs between processes: process(es) [1] disagree" in out.getvalue()
  assert "tokenizer differs" not in out.getvalue()


def _distributed_args(port: int, process_id: int, timeout: int = 3) -> list[str]:
  return [f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
          f"--config.distributed.process_id={process_id}", f"--config.distributed.initialization_timeout={timeout}"]


def test_a_coordinator_that_never_answers_times_out_with_a_clear_message(tmp_path):
  with socket.socket() as silent:  # accepts connections, never speaks
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    start = time.monotonic()
    result = run_cli(*CONFIG, "--workdir", str(tmp_path / "run"), *_distributed_args(port, 1), timeout=120)
    elapsed = time.monotonic() - start
  assert result.returncode == 2, result.stderr[-3000:]
  assert f"error: process 1 got no answer from 127.0.0.1:{port} within 3 s" in result.stderr
  assert elapsed < 60
  assert not (tmp_path / "run").exists()


def test_an_unreachable_coordinator_and_missing_processes_are_explained(tmp_path):
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]  # closed again below: nothing listens there
  result = run_cli(*CONFIG, "--workdir", str(tmp_path / "run"), *_distributed_args(port, 1), timeout=120)
  assert result.returncode == 2
  assert f"error: Could not reach the coordinator at 127.0.0.1:{port}" in result.stderr
  before = snapshot(tmp_path)
  result = run_cli(*CONFIG, "--workdir", str(tmp_path / "run"), *_distributed_args(port, 0), timeout=120)
  assert result.returncode == 2
  assert "process 0 (the coordinator at" in result.stderr and "waited 3 s for all 2 processes" in result.stderr
  assert snapshot(tmp_path) == before
