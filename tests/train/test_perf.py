"""FLOP accounting and MFU (lm.train.perf), on hand-computed examples."""

import math
import os

import jax
import jax.numpy as jnp
import pytest

from lm.models import TransformerConfig, TransformerLM
from lm.train import perf


def _params(config: TransformerConfig):
  return jax.eval_shape(lambda: TransformerLM(config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]


def test_flops_per_token_by_hand():
  """2 layers, width 64, 4 heads, vocab 100, context 128, GPT-2 style (biases, tied, learned positions).

  Per layer: LayerNorms 2 x (64 + 64) = 256; q, k, v, out: 4 x (64 x 64 + 64) = 16,640; MLP: 64 x 256 + 256 +
  256 x 64 + 64 = 33,088. Two layers: 2 x 49,984 = 99,968. Embedding 100 x 64 = 6,400 (tied: counted once),
  final LayerNorm 128, positions 128 x 64 = 8,192 (a lookup: not in N).
  N = 99,968 + 6,400 + 128 = 106,496.
  FLOPs per token = 6 N + 6 L T d = 638,976 + 6 x 2 x 128 x 64 = 638,976 + 98,304 = 737,280.
  """
  config = TransformerConfig(vocab_size=100, num_layers=2, num_heads=4, width=64, max_len=128)
  params = _params(config)
  assert sum(x.size for x in jax.tree.leaves(params)) == 106_496 + 8_192
  n = perf.matmul_params(params, config)
  assert n == 106_496
  assert perf.flops_per_token(n, config, seq_len=128) == 737_280


def test_untying_the_output_projection_adds_parameters_not_flops():
  """The untied model has a second 100 x 64 table, but the input table is a lookup: N (and FLOPs) do not change."""
  tied = TransformerConfig(vocab_size=100, num_layers=2, num_heads=4, width=64, max_len=128)
  untied = TransformerConfig(vocab_size=100, num_layers=2, num_heads=4, width=64, max_len=128, tie_embeddings=False)
  tied_params, untied_params = _params(tied), _params(untied)
  assert sum(x.size for x in jax.tree.leaves(untied_params)) == sum(x.size for x in jax.tree.leaves(tied_params)) + 6_400
  assert perf.matmul_params(untied_params, untied) == perf.matmul_params(tied_params, tied) == 106_496


def test_mfu_of_gpt2_small_on_an_h100_by_hand():
  """GPT-2 124M (vocab 50,304) at context 1024: N = 124,475,904 - 1024 x 768 = 123,689,472;
  6 N = 742,136,832; 6 L T d = 6 x 12 x 1024 x 768 = 56,623,104; sum 798,759,936 FLOPs per token.
  At 500,000 tokens/s on one H100 SXM (989 TFLOP/s bf16): 3.994e17 / 9.89e14 = 40.4 % MFU."""
  config = TransformerConfig(vocab_size=50_304, num_layers=12, num_heads=12, width=768, max_len=1024)
  n = perf.matmul_params(_params(config), config)
  assert n == 123_689_472
  per_token = perf.flops_per_token(n, config, seq_len=1024)
  assert per_token == 798_759_936
  peak = perf.table_peak_flops("NVIDIA H100 80GB HBM3", "bfloat16")
  assert peak == 989e12
  assert per_token * 500_000 / peak == pytest.approx(0.40382, abs=1e-5)


@pytest.mark.parametrize("kind, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),  # the longer prefix beats "nvidia h100"
    ("NVIDIA H100 NVL", "float32", 60e12),
    ("NVIDIA H200", "bfloat16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
    ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5", "bfloat16", 459e12),
    ("TPU v4", "bfloat16", 275e12),
])
def test_peak_flops_table(kind, dtype, expected):
  assert perf.table_peak_flops(kind, dtype) == expected


def test_unknown_device_has_no_peak_and_the_override_wins():
  assert math.isnan(perf.table_peak_flops("Some Accelerator 9000", "bfloat16"))
  assert perf.peak_flops_per_device("bfloat16", override=123e12) == 123e12


# /proc/cpuinfo of two machines, as Linux writes it (the first processor's block; the flags shortened to the
# ones that matter and a few around them). The AMD one is this project's KVM guest: family 25 model 17 (Zen 4).
AMD_ZEN4_VM = """\
processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1
microcode\t: 0x1000065
cpu MHz\t\t: 2596.144
cache size\t: 1024 KB
siblings\t: 2
cpu cores\t: 2
flags\t\t: fpu vme de pse tsc msr sse sse2 ht syscall nx mmxext pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 \
x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor bmi1 avx2 smep bmi2 avx512f avx512dq rdseed adx \
avx512ifma avx512cd sha_ni avx512bw avx512vl avx512_bf16 avx512vbmi avx512_vnni
bugs\t\t: sysret_ss_attrs null_seg spectre_v1 spectre_v2 spec_store_bypass srso
bogomips\t: 5192.28

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
cpu MHz\t\t: 2596.144
flags\t\t: fpu vme de pse tsc msr sse sse2 fma avx avx2 avx512f
"""

INTEL_SAPPHIRE_RAPIDS = """\
processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
stepping\t: 8
microcode\t: 0x2b000590
cpu MHz\t\t: 2000.000
cache size\t: 107520 KB
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm \
constant_tsc pni pclmulqdq dtes64 monitor ssse3 sdbg fma cx16 xtpr pdcm pcid dca sse4_1 sse4_2 x2apic movbe \
popcnt aes xsave avx f16c rdrand lahf_lm abm bmi1 hle avx2 smep bmi2 erms invpcid rtm avx512f avx512dq rdseed \
adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl avx512_bf16 amx_bf16 avx512_fp16 \
amx_tile amx_int8
vmx flags\t: vnmi preemption_timer posted_intr invvpid ept_x_only ept_ad ept_1gb flexpriority apicv tsc_offset
bugs\t\t: spectre_v1 spectre_v2 spec_store_bypass swapgs eibrs_pbrsb
"""

ARM_NEOVERSE = """\
processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd0c
"""


def test_cpu_peak_of_an_amd_zen4_vm():
  """Zen 4 runs 512-bit FMAs as two halves on its two 256-bit units: 16 lanes x 2 x 1 unit = 32 per cycle.
  2 cores x 2596.144 MHz x 32 = 166.15 GFLOP/s."""
  peak = perf.cpu_peak_from(AMD_ZEN4_VM, cores=2)
  assert (peak.vendor, peak.family, peak.model, peak.model_name) == ("AuthenticAMD", 25, 17, "AMD EPYC")
  assert (peak.lanes, peak.fma, peak.fma_units, peak.flops_per_cycle) == (16, True, 1, 32)
  assert (peak.clock_mhz, peak.clock_source) == (2596.144, "/proc/cpuinfo")
  assert peak.derived_flops == peak.peak_flops == pytest.approx(2 * 2596.144e6 * 32)
  assert (peak.source, peak.matmul_flops, peak.matmul_size) == ("flags x clock", None, None)


def test_cpu_peak_of_an_intel_xeon_takes_the_cpufreq_maximum_and_the_affinity():
  """The process may run on 4 of the CPUs; cpufreq's maximum (3.8 GHz) beats `cpu MHz` (2.0 GHz):
  4 x 3800 MHz x 16 lanes x 2 (FMA) x 2 units = 972.8 GFLOP/s."""
  peak = perf.cpu_peak_from(INTEL_SAPPHIRE_RAPIDS, cores=4, cpufreq_max_khz=[3_800_000.0] * 4)
  assert (peak.vendor, peak.family, peak.model) == ("GenuineIntel", 6, 143)
  assert peak.model_name == "Intel(R) Xeon(R) Platinum 8480+"
  assert (peak.lanes, peak.fma, peak.fma_units, peak.flops_per_cycle) == (16, True, 2, 64)
  assert (peak.clock_mhz, peak.clock_source, peak.cores) == (3800.0, "cpufreq max", 4)
  assert peak.peak_flops == pytest.approx(972.8e9)


def test_cpu_peak_without_a_clock_assumes_2_ghz():
  peak = perf.cpu_peak_from(ARM_NEOVERSE, cores=8)
  assert (peak.lanes, peak.fma, peak.fma_units, peak.flops_per_cycle) == (4, True, 2, 16)
  assert (peak.clock_mhz, peak.clock_source, peak.family) == (2000.0, "assumed", None)
  assert peak.peak_flops == 8 * 2e9 * 16


@pytest.mark.parametrize("flags, lanes, fma, per_cycle", [
    ("fpu sse sse2 sse4_2", 4, False, 8),  # a multiply and an add unit, 4 lanes each
    ("sse sse2 avx", 8, False, 16),  # Sandy Bridge: AVX without FMA
    ("sse sse2 avx avx2 fma", 8, True, 32),  # Haswell to Zen 3
    ("sse sse2 avx avx2 fma avx512f", 16, True, 64),  # Skylake-SP and later Xeons, Zen 5
])
def test_lanes_and_fma_of_the_flags(flags, lanes, fma, per_cycle):
  peak = perf.cpu_peak_from(f"vendor_id\t: GenuineIntel\ncpu family\t: 6\nflags\t\t: {flags}\n", cores=1)
  assert (peak.lanes, peak.fma, peak.flops_per_cycle) == (lanes, fma, per_cycle)


def test_a_matmul_faster_than_flags_x_clock_is_the_peak():
  """The derived 166.15 GFLOP/s of the Zen 4 VM is below a matmul run at 213 GFLOP/s: the matmul wins."""
  faster = perf.cpu_peak_from(AMD_ZEN4_VM, cores=2, matmul_flops=213e9, matmul_size=1024)
  assert (faster.peak_flops, faster.source, faster.matmul_size) == (213e9, "calibrated matmul", 1024)
  assert faster.derived_flops == pytest.approx(166.15e9, rel=1e-4)
  slower = perf.cpu_peak_from(AMD_ZEN4_VM, cores=2, matmul_flops=100e9, matmul_size=1024)
  assert (slower.peak_flops, slower.source, slower.matmul_flops) == (slower.derived_flops, "flags x clock", 100e9)


def test_the_override_and_the_environment_skip_the_calibration(monkeypatch):
  def no_matmul(*args, **kwargs):
    raise AssertionError("calibrated")
  monkeypatch.setattr(perf, "calibrated_matmul_flops", no_matmul)
  monkeypatch.setattr(perf, "cpu_peak", no_matmul)
  assert perf.peak_flops_per_device("float32", override=5e11) == 5e11
  assert perf.cpu_peak_in_use(5e11) is None  # what bench's JSON and training's log report: nothing derived
  monkeypatch.undo()
  monkeypatch.setattr(perf, "calibrated_matmul_flops", no_matmul)
  monkeypatch.setenv(perf.CALIBRATE_ENV, "0")
  peak = perf.cpu_peak.__wrapped__()  # uncached
  assert (peak.matmul_flops, peak.source, peak.peak_flops) == (None, "flags x clock", peak.derived_flops)


def test_cpu_peak_of_this_machine(monkeypatch):
  assert perf.cpu_peak() is perf.cpu_peak()  # once per process
  monkeypatch.setenv(perf.CALIBRATE_ENV, "1")  # the test session turns the calibration off (tests/conftest.py)
  peak = perf.cpu_peak.__wrapped__()
  assert peak.cores == len(os.sched_getaffinity(0))
  assert 0 < peak.matmul_flops <= peak.peak_flops < math.inf
  assert peak.peak_flops == max(peak.matmul_flops, peak.derived_flops)
  if jax.default_backend() == "cpu":
    assert perf.peak_flops_per_device() == pytest.approx(perf.cpu_peak().peak_flops / len(jax.local_devices()))
