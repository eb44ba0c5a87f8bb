"""XLA flag presets (lm.xla_flags): precedence, every preset flag accepted by this jaxlib, applied before
JAX initializes (in-process and through `python -m lm.main`), overridable, and a clear error too late."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lm import config as config_lib
from lm import xla_flags
from tests.helpers import ROOT, TFDS_DIR, run_cli

BASELINE = "experiments/shakespeare_char.py"
GPU = xla_flags.PRESETS["gpu"]
DEVICES = "--xla_force_host_platform_device_count"


# -- resolve(): precedence ---------------------------------------------------------


def test_preset_flags_go_to_their_variable():
  assert xla_flags.resolve("none", "", {}) == {}
  gpu = xla_flags.resolve("gpu", "", {})
  assert list(gpu) == ["XLA_FLAGS"]
  assert gpu["XLA_FLAGS"].split() == [f"--{name}={value}" for name, value in GPU.items()]
  tpu = xla_flags.resolve("tpu", "", {})
  assert list(tpu) == ["LIBTPU_INIT_ARGS"]
  assert "--xla_tpu_enable_async_collective_fusion=true" in tpu["LIBTPU_INIT_ARGS"].split()


def test_extra_flags_replace_the_presets_and_add_their_own():
  flags = xla_flags.resolve("gpu", "--xla_gpu_all_gather_combine_threshold_bytes=1024 --xla_dump_hlo_as_text",
                            {})["XLA_FLAGS"].split()
  assert "--xla_gpu_all_gather_combine_threshold_bytes=1024" in flags
  assert f"--xla_gpu_all_gather_combine_threshold_bytes={GPU['xla_gpu_all_gather_combine_threshold_bytes']}" \
      not in flags
  assert "--xla_dump_hlo_as_text" in flags  # a flag with no value stays one
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
  # On TPU, libtpu's flags go to LIBTPU_INIT_ARGS and the others to XLA_FLAGS.
  tpu = xla_flags.resolve("tpu", "--xla_tpu_enable_async_collective_fusion=false --xla_dump_to=/tmp/d", {})
  assert "--xla_tpu_enable_async_collective_fusion=false" in tpu["LIBTPU_INIT_ARGS"].split()
  assert "--xla_tpu_enable_async_collective_fusion=true" not in tpu["LIBTPU_INIT_ARGS"].split()
  assert tpu["XLA_FLAGS"] == "--xla_dump_to=/tmp/d"


def test_the_users_environment_wins_and_keeps_its_other_flags():
  user = "--xla_gpu_enable_latency_hiding_scheduler=false --xla_gpu_all_gather_combine_threshold_bytes --my_flag=1 X=Y"
  environ = {"XLA_FLAGS": user}
  value = xla_flags.resolve("gpu", "--xla_gpu_enable_latency_hiding_scheduler=true --my_flag=2", environ)["XLA_FLAGS"]
  flags = value.split()
  assert value.endswith(user)  # the user's string unchanged, after lm's flags
  for name in ("xla_gpu_enable_latency_hiding_scheduler", "xla_gpu_all_gather_combine_threshold_bytes", "my_flag"):
    assert len([f for f in flags if f.lstrip("-").split("=")[0] == name]) == 1, name  # only the user's
  assert f"--xla_gpu_all_reduce_combine_threshold_bytes={GPU['xla_gpu_all_reduce_combine_threshold_bytes']}" in flags

  applied = xla_flags.apply("gpu", "--my_flag=2", environ)
  assert environ["XLA_FLAGS"] == value
  assert applied.overridden == {"xla_gpu_enable_latency_hiding_scheduler": "false",
                                "xla_gpu_all_gather_combine_threshold_bytes": None, "my_flag": "1"}
  assert "xla_gpu_enable_latency_hiding_scheduler" not in applied.flags
  assert "kept from the environment" in applied.summary()
  before = dict(environ)
  xla_flags.apply("gpu", "--my_flag=2", environ)  # again: nothing changes
  assert environ == before


def test_bad_names_and_flags_are_config_errors():
  with pytest.raises(config_lib.ConfigError, match=r"config\.xla\.preset='gpus'.*auto, none, gpu, tpu"):
    xla_flags.resolve("gpus", "", {})
  with pytest.raises(config_lib.ConfigError, match=r"config\.xla\.flags.*'xla_foo=1' is not an XLA flag"):
    xla_flags.resolve("none", "--xla_bar=1 xla_foo=1", {})
  config = config_lib.load_config(str(ROOT / BASELINE), {"xla.preset": "cuda"})
  with pytest.raises(config_lib.ConfigError, match=r"config\.xla\.preset='cuda'"):
    config_lib.validate(config)
  config = config_lib.load_config(str(ROOT / BASELINE), {"xla.flags": "-xla_foo=1"})
  with pytest.raises(config_lib.ConfigError, match=r"config\.xla\.flags"):
    config_lib.validate(config)


def test_auto(monkeypatch):
  monkeypatch.setattr(xla_flags, "_tpu_visible", lambda: False)
  monkeypatch.setattr(xla_flags, "_nvidia_gpu_visible", lambda environ: False)
  assert xla_flags.detect({}) == "none" and xla_flags.resolve("auto", "", {}) == {}
  monkeypatch.setattr(xla_flags, "_nvidia_gpu_visible", lambda environ: True)
  assert xla_flags.detect({}) == "gpu" and xla_flags.detect({"JAX_PLATFORMS": "cuda,cpu"}) == "gpu"
  assert xla_flags.detect({"JAX_PLATFORMS": "cpu"}) == "none"  # e.g. lm.launch_local's processes
  monkeypatch.setattr(xla_flags, "_tpu_visible", lambda: True)
  assert xla_flags.detect({}) == "tpu"
  assert xla_flags.apply("auto", "", {}).preset == "tpu"


def test_describe_reports_the_environment():
  figures = xla_flags.describe({"XLA_FLAGS": "--a=1"})
  assert figures["XLA_FLAGS"] == "--a=1" and figures["LIBTPU_INIT_ARGS"] == ""
  assert xla_flags.apply("none").env == {}  # nothing to set: fine even after this process's JAX started


# -- subprocesses: what XLA itself does with the flags -------------------------------


def _clean_env(**extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "LIBTPU_INIT_ARGS")}
  env.update(JAX_PLATFORMS="cpu", **extra)
  return env


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_clean_env(**env), capture_output=True,
                        text=True, timeout=120)


def test_every_gpu_preset_flag_is_accepted_by_this_jaxlib():
  # XLA aborts the process on a flag it does not know; the CPU jaxlib parses the xla_gpu_* options too.
  flags = xla_flags.resolve("gpu", f"{DEVICES}=2", {})["XLA_FLAGS"]
  result = _python("import jax; print(jax.device_count())", XLA_FLAGS=flags)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ["2"]


def test_applied_before_jax_starts_and_an_error_after():
  code = f"""
