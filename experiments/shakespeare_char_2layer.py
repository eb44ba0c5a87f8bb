"""The baseline's 2-layer student, trained alone: the control of experiments/distill_shakespeare.py.

experiments/shakespeare_char.py (nanoGPT's CPU baby GPT: width 128, 4 heads,
context 64, 2,000 steps, seed 1337) with model.num_layers = 2 and nothing
else changed, so it sees the same batches in the same order from the same
initial weights as the distilled student (`lm.tasks.distill` initializes its
student with a head="lm" run's key).

Expected result (measured; BENCHMARKS.md "Distillation: a 2-layer student of
the baseline (2-core CPU)"): eval/loss 1.860 at step 2000 (seed 1337; 1.832 at
seed 0), nearly the 4-layer baseline's 1.857; the distilled student reaches 1.814.
Runtime: 2 min 52 s on a 2-core CPU shared with other jobs (52 % of it).

Command:
  TFDS_DATA_DIR=../shared/tfds python -m lm.main \
      --config experiments/shakespeare_char_2layer.py --workdir runs/shakespeare_char_2layer
"""

import importlib.util
import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def _baseline():
  spec = importlib.util.spec_from_file_location("shakespeare_char", os.path.join(_HERE, "shakespeare_char.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  config = _baseline()
  config.model.num_layers = 2
  return config
