"""Meshes: axis resolution, errors, and multi-device losses equal to one device."""

from __future__ import annotations

import json

import pytest

from lm.train import sharding
from tests.helpers import cli_args, device_env, run_cli, train_losses


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


def test_presets_are_sizes_and_rules():
  sizes, rules = sharding.mesh_settings({"preset": "fsdp_tp", "tensor": 1})
  assert sizes == {"data": 1, "fsdp": -1, "tensor": 2}
  assert dict(rules)["heads"] == "tensor" and dict(rules)["embed"] == "fsdp"
  assert sharding.mesh_settings({"preset": "fsdp_tp", "tensor": 4})[0]["tensor"] == 4
  dp_sizes, dp_rules = sharding.mesh_settings({"preset": "dp"})
  assert dp_sizes == {"data": -1, "fsdp": 1, "tensor": 1}
  assert all(axes is None for logical, axes in dp_rules if logical != "batch")
  custom = sharding.mesh_settings({"preset": "", "data": 2, "fsdp": 2, "tensor": 2, "rules": [["embed", "fsdp"]]})
  assert custom == ({"data": 2, "fsdp": 2, "tensor": 2}, (("embed", "fsdp"),))
  with pytest.raises(sharding.MeshError, match="not one of"):
    sharding.mesh_settings({"preset": "zero3"})


def run_losses(tmp_path, name, devices, *args):
  """Trains the tiny model for 6 steps in a fresh process with `devices` CPU devices; step -> loss."""
  workdir = tmp_path / name
  run_cli("--config", "experiments/shakespeare_char.py", "--workdir", str(workdir),
          *cli_args(steps=6, log_every=1), *args, env=device_env(devices), check=True)
  return train_losses(workdir)


def test_each_preset_on_eight_devices_gives_the_single_device_losses(tmp_path):
  single = run_losses(tmp_path, "single", 1)
  assert sorted(single) == [1, 2, 3, 4, 5, 6]
  for preset in ("dp", "fsdp", "fsdp_tp"):
    losses = run_losses(tmp_path, preset, 8, f"--config.mesh.preset={preset}")
    config = json.loads((tmp_path / preset / "config.json").read_text())
    assert config["mesh"]["shape"] == {"dp": {"data": 8, "fsdp": 1, "tensor": 1},
                                       "fsdp": {"data": 1, "fsdp": 8, "tensor": 1},
                                       "fsdp_tp": {"data": 1, "fsdp": 4, "tensor": 2}}[preset]
    for step, loss in single.items():
      assert losses[step] == pytest.approx(loss, rel=1e-5), (preset, step)


def test_bench_reports_state_memory_divided_by_the_fsdp_shards():
  figures = {}
  for preset in ("dp", "fsdp", "fsdp_tp"):
    result = run_cli("--config", "experiments/shakespeare_char.py", "--mode", "bench",
                     *cli_args(**{"bench.compile_only": True, "mesh.preset": preset, "model.width": 64,
                                  "model.vocab_size": 128}),
                     env=device_env(8), check=True)
    figures[preset] = json.loads(result.stdout.strip().splitlines()[-1])
  dp, fsdp, tp = (figures[p]["memory_per_device"] for p in ("dp", "fsdp", "fsdp_tp"))
  assert figures["fsdp"]["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  # Every parameter has an `embed` axis divisible by 8, so FSDP 8 holds exactly 1/8 of it.
  assert fsdp["params_bytes"] * 8 == dp["params_bytes"]
  assert fsdp["optimizer_bytes"] * 8 == pytest.approx(dp["optimizer_bytes"], rel=1e-3)  # + replicated counters
  assert tp["params_bytes"] <= fsdp["params_bytes"] * 1.1  # biases and norms are not split over `tensor`
  for memory in (dp, fsdp, tp):
    assert memory["temp_bytes"] > 0 and memory["argument_bytes"] >= memory["state_bytes"]


def test_parameters_that_do_not_split_evenly_name_the_field_to_change():
  import types  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  params = {"embed": nn.Partitioned(jax.ShapeDtypeStruct((66, 32), jnp.float32), ("vocab", "embed")),
            "query": nn.Partitioned(jax.ShapeDtypeStruct((32, 2, 16), jnp.float32), ("embed", "heads", "kv"))}
  rules = sharding.PRESETS["fsdp_tp"][1]
  mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 2, "tensor": 4})
  with pytest.raises(sharding.MeshError) as error:
    sharding.check_even(params, mesh, rules)
  message = str(error.value)
  assert "embed axis 'vocab' has 66, not divisible by 4 (tensor): set model.vocab_multiple" in message
  assert "query axis 'heads' has 2" in message and "model.num_heads" in message
  sharding.check_even(params, types.SimpleNamespace(shape={"data": 1, "fsdp": 2, "tensor": 2}), rules)


def test_fused_loss_and_padded_vocabulary_on_fsdp_tp_give_the_single_device_losses(tmp_path):
  """The fused loss's chunked scan (and its table-gradient accumulator) under GSPMD, with the padded
  vocabulary split over the tensor axis: the same losses as the plain logits path on one device."""
  padded = ("--config.model.vocab_multiple=16",)
  single = run_losses(tmp_path, "single_logits", 1, *padded, "--config.model.loss_impl=logits")
  fused = run_losses(tmp_path, "fsdp_tp_fused", 8, *padded, "--config.mesh.preset=fsdp_tp",
                     "--config.model.loss_impl=fused", "--config.model.loss_chunk_len=16")
  for step, loss in single.items():
    assert fused[step] == pytest.approx(loss, rel=1e-5), step
