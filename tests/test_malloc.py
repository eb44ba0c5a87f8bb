"""lm.core.malloc: glibc keeps the memory a step frees, so a big block freed every step is not faulted in again.

The page-fault test runs real processes (mallopt is process-wide) and counts the kernel's minor faults.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from lm.config import base_config
from lm.core import malloc
from lm.core.errors import ConfigError
from lm.experiment.config import validate

ROOT = Path(__file__).resolve().parents[1]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocates, touches and frees a 40 MiB block (XLA:CPU's temporary buffer of a step, over glibc's 32 MiB ceiling
# for its dynamic mmap threshold) ten times; prints the minor page faults of each round.
STEPS = r"""
import ctypes, json, resource, sys
from lm.core import malloc
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
said = malloc.keep_freed_memory({}) if sys.argv[1] == "keep" else ""
size, counts = 40 << 20, []
for _ in range(10):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)
  counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"said": said, "faults": counts}))
"""


def run_steps(mode: str) -> dict:
  out = subprocess.run([sys.executable, "-c", STEPS, mode], cwd=ROOT, capture_output=True, text=True, check=True)
  return json.loads(out.stdout)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_kept_memory_is_not_faulted_in_again_each_step():
  default, keep = run_steps("default"), run_steps("keep")
  # glibc as it starts: the block is mapped afresh every round, each of its pages faulted in again.
  assert min(default["faults"][1:]) > default["faults"][0] / 2 > 0, default
  # Kept: only the first round faults the pages in; the later ones reuse them.
  assert keep["faults"][0] > 0 and max(keep["faults"][1:]) < keep["faults"][0] / 20, keep
  assert keep["said"].startswith("glibc malloc keeps freed memory")


@pytest.mark.parametrize("environ, said", [
    ({"MALLOC_TRIM_THRESHOLD_": "1000000"}, "kept from the environment (MALLOC_TRIM_THRESHOLD_)"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}, "kept from the environment (GLIBC_TUNABLES)"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "jemalloc is preloaded"),
])
def test_a_users_own_allocator_settings_win(environ, said):
  if not GLIBC:
    pytest.skip("glibc's malloc only")
  assert said in malloc.keep_freed_memory(environ)
  assert said in malloc.describe()


def test_off_glibc_nothing_is_changed(monkeypatch):
  monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
  assert malloc.keep_freed_memory({}).startswith("not glibc")


def test_cpu_malloc_is_checked():
  config = base_config()
  config.cpu_malloc = "always"
  with pytest.raises(ConfigError, match=r"config.cpu_malloc='always' is not one of keep, default"):
    validate(config, "train")
