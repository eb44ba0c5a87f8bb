"""FLOP accounting and MFU (lm.train.perf), on hand-computed examples."""

import math

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
