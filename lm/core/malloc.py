r"""glibc malloc settings for a process whose XLA:CPU steps allocate big buffers every step.

XLA:CPU allocates each execution's temporary buffer (all of a train step's
intermediates in one block: 28-40 MB for the baseline, far more for bigger
models) with malloc and frees it when the step ends. glibc serves a block over
its mmap threshold with a fresh `mmap` and unmaps it on free; the threshold
grows with the blocks freed, but never past 32 MiB. And memory freed at the top
of the heap beyond the trim threshold goes back to the OS. Either way every step
touches new pages, and each 4 KiB page costs a page fault (the kernel zeroes
it): the baseline run on XLA's code alone has a 40 MB block, 9,900 faults and
11 ms of its 44 ms step on a 2-core Zen 4 (BENCHMARKS.md, "The page faults
behind the GELU surprise"). PyTorch's eager ops allocate blocks under the
threshold, which glibc reuses.

`keep_freed_memory` raises both thresholds (`mallopt`), so such blocks come
from the heap and stay there for the next step. The cost: memory freed stays in
the process (its resident size does not shrink after a peak, up to the
threshold). Still mapped afresh every time: blocks over the threshold (2 GiB,
the most `mallopt` takes), and blocks over 64 MiB that XLA allocates on its own
threads. glibc gives such threads arenas of 64 MiB heaps and maps anything
bigger directly, whatever the thresholds. `MALLOC_ARENA_MAX=1` in the
environment at start-up sends them to the main heap, but it slowed the
baseline's step by 2-3 ms, so lm does not set it (BENCHMARKS.md, "The page
faults behind the GELU surprise": GPT-2 124M on the CPU).

A setting the user made in the environment wins (MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_MAX_, or glibc.malloc tunables in
GLIBC_TUNABLES), as does another allocator preloaded (LD_PRELOAD), and nothing
is done off glibc. Importing this module does nothing; it imports no JAX.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Mapping

# mallopt's parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# mallopt takes an int: the highest threshold it can set.
KEEP_BYTES = 2**31 - 1
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_last: str = ""  # what keep_freed_memory last reported for this process (describe)


def _not_applicable(environ: Mapping[str, str]) -> str | None:
  """Why the process's malloc is left as it is, or None."""
  library, version = platform.libc_ver()
  if platform.system() != "Linux" or library != "glibc":
    return f"not glibc ({platform.system()} {library or 'unknown libc'}): malloc left as it is"
  preloaded = [name for name in OTHER_ALLOCATORS if name in environ.get("LD_PRELOAD", "")]
  if preloaded:
    return f"{preloaded[0]} is preloaded (LD_PRELOAD): glibc's malloc settings left as they are"
  users = [name for name in USER_SETTINGS if name in environ]
  if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
    users.append("GLIBC_TUNABLES")
  if users:
    return f"glibc {version} malloc settings kept from the environment ({', '.join(users)})"
  return None


def keep_freed_memory(environ: Mapping[str, str] | None = None) -> str:
  """Raises glibc's mmap and trim thresholds to KEEP_BYTES (module docstring); returns what it did, for the log.

  Process-wide; calling it again changes nothing more. `environ` (default os.environ) is where the user's own
  settings are looked for.
  """
  global _last
  reason = _not_applicable(os.environ if environ is None else environ)
  if reason is None:
    libc = ctypes.CDLL(None)
    refused = [name for name, param in (("trim", M_TRIM_THRESHOLD), ("mmap", M_MMAP_THRESHOLD))
               if libc.mallopt(param, KEEP_BYTES) != 1]
    if refused:
      reason = f"glibc {platform.libc_ver()[1]} refused the {' and '.join(refused)} threshold (mallopt)"
    else:
      reason = (f"glibc malloc keeps freed memory: mmap and trim thresholds {KEEP_BYTES >> 20} MiB, so XLA:CPU's "
                "per-step buffers are reused, not faulted in afresh every step (config.cpu_malloc=default leaves "
                "glibc as it is)")
  _last = reason
  return reason


def describe() -> str:
  """What keep_freed_memory did in this process ("" if it was not called: glibc's malloc as it started)."""
  return _last