import lm.main  # the CLI's whole import chain starts no backend
from lm import xla_flags
from lm.config import ConfigError
assert not xla_flags.backends_started()
xla_flags.apply("none", "{DEVICES}=3")
import jax
print("devices", jax.device_count(), xla_flags.backends_started())
xla_flags.apply("none", "{DEVICES}=3")  # the same again: a no-op
try:
  xla_flags.apply("gpu")  # flags XLA would never read now
except ConfigError as error:
  print("error:", error)
"""
  result = _python(code)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  assert lines[0] == "devices 3 True"
  assert lines[1].startswith("error:") and "no effect" in lines[1]
  assert "before the first jax.devices()" in lines[1] and "restart" in lines[1]


def _bench(*args: str) -> dict:
  result = run_cli("--config", BASELINE, "--mode", "bench", "--config.bench.steps=1", "--config.bench.warmup_steps=0",
                   "--config.bench.decode=False", "--config.batch_size=6", "--config.seq_len=16",
                   "--config.model.num_layers=1", "--config.model.width=16", "--config.model.num_heads=2", *args,
                   env={"TFDS_DATA_DIR": os.path.realpath(TFDS_DIR)}, timeout=240, check=True)
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def no_user_flags(monkeypatch):
  for name in ("XLA_FLAGS", "LIBTPU_INIT_ARGS"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")


def test_cli_applies_the_flags_before_jax_starts(no_user_flags):
  assert _bench("--config.xla.preset=none", f"--config.xla.flags={DEVICES}=3")["devices"] == 3


def test_cli_users_xla_flags_win(no_user_flags, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", f"{DEVICES}=2")
  assert _bench("--config.xla.preset=none", f"--config.xla.flags={DEVICES}=3")["devices"] == 2


def test_cli_bad_preset(no_user_flags, tmp_path):
  result = run_cli("--config", BASELINE, "--workdir", str(tmp_path / "work"), "--config.xla.preset=gpus",
                   timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert errors and "config.xla.preset='gpus'" in errors[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "work").exists()
