"""Meshes: axis resolution, errors, and multi-device losses equal to one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from lm.train import sharding
from tests.helpers import ROOT, tiny_overrides


def test_minus_one_takes_the_remaining_devices():
  assert sharding.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  assert sharding.resolve_mesh_shape({"data": 1, "fsdp": -1, "tensor": 1}, 8) == (1, 8, 1)


@pytest.mark.parametrize("mesh,match", [
    ({"data": 3, "fsdp": 1, "tensor": 1}, "needs 3 devices but 8"),
    ({"data": -1, "fsdp": 3, "tensor": 1}, "does not divide the 8 devices"),
    ({"data": -1, "fsdp": -1, "tensor": 1}, "at most one may be -1"),
    ({"data": 0, "fsdp": 1, "tensor": 1}, "positive integer"),
])
def test_bad_meshes_are_explained(mesh, match):
  with pytest.raises(sharding.MeshError, match=match):
    sharding.resolve_mesh_shape(mesh, 8)


SCRIPT = textwrap.dedent("""
    import json, sys
    from lm.config import load_config
    from lm.train import loop
    from lm.train.metrics import read_metrics
    overrides, workdir = json.loads(sys.argv[1]), sys.argv[2]
    loop.train(load_config("experiments/shakespeare_char.py", overrides), workdir)
    print("LOSSES", json.dumps({r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}))
""")


def run_losses(tmp_path, name, devices, **mesh):
  overrides = tiny_overrides(steps=6, log_every=1, **{f"mesh.{k}": v for k, v in mesh.items()})
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  result = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(overrides), str(tmp_path / name)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  line = next(l for l in result.stdout.splitlines() if l.startswith("LOSSES"))
  return {int(k): v for k, v in json.loads(line[len("LOSSES"):]).items()}


def test_meshes_on_eight_devices_match_one_device(tmp_path):
  single = run_losses(tmp_path, "single", 1, data=1, fsdp=1, tensor=1)
  for name, mesh in {"data8": dict(data=8, fsdp=1, tensor=1), "fsdp8": dict(data=1, fsdp=8, tensor=1),
                     "d2f2t2": dict(data=2, fsdp=2, tensor=2)}.items():
    losses = run_losses(tmp_path, name, 8, **mesh)
    for step, loss in single.items():
      assert losses[step] == pytest.approx(loss, rel=1e-4, abs=1e-4), (name, step)
