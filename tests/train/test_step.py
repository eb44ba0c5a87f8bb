"""XLA options of the jitted steps on CPU."""

from __future__ import annotations

import numpy as np

from lm.config import base_config
from lm.train import sharding, step

YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"


def cpu_mesh():
  config = base_config()
  return sharding.make_mesh(config.mesh)


def test_cpu_options_apply_on_cpu_unless_xla_flags_sets_them(monkeypatch):
  options = base_config().xla_cpu_options
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  assert step.cpu_compiler_options(options, cpu_mesh()) == {YNN_OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
  monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=1 --{YNN_OPTION}=individual_dot,reduce")
  assert step.cpu_compiler_options(options, cpu_mesh()) is None


def test_default_options_keep_reductions_out_of_ynnpack(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  x = jnp.ones((4, 64, 64))
  lowered = jax.jit(lambda v: (v * v).sum(-1)).lower(x)
  options = step.cpu_compiler_options(base_config().xla_cpu_options, cpu_mesh())
  assert "__ynn_fusion" not in lowered.compile(options).as_text()
  np.testing.assert_allclose(lowered.compile(options)(x), 64.0)
